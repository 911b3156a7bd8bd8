"""Convergence benchmark: plain ControlNet vs LISA (and variants) from the same main network,
same data order, several seeds; fidelity of samples on held-out conditions every K steps.

Every run is an ordinary ``lisa train`` command (the CLI, not a separate code path), started as
a subprocess; several run side by side on one GPU because the embedded models are small. The
summary reports, per task and variant:

* the fidelity curve (mean and spread over seeds) and its PNG,
* speed-up = steps for plain to reach its own final fidelity / steps for the variant to reach
  it (per seed; "final" = mean of plain's last three evaluations; a curve "reaches" a level when
  the running mean of three evaluations first gets there),
* fidelity of every variant at fixed step budgets,
* wall-clock per step (each run's median ``step_seconds``) and, from it, the time to plain's
  final level in seconds next to the steps (``plain_seconds`` / ``variant_seconds``, steps to
  the level times the run's seconds per step; ``speedup_seconds`` is their ratio, the
  wall-clock speed-up; ``speedup_interpolated_seconds`` the same for the interpolated
  measure). Runs that share a GPU slow each other down, so these compare runs launched
  together under the same load,
* the LISA aux-loss ratio over training,
* the task-feature Fréchet distance at the budgets, when the runs log it
  (``--set validation_feature_distance=``): ``feature_distance``, or for a video task such as
  ``pose_video`` the task-feature video Fréchet distance, ``video_feature_distance``; the key is
  recorded as ``feature_distance_metric``.

Each task trains on the main network ``--main TASK=DIR`` names, else the one
:data:`MAIN_NETWORKS` lists for it, else the shipped one ``lisa train`` picks for the task. A video
task's fidelity metric is the task's own (``pose_video``: PCK over every frame).

Example (the command behind BENCHMARKS.md's numbers is recorded in each result file):

    python benchmarks/convergence.py --tasks pose --seeds 0 1 2 --steps 2000 --eval_every 100 \
        --variants plain lisa --set learning_rate=1e-5 train_batch_size=64 --parallel 6 \
        --out benchmarks/results/convergence_pose.json
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

# Main network per task where `lisa train --task T` alone does not pick the one to benchmark;
# `--main TASK=DIR` overrides it.
MAIN_NETWORKS = {"pose_video": "embedded:pose_video"}

# Variants are flag sets of `lisa train`; anything a user can run, the benchmark can compare.
VARIANTS = {
    "plain": {"regularizer": "none"},
    "lisa": {"regularizer": "lisa"},
    "lisa_w0.05": {"regularizer": "lisa", "lisa_weight": 0.05},
    "lisa_w1": {"regularizer": "lisa", "lisa_weight": 1.0},
    "lisa_w5": {"regularizer": "lisa", "lisa_weight": 5.0},
    "lisa_cosine": {"regularizer": "lisa", "lisa_distance": "cosine"},
    "lisa_mid": {"regularizer": "lisa", "lisa_layer": "mid"},
    "lisa_t_high": {"regularizer": "lisa", "lisa_timestep_range": "500 1000"},
    "lisa_x0": {"regularizer": "lisa", "lisa_target": "x0"},
    "lisa_score": {"regularizer": "lisa", "lisa_target": "score"},
    # "large early, decaying": 5 -> 0.2 and 1 -> 0.2 over the first 500 steps
    "lisa_w5_decay": {
        "regularizer": "lisa",
        "lisa_weight": 5.0,
        "lisa_final_weight": 0.2,
        "lisa_weight_decay_steps": 500,
    },
    "lisa_w1_decay": {
        "regularizer": "lisa",
        "lisa_weight": 1.0,
        "lisa_final_weight": 0.2,
        "lisa_weight_decay_steps": 500,
    },
    # the two variants ahead on segmentation (BENCHMARKS.md 1c), together
    "lisa_t_high_w1": {
        "regularizer": "lisa",
        "lisa_weight": 1.0,
        "lisa_timestep_range": "500 1000",
    },
    # the decoder trained faster than a side network at lr 1e-5 (BENCHMARKS.md 1d)
    "lisa_dec_lr1e-4": {"regularizer": "lisa", "lisa_decoder_learning_rate": 1e-4},
    "lisa_dec_lr1e-3": {"regularizer": "lisa", "lisa_decoder_learning_rate": 1e-3},
    # the prior, the decoder and the aux loss on part of each batch (the first ceil(f B) rows)
    "lisa_f0.5": {"regularizer": "lisa", "lisa_batch_fraction": 0.5},
    "lisa_f0.25": {"regularizer": "lisa", "lisa_batch_fraction": 0.25},
    # lisa_t_high's loss, with the prior computed only for the rows with t in [500, 1000)
    "lisa_t500_f": {
        "regularizer": "lisa",
        "lisa_timestep_range": "500 1000",
        "lisa_subset": "timestep",
    },
}
# Every zero projection of the tiny UNets' ControlNets (down_0 .. down_8; mid is above).
VARIANTS.update(
    {f"lisa_down_{k}": {"regularizer": "lisa", "lisa_layer": f"down_{k}"} for k in range(9)}
)
# Noise-level weightings of the diffusion loss, alone and under LISA.
VARIANTS.update(
    {
        "x0": {"regularizer": "none", "loss_weighting": "x0"},
        "min_snr": {"regularizer": "none", "loss_weighting": "min_snr"},
        "x0_lisa": {"regularizer": "lisa", "loss_weighting": "x0"},
        "min_snr_lisa": {"regularizer": "lisa", "loss_weighting": "min_snr"},
    }
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["pose"])
    p.add_argument("--variants", nargs="+", default=["plain", "lisa"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_conditions", type=int, default=64)
    p.add_argument("--eval_inference_steps", type=int, default=20)
    p.add_argument("--budgets", type=int, nargs="*", default=None)
    p.add_argument(
        "--main",
        nargs="*",
        default=[],
        help="TASK=DIR main network per task (default: MAIN_NETWORKS, else the shipped one)",
    )
    p.add_argument(
        "--set", nargs="*", default=[], help="extra `lisa train` flags as key=value (the regime)"
    )
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--workers_per_run", type=int, default=2)
    p.add_argument("--run_dir", default="runs/convergence")
    p.add_argument("--out", default="benchmarks/results/convergence.json")
    p.add_argument("--summarize_only", action="store_true")
    p.add_argument(
        "--from_json",
        default=None,
        help="re-analyse the curves stored in an earlier result file (implies --summarize_only)",
    )
    p.add_argument(
        "--deadline_s",
        type=float,
        default=None,
        help="stop runs still going after this long and summarize the evaluations they made",
    )
    return p


def run_flags(args, task, variant, seed) -> list[str]:
    flags = {
        "task": task,
        "seed": seed,
        "max_train_steps": args.steps,
        "validation_steps": args.eval_every,
        "validation_conditions": args.eval_conditions,
        "validation_inference_steps": args.eval_inference_steps,
        "checkpointing_steps": args.steps,
        "checkpoints_total_limit": 1,
        "dataloader_num_workers": args.workers_per_run,
        "report_to": "none",
        "output_dir": str(Path(args.run_dir) / task / variant / f"seed{seed}"),
        # The papers' unweighted loss unless a variant names a weighting: "plain" and "lisa"
        # are the recipes the papers compare (lisa train's own default weighting is x0).
        "loss_weighting": "none",
    }
    main_network = main_networks(args).get(task)
    if main_network is not None:
        flags["pretrained_model_name_or_path"] = main_network
    for item in args.set:
        key, value = item.split("=", 1)
        flags[key] = value
    flags.update(VARIANTS[variant])
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", *str(value).split()]
    return argv + ["--no-progress", "--overwrite_output_dir"]


def main_networks(args) -> dict[str, str]:
    """Task -> main network: :data:`MAIN_NETWORKS` with ``--main TASK=DIR`` on top."""
    given = {}
    for item in args.main:
        task, sep, folder = item.partition("=")
        if not (sep and task and folder):
            raise SystemExit(f"--main {item!r}: write TASK=DIR, e.g. pose_video=models/motion")
        given[task] = folder
    return {**MAIN_NETWORKS, **given}


def launch_all(args) -> None:
    jobs = [(t, v, s) for s in args.seeds for t in args.tasks for v in args.variants]
    running: list[tuple[subprocess.Popen, tuple]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    while jobs or running:
        if args.deadline_s and time.time() - start > args.deadline_s:
            for proc, job in running:
                proc.terminate()
                print(f"deadline: stopped {job}", flush=True)
            for proc, _ in running:
                proc.wait()
            if jobs:
                print(f"deadline: {len(jobs)} runs never started", flush=True)
            return
        while jobs and len(running) < args.parallel:
            job = jobs.pop(0)
            flags = run_flags(args, *job)
            run_dir = Path(flags[flags.index("--output_dir") + 1])
            for stale in ("loss_log.jsonl", "validation.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "stdout.txt").open("w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "lisa_control", "train", *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            running.append((proc, job))
            print(f"started {job}", flush=True)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                print(f"finished {job} rc={proc.returncode}", flush=True)
        time.sleep(1)


def reach_step(curve: list[tuple[int, float]], level: float) -> int | None:
    values = [v for _, v in curve]
    for i in range(len(curve)):
        window = values[max(0, i - 2) : i + 1]
        # The tolerance keeps plain's own last window from missing its mean by a rounding.
        if sum(window) / len(window) >= level - 1e-9 * abs(level):
            return curve[i][0]
    return None


def task_metrics(task: str) -> tuple[str, str]:
    """(fidelity metric, feature-distance key) that validation logs for ``task``."""
    from lisa_control.data.tasks import get_task
    from lisa_control.eval.feature_distance import feature_distance_name

    task = get_task(task)
    return task.metric_name, feature_distance_name(task)


def collect_runs(args, task: str) -> dict[str, list[dict]]:
    """Per variant, the runs' curves and logs read from their output folders."""
    metric, distance = task_metrics(task)
    per_variant = {}
    for variant in args.variants:
        runs = []
        for seed in args.seeds:
            run_dir = Path(args.run_dir) / task / variant / f"seed{seed}"
            vpath, lpath = run_dir / "validation.jsonl", run_dir / "loss_log.jsonl"
            if not vpath.is_file():
                continue
            evals = [json.loads(x) for x in vpath.read_text().splitlines()]
            losses = [json.loads(x) for x in lpath.read_text().splitlines()]
            runs.append(
                {
                    "seed": seed,
                    "curve": [(e["step"], e[metric]) for e in evals],
                    "feature_distance_curve": [
                        (e["step"], e[distance]) for e in evals if distance in e
                    ],
                    "evals": evals,
                    "aux_loss_ratio": [
                        (r["step"], r["aux_loss_ratio"])
                        for r in losses
                        if "aux_loss_ratio" in r and r["step"] % args.eval_every == 0
                    ],
                    "diffusion_loss_last100": statistics.fmean(
                        r["diffusion_loss"] for r in losses[-100:]
                    ),
                    "seconds_per_step": median_step_seconds(losses),
                }
            )
        per_variant[variant] = runs
    return per_variant


