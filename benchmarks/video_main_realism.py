"""How frame-like and how steady the shipped video main network's unconditional clips are: the
pose_video realism statistic and the mean change between consecutive frames, for its samples,
for the same network before training (``embedded:pose`` joined with identity motion modules,
i.e. the image network on every frame alone) and for training renders.

    python benchmarks/video_main_realism.py --out benchmarks/results/video_main_realism_cpu.json

Samples are drawn as ``lisa pretrain``'s curve draws them (DPM-Solver++, seed 1234), so the
trained network's realism here is its curve's last point. Frame change is mean |frame f+1 -
frame f| on the 0..255 scale: training clips move a little (a walking figure, a panning
camera), independent frames change everywhere.
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import write_result

from lisa_control.data.tasks import get_task
from lisa_control.families.loading import load_main_model
from lisa_control.training.pretrain import render_dataset, sample_unconditional
from lisa_control.zoo.video import motion_unet_from_image


def clip_scores(task, clips: torch.Tensor) -> dict[str, float]:
    """Realism and mean frame change of clips (N, 3, F, H, W) in [-1, 1]."""
    change = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean().item() * 127.5
    return {"realism": task.realism(clips), "frame_change": change}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:pose_video")
    p.add_argument("--image_model", default="embedded:pose", help="its spatial layers' source")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/video_main_realism_cpu.json")
    args = p.parse_args(argv)
    t0 = time.time()
    model = load_main_model(args.model)
    task = get_task(model.task, resolution=model.resolution)
    frames = task.frames
    untrained = motion_unet_from_image(load_main_model(args.image_model).main_network)
    renders = render_dataset([task], args.num_samples, 0, 0).float() / 127.5 - 1
    rows = {"training_renders": clip_scores(task, renders)}
    for name, network in (("before_training", untrained), ("trained", model.main_network)):
        started = time.time()
        clips = sample_unconditional(
            network.float().eval().to(args.device), model.scheduler, args.num_samples,
            model.resolution, args.sample_steps, 1234, args.device, frames=frames,
        ).cpu()  # fmt: skip
        rows[name] = clip_scores(task, clips) | {"sampling_seconds": time.time() - started}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    print("training_renders", {k: round(v, 3) for k, v in rows["training_renders"].items()})
    summary = {"clips": rows, "frames": frames, "settings": vars(args)}
    write_result(summary, "video_main_realism.py", argv, t0, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
