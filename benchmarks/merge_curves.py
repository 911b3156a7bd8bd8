"""Merge the runs of several ``convergence.py`` result files into one, for ``--from_json``.

Runs that shared a GPU in different commands still share seeds and data order, so their curves
compare in steps. Each variant is taken from the first file that has it; ``--max_step`` cuts
every curve at a step that all runs reached, so that "plain's value at the last common
evaluation" is the same step for every variant.

    python benchmarks/merge_curves.py benchmarks/results/convergence_weightings_seg_edges.json \
        benchmarks/results/convergence_lisa_fraction.json --tasks segmentation edges \
        --max_step 300 --out benchmarks/results/convergence_lisa_fraction_merged.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(paths: list[Path], tasks: list[str], max_step: int | None) -> dict:
    files = [json.loads(p.read_text()) for p in paths]
    merged = {"tasks": {}, "command": "  +  ".join(f["command"] for f in files)}
    for task in tasks:
        variants: dict = {}
        for f in files:
            for name, runs in f["tasks"].get(task, {}).get("variants", {}).items():
                variants.setdefault(name, runs)
        if not variants:
            raise SystemExit(f"no file has task {task!r}")
        if max_step is not None:
            variants = {name: [cut(run, max_step) for run in runs] for name, runs in variants.items()}
        merged["tasks"][task] = {"variants": variants}
    return merged


def cut(run: dict, max_step: int) -> dict:
    """The run with every per-step series (lists of [step, value]) cut at ``max_step``."""
    out = dict(run)
    for key, value in run.items():
        if isinstance(value, list) and value and isinstance(value[0], list) and len(value[0]) == 2:
            out[key] = [point for point in value if int(point[0]) <= max_step]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--max_step", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.write_text(json.dumps(merge(args.inputs, args.tasks, args.max_step)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
