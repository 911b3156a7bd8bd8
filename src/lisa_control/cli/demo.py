"""``lisa demo``: plain ControlNet vs LISA on an embedded task (``pose`` by default, or the
video task ``pose_video``), from the shipped main network, same seed and data order; writes
``report.md``, ``convergence.png`` and sample grids (animations for videos).

For a video task (one whose renders are clips) the demo also samples both final side networks
on the same held-out condition clips and writes ``preview.gif`` (condition | plain | LISA, one
row per clip) with its frame sheet ``preview_frames.png``.

Defaults fit 2 CPU cores in under ten minutes (``--task pose`` about seven); ``--device cuda
--steps N`` scales it up. At the default length the curves show the setup working, not the
paper's claim: the convergence benchmark (benchmarks/convergence.py, BENCHMARKS.md) is where
speed-ups are measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..training.config import make_config

# Sized for 2 CPU cores in under 10 minutes; lr 5e-4 makes the pose PCK climb within it
# (at the benchmarks' 1e-4 it stays flat for the first 150 steps at this batch size).
IMAGE_DEFAULTS = dict(
    steps=80, eval_every=20, eval_conditions=16, train_batch_size=16, learning_rate=5e-4,
    inference_steps=10,
)  # fmt: skip
# A clip costs its 8 frames, and the motion UNet more than the image UNet per frame: fewer
# steps of two clips, and four held-out clips.
VIDEO_DEFAULTS = dict(
    steps=120, eval_every=30, eval_conditions=4, train_batch_size=2, learning_rate=5e-4,
    inference_steps=10,
)  # fmt: skip
PREVIEW_CLIPS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="pose", help="pose (default), or pose_video for videos")
    default = "default: {} ({} for video tasks)".format
    for flag, kind in (
        ("steps", int), ("eval_every", int), ("eval_conditions", int),
        ("train_batch_size", int), ("learning_rate", float),
    ):  # fmt: skip
        p.add_argument(
            f"--{flag}", type=kind, default=None,
            help=default(IMAGE_DEFAULTS[flag], VIDEO_DEFAULTS[flag]),
        )  # fmt: skip
    p.add_argument("--lisa_weight", type=float, default=0.2)
    p.add_argument("--lisa_layer", default=None)
    p.add_argument(
        "--inference_steps", type=int, default=None,
        help=default(IMAGE_DEFAULTS["inference_steps"], VIDEO_DEFAULTS["inference_steps"]),
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--output_dir", default="runs/demo")
    return p


def renders_videos(task_name: str) -> bool:
    """Whether the task's samples are clips (video tasks have ``frames``)."""
    from ..data.tasks import get_task

    return getattr(get_task(task_name), "frames", None) is not None


def fill_defaults(args) -> argparse.Namespace:
    """The flags left unset take the image or the video defaults, by the task."""
    defaults = VIDEO_DEFAULTS if renders_videos(args.task) else IMAGE_DEFAULTS
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    return args


def run_demo(args) -> dict:
    from ..training.train import train

    args = fill_defaults(args)
    video = renders_videos(args.task)
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
            "loss_weighting": cfg.loss_weighting,  # as the run resolved it
        }
    metric = _metric_name(args.task)
    preview = write_preview(out, args) if video else None
    write_report(out, runs, metric, args, preview)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return runs


def write_preview(out: Path, args) -> Path:
    """``preview.gif`` and ``preview_frames.png``: the first held-out condition clips (those
    validation scores), each with the final plain and LISA side networks' samples from the same
    noise, condition | plain | LISA."""
    import torch

    from ..data.tasks import get_task
    from ..eval.generate import SideNetworkSampler
    from ..eval.validation import held_out_task_samples
    from ..eval.video import video_to_uint8, write_animation
    from ..families.loading import load_main_model

    model = load_main_model(args.pretrained_model_name_or_path, args.task)
    task = get_task(args.task, resolution=model.resolution)
    held_out = held_out_task_samples(task, min(PREVIEW_CLIPS, args.eval_conditions), args.seed)
    # (F, H, W, C) uint8 -> (C, F, H, W) in [0, 1]
    conditions = torch.stack(
        [torch.from_numpy(s.condition).movedim(-1, 0).float() / 255 for s in held_out]
    )
    columns = [video_to_uint8(conditions, signed=False)]
    for name in ("plain", "lisa"):
        sampler = SideNetworkSampler(
            model, out / name / "controlnet", num_inference_steps=args.inference_steps,
            device=args.device,
        )  # fmt: skip
        videos = sampler(conditions, [""] * len(held_out), seed=args.seed)
        columns.append(video_to_uint8(videos))
    rows = [list(clips) for clips in zip(*columns)]
    gif, _ = write_animation(rows, out / "preview.gif", out / "preview_frames.png")
    print(f"preview (condition | plain | LISA): {gif}")
    return gif


def _metric_name(task: str) -> str:
    from ..data.tasks import get_task

    return get_task(task).metric_name


def write_report(out: Path, runs: dict, metric: str, args, preview: Path | None = None) -> None:
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
        f"lr {args.learning_rate}, both with `lisa train`'s default loss weighting "
        f"({runs['plain']['loss_weighting']}); {metric} on {args.eval_conditions} "
        "held-out conditions, "
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
    if preview is not None:
        # Video tasks score more than the curve shows (temporal consistency above all).
        lines += ["", *map(_final_scores, runs, runs.values())]
        lines += [
            "",
            f"![condition | plain | LISA]({preview.name})",
            "",
            f"`{preview.name}`: condition | plain | LISA, one row per held-out clip, sampled "
            f"after the last step from the same noise; the frames side by side are in "
            f"`{preview.stem}_frames.png`, and every validation's clips in `plain/validation/` "
            "and `lisa/validation/`.",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4 : 6 + len(steps)]))
    print(f"\nreport: {out / 'report.md'}")


def _final_scores(name: str, run: dict) -> str:
    """One line: the run's scores at its last validation."""
    if not run["validation"]:
        return f"- {name}: not validated"
    last = run["validation"][-1]
    scores = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "step")
    return f"- {name} at step {last['step']}: {scores}"


def main(argv=None) -> None:
    run_demo(build_parser().parse_args(argv))