def interpolated_reach(curve: list[tuple[int, float]], level: float) -> float | None:
    """First step at which the piecewise-linear curve reaches ``level``."""
    for (s0, v0), (s1, v1) in zip([(0, curve[0][1])] + curve[:-1], curve):
        if v1 >= level:
            return s1 if v1 == v0 or v0 >= level else s0 + (s1 - s0) * (level - v0) / (v1 - v0)
    return None


def compare_to_plain(ref: dict, run: dict) -> dict | None:
    """Speed-up of one run over the plain run of its seed, over the steps both reached.

    ``speedup``: steps for plain to reach its own final level (mean of its last three evals; a
    curve reaches a level when the running mean of three evals first gets there) / steps for
    the variant. That needs plain to have levelled off; while plain is still climbing at the
    last common step the ratio is 1 by construction, so ``speedup_interpolated`` also reports
    the ratio of the first (linearly interpolated) steps at which each curve reaches plain's
    value at the last common step, and ``mean_gain`` the mean metric difference (variant -
    plain) at the common evaluation steps.

    Seconds next to steps: ``plain_seconds`` / ``variant_seconds`` are the steps to plain's
    final level times each run's ``seconds_per_step`` (None where a run logged no step time),
    ``speedup_seconds`` their ratio, and ``speedup_interpolated_seconds`` the interpolated
    speed-up in wall-clock time."""
    steps = sorted(set(dict(ref["curve"])) & set(dict(run["curve"])))
    if len(steps) < 3:
        return None
    ref_d, run_d = dict(ref["curve"]), dict(run["curve"])
    ref_curve = [(s, ref_d[s]) for s in steps]
    var_curve = [(s, run_d[s]) for s in steps]
    final = statistics.fmean(v for _, v in ref_curve[-3:])
    s_plain, s_var = reach_step(ref_curve, final), reach_step(var_curve, final)
    last = ref_curve[-1][1]
    i_plain, i_var = interpolated_reach(ref_curve, last), interpolated_reach(var_curve, last)
    plain_rate, var_rate = ref.get("seconds_per_step"), run.get("seconds_per_step")

    def seconds(steps, rate):
        return None if steps is None or rate is None else steps * rate

    def ratio(a, b):
        return a / b if a is not None and b else None

    t_plain, t_var = seconds(s_plain, plain_rate), seconds(s_var, var_rate)
    return {
        "seed": run["seed"],
        "steps_compared": steps[-1],
        "plain_final": final,
        "plain_steps": s_plain,
        "variant_steps": s_var,
        "plain_seconds": t_plain,
        "variant_seconds": t_var,
        "speedup": (s_plain / s_var) if s_var else None,
        "speedup_seconds": ratio(t_plain, t_var),
        "speedup_interpolated": (i_plain / i_var) if i_var else None,
        "speedup_interpolated_seconds": ratio(
            seconds(i_plain, plain_rate), seconds(i_var, var_rate)
        ),
        "mean_gain": statistics.fmean(run_d[s] - ref_d[s] for s in steps),
    }


