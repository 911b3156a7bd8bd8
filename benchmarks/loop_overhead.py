"""What the training loop costs around the step: ``lisa train`` end to end on the shipped 32 px
pose network, per variant and per source tree, alone on the device.

Each run is ``python -m lisa_control train --task pose`` in a subprocess whose PYTHONPATH names
one source tree, so two versions of the code (before and after a change of the loop) are timed
on the same machine in one command. Validation and checkpoints are off; the seconds per step
are read back from the run's ``loss_log.jsonl`` (``step_seconds``) over the steps after
``--warmup``: their mean is the throughput (host and device overlap, so a single step's time
is not meaningful when the loop does not wait for the device), their median is reported beside.
Runs alternate between trees and repeat ``--repeats`` times, so drift of the machine hits all.
Trees run with their own defaults: a tree that weights the diffusion loss in x0 space by default
computes another loss than one that does not (the same step cost; the final losses then differ).

GPU run (a few minutes):

    python benchmarks/loop_overhead.py --trees before=.old/src:plain,lisa after=src \
        --variants plain lisa lisa_f0.25 --steps 600 --warmup 100 --batch-size 64 --repeats 3 \
        --out benchmarks/results/loop_overhead.json

CPU smoke run: ``--steps 6 --warmup 2 --batch-size 2 --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import write_result  # noqa: E402

VARIANTS = {
    "plain": ["--regularizer", "none"],
    "lisa": ["--regularizer", "lisa"],
    "lisa_f0.25": ["--regularizer", "lisa", "--lisa_batch_fraction", "0.25"],
}


def run_once(tree: Path, variant: str, args, out: Path) -> dict:
    argv = [
        sys.executable, "-m", "lisa_control", "train", "--task", "pose",
        "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-4", "--validation_steps", "0", "--checkpointing_steps",
        str(10 * args.steps), "--report_to", "none", "--no-progress", "--seed", "0",
        "--output_dir", str(out), *VARIANTS[variant], *args.extra,
    ]
    # The tree first, then whatever the caller's path holds (packages carried to a device).
    path = [str(tree.resolve()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    started = time.time()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} on {tree} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    seconds = [r["step_seconds"] for r in records if r["step"] > args.warmup]
    steps = [r["step"] for r in records if r["step"] > args.warmup]
    # Records may close a window of several steps: seconds per step is window time / width.
    widths = [b - a for a, b in zip([args.warmup, *steps[:-1]], steps)]
    per_step = [s / w for s, w in zip(seconds, widths)]
    return {
        "mean_step_seconds": sum(seconds) / (steps[-1] - args.warmup),
        "median_step_seconds": statistics.median(per_step),
        "final_loss": records[-1]["loss"],
        "process_seconds": time.time() - started,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--trees",
        nargs="+",
        required=True,
        help="NAME=PATH of a src/ folder, optionally :VARIANT,... to run only those on it",
    )
    p.add_argument("--variants", nargs="+", default=["plain", "lisa"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `lisa train` flags")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    trees, only = {}, {}
    for item in args.trees:
        name, rest = item.split("=", 1)
        trees[name], _, listed = rest.partition(":")
        only[name] = listed.split(",") if listed else args.variants
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in args.variants:
                for name, tree in trees.items():
                    if variant not in only[name]:
                        continue
                    out = Path(tmp) / f"{name}-{variant}-{repeat}"
                    result = run_once(Path(tree), variant, args, out)
                    runs.append({"tree": name, "variant": variant, "repeat": repeat, **result})
                    print(json.dumps(runs[-1]), flush=True)
    summary = {"runs": runs, "mean_step_seconds": {}}
    for name in trees:
        for variant in args.variants:
            values = [r["mean_step_seconds"] for r in runs
                      if r["tree"] == name and r["variant"] == variant]
            if values:
                summary["mean_step_seconds"][f"{name}/{variant}"] = statistics.median(values)
    table = summary["mean_step_seconds"]
    for name in trees:
        for variant in args.variants:
            if variant != "plain" and f"{name}/plain" in table and f"{name}/{variant}" in table:
                summary.setdefault("over_plain", {})[f"{name}/{variant}"] = (
                    table[f"{name}/{variant}"] / table[f"{name}/plain"]
                )
    names = list(trees)
    if len(names) == 2:
        summary["second_over_first"] = {
            v: table[f"{names[1]}/{v}"] / table[f"{names[0]}/{v}"]
            for v in args.variants
            if f"{names[0]}/{v}" in table and f"{names[1]}/{v}" in table
        }
    write_result(summary, "loop_overhead.py", argv, started, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
