"""Data-parallel scaling of `lisa train` through `accelerate launch` (issue 7).

The same LISA training job runs with 1 and with N processes (one per GPU; same per-process
batch, so N times the samples per step), and the script reports

    scaling = throughput(N) / (N x throughput(1)),   throughput = samples per second,

from the median ``step_seconds`` of each run's loss log after warm-up. The main network is a
pixel-space UNet built here from a config (no download) and trained on the procedural pose task,
so the job needs no data. ``--accelerate_config`` passes an accelerate config file (e.g. FSDP or
DeepSpeed ZeRO-2) to both launches; by default they use plain DDP.

    python benchmarks/ddp_scaling.py --processes 2 --out benchmarks/results/ddp_scaling.json

``--cpu`` runs the processes as a gloo group on the CPU (for a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--train_batch_size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    p.add_argument("--mixed_precision", default="bf16")
    p.add_argument("--accelerate_config", default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--run_dir", default="runs/ddp_scaling")
    p.add_argument("--out", default="benchmarks/results/ddp_scaling.json")
    return p


def make_main_model(args, folder: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lisa_control.families.loading import save_pixel_model
    from lisa_control.zoo.unet import tiny_unet

    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=args.resolution,
            in_channels=3,
            block_out_channels=tuple(args.block_out_channels),
            cross_attention_dim=64,
            attention_at_full_resolution=False,
        )
    )
    save_pixel_model(folder, unet, DDPMScheduler(), args.resolution, "pose")
    return folder


def launch(args, model: Path, processes: int) -> list[dict]:
    out = Path(args.run_dir) / f"processes{processes}"
    for stale in out.glob("loss_log*.jsonl"):
        stale.unlink()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no" if args.cpu else args.mixed_precision]
    if args.accelerate_config:
        cmd += ["--config_file", args.accelerate_config]
    elif processes > 1:
        # On a machine without GPUs the torchrun launcher still forms a gloo group.
        cmd += ["--multi_gpu"]
    cmd += ["-m", "lisa_control", "train", "--pretrained_model_name_or_path", str(model)]
    cmd += ["--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size)]
    cmd += ["--max_train_steps", str(args.steps), "--validation_steps", str(10 * args.steps)]
    cmd += ["--checkpointing_steps", str(10 * args.steps), "--report_to", "none"]
    cmd += ["--dataloader_num_workers", "0" if args.cpu else "4", "--no-progress"]
    cmd += ["--overwrite_output_dir"]
    cmd += ["--output_dir", str(out)] + (["--device", "cpu"] if args.cpu else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]


def throughput(log: list[dict], batch: int, processes: int, warmup: int) -> dict:
    times = [r["step_seconds"] for r in log[warmup:]] or [r["step_seconds"] for r in log]
    median = statistics.median(times)
    return {
        "steps": len(log),
        "median_step_seconds": median,
        "samples_per_second": batch * processes / median,
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    model = make_main_model(args, Path(args.run_dir) / "model")
    runs = {}
    for n in sorted({1, args.processes}):
        runs[str(n)] = throughput(launch(args, model, n), args.train_batch_size, n, args.warmup)
        print(f"{n} process(es): {runs[str(n)]}", flush=True)
    one, many = runs["1"], runs[str(args.processes)]
    summary = {
        "settings": vars(args),
        "runs": runs,
        "scaling": many["samples_per_second"] / (args.processes * one["samples_per_second"]),
    }
    try:
        import torch

        summary["gpus"] = torch.cuda.device_count()
    except Exception:  # the result is still useful without the count
        summary["gpus"] = None
    write_result(summary, "ddp_scaling.py", argv, t0, args.out)
    print(f"scaling {summary['scaling']:.3f} (goal >= 0.90); wrote {args.out}")


if __name__ == "__main__":
    main()
