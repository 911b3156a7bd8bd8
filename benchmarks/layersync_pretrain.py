"""LayerSync benchmark: pretrain the same main network with and without LayerSync, same seed and
data, and compare sample quality against steps.

Every run is an ordinary ``lisa pretrain`` command; the runs of one architecture go side by side on
one GPU with identical flags except ``--regularizer``. Quality is read from each run's
``curve.jsonl``: the task-feature Fréchet distance (lower is better; see
``lisa_control.eval.feature_distance``, not Inception FID) and the task's own realism statistic
(higher is better). The summary reports, per architecture and metric,

* both curves, and their PNG,
* steps-to-same-quality = steps the baseline needs to reach its own final quality (mean of its
  last two evaluations) / steps LayerSync needs to reach it (compared over the steps both runs
  made), so > 1 means LayerSync is faster.

Example (the command behind BENCHMARKS.md is recorded in the result file):

    python benchmarks/layersync_pretrain.py --architectures dit unet --time_budget_s 420 \\
        --out benchmarks/results/layersync_pretrain.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_result

ARCHITECTURE_FLAGS = {
    "unet": ["--architecture", "unet"],
    "dit": ["--architecture", "dit"],
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="pose")
    p.add_argument("--architectures", nargs="+", default=["dit", "unet"])
    p.add_argument("--max_train_steps", type=int, default=4000)
    p.add_argument("--time_budget_s", type=float, default=420)
    p.add_argument("--sample_every", type=int, default=250)
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="extra `lisa pretrain` flags, key=value")
    p.add_argument("--run_dir", default="runs/layersync_pretrain")
    p.add_argument("--out", default="benchmarks/results/layersync_pretrain.json")
    p.add_argument("--summarize_only", action="store_true")
    p.add_argument("--from_json", default=None, help="re-analyse an earlier result file")
    return p


def run_argv(args, architecture: str, regularizer: str) -> list[str]:
    argv = [
        "--task", args.task,
        *ARCHITECTURE_FLAGS[architecture],
        "--regularizer", regularizer,
        "--max_train_steps", str(args.max_train_steps),
        "--time_budget_s", str(args.time_budget_s),
        "--sample_every", str(args.sample_every),
        "--num_samples", str(args.num_samples),
        "--seed", str(args.seed),
        "--train_size", "40000",
        "--train_batch_size", "256",
        "--mixed_precision", "bf16",
        "--num_workers", "2",
        "--output_dir", str(Path(args.run_dir) / architecture / regularizer),
    ]  # fmt: skip
    for item in args.set:
        key, value = item.split("=", 1)
        argv += [f"--{key}", *value.split()]
    return argv


def launch(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    procs = []
    for architecture in args.architectures:
        for regularizer in ("none", "layersync"):
            argv = run_argv(args, architecture, regularizer)
            out = Path(argv[argv.index("--output_dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "stdout.txt").open("w")
            cmd = [sys.executable, "-m", "lisa_control", "pretrain", *argv]
            procs.append(
                (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out)
            )
    for proc, out in procs:
        print(f"{out}: rc={proc.wait()}", flush=True)


def reach_step(curve, level, lower_is_better):
    for step, value in curve:
        if (value <= level) if lower_is_better else (value >= level):
            return step
    return None


def compare(base, other, lower_is_better):
    """Steps-to-same-quality over the evaluation steps both runs made (a time budget may stop
    them at different steps)."""
    base_d, other_d = dict(base), dict(other)
    steps = sorted(set(base_d) & set(other_d))
    if len(steps) < 2:
        return None
    base = [(s, base_d[s]) for s in steps]
    other = [(s, other_d[s]) for s in steps]
    final = sum(v for _, v in base[-2:]) / 2
    s_base = reach_step(base, final, lower_is_better)
    s_other = reach_step(other, final, lower_is_better)
    return {
        "steps_compared": steps[-1],
        "baseline_final": final,
        "baseline_steps": s_base,
        "layersync_steps": s_other,
        "speedup": s_base / s_other if s_other and s_base else None,
        "baseline_at_last_common_step": base[-1][1],
        "layersync_at_last_common_step": other[-1][1],
    }


def summarize(args) -> dict:
    summary = {"task": args.task, "architectures": {}}
    for architecture in args.architectures:
        runs = {}
        for regularizer in ("none", "layersync"):
            if args.from_json:
                stored = json.loads(Path(args.from_json).read_text())["architectures"]
                points = stored[architecture]["runs"][regularizer]["curve"]
            else:
                path = Path(args.run_dir) / architecture / regularizer / "curve.jsonl"
                lines = path.read_text().splitlines() if path.exists() else []
                points = [json.loads(x) for x in lines]
            runs[regularizer] = {
                "curve": points,
                "steps": points[-1]["step"] if points else 0,
                "seconds_per_step": points[-1]["seconds"] / points[-1]["step"] if points else None,
            }
        metrics = {
            "feature_distance": lambda p: p["feature_distance"][args.task],
            "realism": lambda p: p["realism"][args.task],
        }
        comparison = {}
        for name, read in metrics.items():
            base = [(p["step"], read(p)) for p in runs["none"]["curve"]]
            other = [(p["step"], read(p)) for p in runs["layersync"]["curve"]]
            comparison[name] = compare(base, other, lower_is_better=name == "feature_distance")
        summary["architectures"][architecture] = {"runs": runs, "comparison": comparison}
    return summary


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(summary["architectures"])
    fig, axes = plt.subplots(2, len(archs), figsize=(5 * len(archs), 7), squeeze=False)
    task = summary["task"]
    for col, arch in enumerate(archs):
        for regularizer, run in summary["architectures"][arch]["runs"].items():
            steps = [p["step"] for p in run["curve"]]
            axes[0][col].plot(steps, [p["feature_distance"][task] for p in run["curve"]],
                              label=regularizer)  # fmt: skip
            axes[1][col].plot(steps, [p["realism"][task] for p in run["curve"]], label=regularizer)
        axes[0][col].set_title(f"{arch} on {task}")
        axes[0][col].set_ylabel("task-feature Fréchet distance")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("realism")
        axes[1][col].set_xlabel("step")
        axes[0][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    if not (args.summarize_only or args.from_json):
        launch(args)
    summary = summarize(args)
    out = write_result(summary, "layersync_pretrain.py", argv, t0, args.out, args.from_json)
    plot(summary, out.with_suffix(".png"))
    for arch, info in summary["architectures"].items():
        for metric, c in info["comparison"].items():
            if c is None:
                print(f"{arch:5s} {metric:16s} too few evaluations to compare")
                continue
            speed = "not reached" if c["speedup"] is None else f"{c['speedup']:.2f}x"
            print(
                f"{arch:5s} {metric:16s} baseline final {c['baseline_final']:.4g} at step "
                f"{c['baseline_steps']} of {c['steps_compared']}; LayerSync reaches it at "
                f"{c['layersync_steps']} -> {speed}"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
