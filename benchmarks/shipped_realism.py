"""How task-like the shipped main networks' unconditional samples are, next to blank and noise
images: the task's realism statistic and the task-feature Fréchet distance (not Inception FID).

    python benchmarks/shipped_realism.py --out benchmarks/results/shipped_realism_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import write_result

from lisa_control.data.tasks import get_task
from lisa_control.feature_distance import TaskFeatureDistance, render
from lisa_control.loading import load_main_model
from lisa_control.pretrain import sample_unconditional

MODELS = [("pose", "pose"), ("pose_dit", "pose"), ("edges", "edges"),
          ("segmentation", "segmentation"), ("super_resolution", "super_resolution")]  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=12)
    p.add_argument("--feature_network_steps", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/shipped_realism_cpu.json")
    args = p.parse_args(argv)
    t0 = time.time()
    yardsticks, rows = {}, {}
    for name, task_name in MODELS:
        model = load_main_model(f"embedded:{name}")
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
        }
        realism = {k: round(v, 3) for k, v in rows[name]["realism"].items()}
        distance = {k: round(v, 1) for k, v in rows[name]["feature_distance"].items()}
        print(name, realism, distance, flush=True)
    summary = {"models": rows, "settings": vars(args)}
    write_result(summary, "shipped_realism.py", argv, t0, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
