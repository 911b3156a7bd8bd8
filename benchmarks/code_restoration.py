"""Blind restoration of corrupted task renders: CODE against SDEdit at matched latent times.

For each MODEL=TASK pair, ``--num_images`` clean renders of TASK are corrupted by each corruption
of ``lisa_control.editing.corruptions`` (one severity, a fixed corruption seed, so every method
sees the same inputs), then restored by CODE and by SDEdit at each ``--t0`` with each of
``--seeds``. Every restored batch is scored by

* realism: the task-feature Fréchet distance (``TaskFeatureDistance``, not Inception FID) of the
  restored images to the task's reference renders (lower is better);
* faithfulness to the input: PSNR and SSIM against the corrupted input;
* fidelity to the clean image: PSNR and SSIM against the clean render;
* the task's own fidelity metric (pose PCK, edge F1, segmentation mIoU, low-resolution PSNR)
  against the clean render's condition.

The corrupted inputs and the clean renders are scored the same way (methods ``input`` and
``clean``). The raw JSON holds every (model, corruption, method, t0, step size, seed) row, a
summary of means and standard deviations over seeds, the settings, the exact command, the
package versions and the device.

    python benchmarks/code_restoration.py --out benchmarks/results/code_restoration.json

On a CPU, small settings finish in minutes:

    python benchmarks/code_restoration.py --models embedded:pose=pose \\
        --corruptions gaussian_noise fog --num_images 4 --seeds 0 --inference_steps 10 \\
        --langevin_steps 8 --feature_network_steps 50 --reference_size 64 --feature_pool 256 \\
        --device cpu --threads 1 --out /tmp/code_restoration_smoke.json
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from provenance import write_result

from lisa_control.data.tasks import get_task
from lisa_control.editing import available_corruptions, code_edit, corrupt, psnr, sdedit, ssim
from lisa_control.editing.models import load_edit_model
from lisa_control.eval.feature_distance import TaskFeatureDistance

SHIPPED = ["embedded:pose=pose", "embedded:pose_dit=pose", "embedded:edges=edges",
           "embedded:segmentation=segmentation",
           "embedded:super_resolution=super_resolution"]  # fmt: skip
# Renders from a stream that training (seeds 0..), validation (10_007 + seed), the feature
# network (31_337 + seed) and its reference set (41_017) never use.
CLEAN_SEED = 52_711
CORRUPTION_SEED = 0


def versions() -> dict[str, str]:
    import diffusers

    import lisa_control

    def git(*argv) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
    except Exception:  # no git at hand
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__,
            "lisa_control": lisa_control.__version__, "lisa_control_path": lisa_control.__file__,
            "git_commit": commit}  # fmt: skip


def clean_renders(task, count: int):
    samples = [task.sample(CLEAN_SEED, i) for i in range(count)]
    pixels = np.stack([s.image for s in samples]).astype(np.float32)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1, samples


def scores(images, corrupted, clean, samples, task, distance) -> dict[str, float]:
    row = {
        "feature_distance": distance(images),
        "psnr_input": psnr(images, corrupted).mean().item(),
        "ssim_input": ssim(images, corrupted).mean().item(),
        "psnr_clean": psnr(images, clean).mean().item(),
        "ssim_clean": ssim(images, clean).mean().item(),
    }
    row.update({f"task_{k}": v for k, v in task.fidelity(images, samples).items()})
    return row


def restore(args, model, method, images, t0, step_size, seed):
    """``images`` restored in batches, one generator for the whole set."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for batch in images.split(args.batch_size):
        batch = batch.to(args.device)
        if method == "sdedit":
            y = sdedit(model, batch, t0=t0, num_inference_steps=args.inference_steps,
                       generator=generator)  # fmt: skip
        else:
            y = code_edit(model, batch, t0=t0, num_inference_steps=args.inference_steps,
                          eta=args.eta, langevin_steps=args.langevin_steps, step_size=step_size,
                          anneal_stages=args.anneal_stages, anneal_factor=args.anneal_factor,
                          clip_encode=not args.no_clip_encode, clip_decode=not args.no_clip_decode,
                          generator=generator)  # fmt: skip
        out.append(y.float().cpu())
    return torch.cat(out)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (model, corruption, method, t0, step)."""
    groups = defaultdict(list)
    keys = ("model", "task", "corruption", "method", "t0", "step_size")
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    summary = []
    for key, members in groups.items():
        entry = dict(zip(keys, key)) | {"seeds": len(members)}
        for metric in members[0]:
            if metric in keys or metric == "seed" or not isinstance(members[0][metric], float):
                continue
            values = np.array([m[metric] for m in members], dtype=np.float64)
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std())
        summary.append(entry)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=SHIPPED, help="MODEL=TASK pairs")
    p.add_argument("--corruptions", nargs="+", default=available_corruptions())
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--t0", type=float, nargs="+", default=[0.3, 0.5],
                   help="latent times; CODE and SDEdit run at each")  # fmt: skip
    p.add_argument(
        "--inference_steps",
        type=int,
        default=200,
        help="grid spacing over the whole diffusion (round(t0 x this) steps each way)",
    )
    p.add_argument("--langevin_steps", type=int, default=200)
    p.add_argument("--step_size", type=float, nargs="+", default=[1.4e-4],
                   help="CODE base steps (the authors sweep 1e-5 1.4e-4 2e-3)")  # fmt: skip
    p.add_argument("--eta", type=float, default=1.7)
    p.add_argument("--anneal_stages", type=int, default=4)
    p.add_argument("--anneal_factor", type=float, default=0.8)
    p.add_argument("--no_clip_encode", action="store_true")
    p.add_argument("--no_clip_decode", action="store_true")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--feature_network_steps", type=int, default=1500)
    p.add_argument("--reference_size", type=int, default=1024)
    p.add_argument("--feature_pool", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/code_restoration.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    distances: dict[str, TaskFeatureDistance] = {}
    rows = []
    for entry in args.models:
        source, task_name = entry.rsplit("=", 1)
        model = load_edit_model(source)
        model.main_network.to(args.device).float().eval()
        task = get_task(task_name, resolution=model.resolution)
        if task_name not in distances:
            distances[task_name] = TaskFeatureDistance(
                task, reference_size=args.reference_size, train_steps=args.feature_network_steps,
                pool=args.feature_pool, device=args.device,
            ).prepare()  # fmt: skip
        distance = distances[task_name]
        clean, samples = clean_renders(task, args.num_images)
        base = {"model": source, "task": task_name, "severity": args.severity}
        rows.append(
            base
            | {
                "corruption": None,
                "method": "clean",
                "t0": None,
                "step_size": None,
                "seed": None,
                **scores(clean, clean, clean, samples, task, distance),
            }
        )
        for name in args.corruptions:
            corrupted = corrupt(clean, name, args.severity, seed=CORRUPTION_SEED)
            rows.append(
                base
                | {
                    "corruption": name,
                    "method": "input",
                    "t0": None,
                    "step_size": None,
                    "seed": None,
                    **scores(corrupted, corrupted, clean, samples, task, distance),
                }
            )
            runs = [("sdedit", t0, None) for t0 in args.t0]
            runs += [("code", t0, a) for t0 in args.t0 for a in args.step_size]
            for method, t0, step_size in runs:
                for seed in args.seeds:
                    tic = time.time()
                    restored = restore(args, model, method, corrupted, t0, step_size, seed)
                    row = base | {
                        "corruption": name,
                        "method": method,
                        "t0": t0,
                        "step_size": step_size,
                        "seed": seed,
                        "seconds": time.time() - tic,
                        **scores(restored, corrupted, clean, samples, task, distance),
                    }
                    rows.append(row)
                    print(
                        f"{source} {name} {method} t0={t0} a={step_size} seed={seed}: "
                        f"FD {row['feature_distance']:.1f}  PSNR in/clean "
                        f"{row['psnr_input']:.2f}/{row['psnr_clean']:.2f}  SSIM clean "
                        f"{row['ssim_clean']:.3f}  {time.time() - tic:.1f}s",
                        flush=True,
                    )
    result = {
        "summary": summarise(rows),
        "rows": rows,
        "settings": vars(args),
        "versions": versions(),
        "feature_network_accuracy": {k: v.accuracy for k, v in distances.items()},
        "clean_seed": CLEAN_SEED,
        "corruption_seed": CORRUPTION_SEED,
    }
    write_result(result, "code_restoration.py", argv, started, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