def _spread(values):
    reached = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(reached) if reached else None,
        "stdev": statistics.stdev(reached) if len(reached) > 1 else None,
        "not_reached": sum(v is None for v in values),
    }


def analyse(
    task: str, metric: str, per_variant: dict, budgets: list[int], distance="feature_distance"
) -> dict:
    plain = {r["seed"]: r for r in per_variant.get("plain", [])}
    speedups = {}
    for variant, runs in per_variant.items():
        if variant == "plain":
            continue
        pairs = [(plain[r["seed"]], r) for r in runs if r["seed"] in plain]
        ratios = [c for c in (compare_to_plain(a, b) for a, b in pairs) if c is not None]
        speedups[variant] = {
            "per_seed": ratios,
            **_spread([x["speedup"] for x in ratios]),
            "interpolated": _spread([x["speedup_interpolated"] for x in ratios]),
            "wall_clock": _spread([x["speedup_seconds"] for x in ratios]),
            "wall_clock_interpolated": _spread([x["speedup_interpolated_seconds"] for x in ratios]),
            "mean_gain": _spread([x["mean_gain"] for x in ratios]),
        }

    def at(key):
        return {
            variant: {
                str(b): _mean_sd([dict(r.get(key, [])).get(b) for r in runs]) for b in budgets
            }
            for variant, runs in per_variant.items()
        }

    return {
        "metric": metric,
        "feature_distance_metric": distance,
        "variants": per_variant,
        "speedup_vs_plain": speedups,
        "at_budget": at("curve"),
        "feature_distance_at_budget": at("feature_distance_curve"),
    }


