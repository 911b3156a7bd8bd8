"""How task-like the shipped main networks' unconditional samples are, next to blank and noise
images: the task's realism statistic and the task-feature Fréchet distance (not Inception FID).

    python benchmarks/shipped_realism.py --out benchmarks/results/shipped_realism_cpu.json

``--models MODEL=TASK ...`` scores other main networks the same way (MODEL: embedded:NAME or a
folder ``lisa pretrain`` wrote), e.g. a longer-trained one next to the shipped one.
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import write_result

from lisa_control.data.tasks import get_task
from lisa_control.eval.feature_distance import TaskFeatureDistance, render
from lisa_control.families.loading import load_main_model
from lisa_control.training.pretrain import null_context, predict, sample_unconditional

SHIPPED = ["embedded:pose=pose", "embedded:pose_dit=pose", "embedded:edges=edges",
           "embedded:segmentation=segmentation",
           "embedded:super_resolution=super_resolution"]  # fmt: skip


@torch.no_grad()
def held_out_loss(model, task, count: int, device) -> dict[str, float]:
    """The main network's training loss on renders no run trained on, at fixed noise and
    timesteps, over all t and split at the middle of the schedule. It is also the mean square
    of LISA's target y - y_main, of which a decoder can learn only the part the condition
    predicts."""
    network = model.main_network.to(device).float()
    objective = model.training_objective()
    x0 = render(task, seed=11, count=count).to(device)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g).to(device)
    T = objective.num_timesteps
    timesteps = torch.linspace(0, T - 1, count).round().to(device)
    batch = objective.sample(x0, noise=noise, timesteps=timesteps)
    pred = predict(network, batch.x_t, batch.timesteps, null_context(network, count, device))
    per_sample = (pred.float() - batch.target.float()).pow(2).flatten(1).mean(1)
    low = batch.timesteps < T / 2
    return {
        "all_t": per_sample.mean().item(),
        "t_below_half": per_sample[low].mean().item(),
        "t_above_half": per_sample[~low].mean().item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=SHIPPED, help="MODEL=TASK pairs")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=12)
    p.add_argument("--feature_network_steps", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/shipped_realism_cpu.json")
    args = p.parse_args(argv)
    t0 = time.time()
    yardsticks, rows = {}, {}
    for entry in args.models:
        source, task_name = entry.rsplit("=", 1)
        name = source.removeprefix("embedded:")
        model = load_main_model(source)
        samples = sample_unconditional(
            model.main_network.to(args.device), model.scheduler, args.num_samples,
            model.resolution, args.sample_steps, seed=0, device=args.device,
        ).cpu()  # fmt: skip
        task = get_task(task_name, resolution=model.resolution)
        if task_name not in yardsticks:
            yardsticks[task_name] = TaskFeatureDistance(
                task, reference_size=256, train_steps=args.feature_network_steps, pool=512,
                device=args.device,
            ).prepare()  # fmt: skip
        fd = yardsticks[task_name]
        g = torch.Generator().manual_seed(0)
        images = {
            "samples": samples,
            "real_renders": render(task, seed=7, count=args.num_samples),
            "blank": torch.zeros_like(samples),
            "noise": torch.rand(samples.shape, generator=g) * 2 - 1,
        }
        rows[name] = {
            "task": task_name,
            "realism": {k: task.realism(v) for k, v in images.items()},
            "feature_distance": {k: fd(v) for k, v in images.items()},
            "feature_network_accuracy": fd.accuracy,
            "held_out_loss": held_out_loss(model, task, args.num_samples, args.device),
        }
        realism = {k: round(v, 3) for k, v in rows[name]["realism"].items()}
        distance = {k: round(v, 1) for k, v in rows[name]["feature_distance"].items()}
        loss = {k: round(v, 5) for k, v in rows[name]["held_out_loss"].items()}
        print(name, realism, distance, loss, flush=True)
    summary = {"models": rows, "settings": vars(args)}
    write_result(summary, "shipped_realism.py", argv, t0, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
