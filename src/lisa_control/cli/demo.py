"""``lisa demo``: plain ControlNet vs LISA on the embedded pose task, from the shipped main
network, same seed and data order; writes ``report.md``, ``convergence.png`` and sample grids.

Defaults fit 2 CPU cores in about seven minutes; ``--device cuda --steps N`` scales it up. At the
default length the curves show the setup working, not the paper's claim: the convergence
benchmark (benchmarks/convergence.py, BENCHMARKS.md) is where speed-ups are measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..training.config import make_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="pose")
    # Sized for 2 CPU cores in under 10 minutes; lr 5e-4 makes the pose PCK climb within it
    # (at the benchmarks' 1e-4 it stays flat for the first 150 steps at this batch size).
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--eval_conditions", type=int, default=16)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--lisa_weight", type=float, default=0.2)
    p.add_argument("--lisa_layer", default=None)
    p.add_argument("--inference_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--output_dir", default="runs/demo")
    return p


def run_demo(args) -> dict:
    from ..training.train import train

    out = Path(args.output_dir)
    runs = {}
    for name, regularizer in (("plain", "none"), ("lisa", "lisa")):
        cfg = make_config(
            dict(
                task=args.task,
                pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                regularizer=regularizer,
                lisa_weight=args.lisa_weight,
                lisa_layer=args.lisa_layer,
                max_train_steps=args.steps,
                train_batch_size=args.train_batch_size,
                learning_rate=args.learning_rate,
                validation_steps=args.eval_every,
                validation_conditions=args.eval_conditions,
                validation_inference_steps=args.inference_steps,
                checkpointing_steps=args.steps,
                checkpoints_total_limit=1,
                report_to="none",
                seed=args.seed,
                device=args.device,
                output_dir=str(out / name),
                overwrite_output_dir=True,
            )
        )
        # A fresh directory per run: the demo compares two runs from scratch.
        for stale in ("loss_log.jsonl", "validation.jsonl"):
            (out / name / stale).unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"== {name}: {args.steps} steps on {args.task}")
        result = train(cfg)
        runs[name] = {
            "validation": result.validation,
            "seconds": time.perf_counter() - t0,
            "final_loss": result.losses[-1]["diffusion_loss"] if result.losses else None,
        }
    metric = _metric_name(args.task)
    write_report(out, runs, metric, args)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return runs


def _metric_name(task: str) -> str:
    from ..data.tasks import get_task

    return get_task(task).metric_name


def write_report(out: Path, runs: dict, metric: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        ax.plot(
            [v["step"] for v in run["validation"]],
            [v[metric] for v in run["validation"]],
            marker="o",
            label=name,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} on {args.eval_conditions} held-out conditions")
    ax.set_title(f"{args.task}: plain ControlNet vs LISA (lambda={args.lisa_weight})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=100)
    plt.close(fig)

    steps = [v["step"] for v in runs["plain"]["validation"]]
    lines = [
        f"# lisa demo: {args.task}",
        "",
        f"Plain ControlNet and LISA (lambda {args.lisa_weight}) trained for {args.steps} steps "
        f"from the same main network, seed {args.seed}, batch {args.train_batch_size}, "
        f"lr {args.learning_rate}; {metric} on {args.eval_conditions} held-out conditions, "
        f"{args.inference_steps} DPM-Solver steps.",
        "",
        f"| step | plain {metric} | LISA {metric} |",
        "|---:|---:|---:|",
    ]
    by_step = {n: {v["step"]: v[metric] for v in r["validation"]} for n, r in runs.items()}
    for s in steps:
        lines.append(
            f"| {s} | {by_step['plain'].get(s, float('nan')):.3f} | "
            f"{by_step['lisa'].get(s, float('nan')):.3f} |"
        )
    lines += [
        "",
        f"Wall clock: plain {runs['plain']['seconds']:.0f}s, LISA {runs['lisa']['seconds']:.0f}s.",
        "",
        "![convergence](convergence.png)",
        "",
        "Sample grids (condition | sample | ground truth) are in `plain/validation/` and "
        "`lisa/validation/`. A short CPU run shows the pipeline working; convergence claims are "
        "measured by `benchmarks/convergence.py` (see BENCHMARKS.md).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4 : 6 + len(steps)]))
    print(f"\nreport: {out / 'report.md'}")


def main(argv=None) -> None:
    run_demo(build_parser().parse_args(argv))