def summarize(args) -> dict:
    budgets = args.budgets or sorted({args.steps // 4, args.steps // 2, args.steps})
    summary = {"tasks": {}}
    for task in args.tasks:
        if args.from_json:
            per_variant = json.loads(Path(args.from_json).read_text())["tasks"][task]["variants"]
        else:
            per_variant = collect_runs(args, task)
        metric, distance = task_metrics(task)
        summary["tasks"][task] = analyse(task, metric, per_variant, budgets, distance)
    return summary


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def median_step_seconds(losses: list[dict]) -> float | None:
    """Median wall time of one step from the loss log. The median, because the steps that ran a
    validation or saved a checkpoint carry that time too; the loss log, because it survives a
    run stopped at the deadline."""
    times = [r["step_seconds"] for r in losses if "step_seconds" in r]
    return statistics.median(times) if times else None


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        info = summary["tasks"][task]
        for variant, runs in info["variants"].items():
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            rows = [[dict(r["curve"]).get(s) for r in runs] for s in steps]
            mean = [statistics.fmean(v for v in row if v is not None) for row in rows]
            lo = [min(v for v in row if v is not None) for row in rows]
            hi = [max(v for v in row if v is not None) for row in rows]
            ax.plot(steps, mean, label=f"{variant} (n={len(runs)})")
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(info["metric"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    if not (args.summarize_only or args.from_json):
        launch_all(args)
    summary = summarize(args)
    out = write_result(summary, "convergence.py", argv, t0, args.out, args.from_json)
    plot(summary, out.with_suffix(".png"))
    for task, info in summary["tasks"].items():
        for variant, s in info["speedup_vs_plain"].items():
            mean = "n/a" if s["mean"] is None else f"{s['mean']:.2f}"
            sd = "" if s["stdev"] is None else f" +- {s['stdev']:.2f}"
            print(f"{task:18s} {variant:12s} speed-up {mean}{sd} (not reached: {s['not_reached']})")
            i, g = s["interpolated"], s["mean_gain"]
            if i["mean"] is not None:
                print(f"{task:18s} {variant:12s} interpolated speed-up {i['mean']:.2f}")
            for key, label in (("wall_clock", ""), ("wall_clock_interpolated", "interpolated ")):
                w = s[key]
                if w["mean"] is not None:
                    print(
                        f"{task:18s} {variant:12s} {label}wall-clock speed-up {w['mean']:.2f} "
                        f"(not reached: {w['not_reached']})"
                    )
            if g["mean"] is not None:
                print(f"{task:18s} {variant:12s} mean {info['metric']} gain {g['mean']:+.4f}")
        for variant, budgets in info["at_budget"].items():
            cells = "  ".join(
                f"{b}: " + ("-" if v is None else format(v["mean"], ".3f"))
                for b, v in budgets.items()
            )
            print(f"{task:18s} {variant:12s} {info['metric']} at {cells}")
        for variant, budgets in info["feature_distance_at_budget"].items():
            cells = "  ".join(
                f"{b}: " + ("-" if v is None else format(v["mean"], ".3g"))
                for b, v in budgets.items()
            )
            name = info["feature_distance_metric"].replace("_", " ")
            print(f"{task:18s} {variant:12s} {name} at {cells}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
