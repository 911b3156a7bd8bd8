"""Composition benchmark: pose and segmentation side networks on the two-condition task
(``pose_segmentation``: a stick figure in front of a segmented background), trained apart and
composed, or trained together; plain ControlNets against LISA; several seeds.

Per seed and regularizer (``plain``: ``--regularizer none``; ``lisa``), three ``lisa train`` runs
(ordinary CLI runs, as in ``convergence.py``) from one main network:

* ``pose``: one side network on the task's pose view (``--conditioning_image_column pose``);
* ``segmentation``: one on its segmentation view;
* ``joint``: both conditions in one run (one side network per condition, trained together).

Then, on held-out conditions of the task (the same for every run of a seed), samples from:

* ``prior``: the main network alone;
* ``pose_alone`` / ``segmentation_alone``: one separately trained network;
* ``composed``: the two separately trained networks composed (residuals summed);
* ``joint_composed``: the jointly trained pair; ``joint_pose_alone`` / ``joint_segmentation_alone``:
  one of them alone.

each scored by both metrics (PCK of the figure, mIoU of the background outside it, and their mean
``fidelity``). The summary reports, per regularizer, every setting's scores (mean and sd over
seeds), the interference each network suffers from the other (``pck(pose_alone) - pck(composed)``
and ``miou(segmentation_alone) - miou(composed)``), the gain of joint over separate training
(``joint_composed - composed``), and the paired differences LISA - plain of all of these. The raw
per-seed scores, the runs' validation curves and the command go into the JSON (``provenance``).

Example (GPU; the command of a result is recorded in its file):

    python benchmarks/composition.py --seeds 0 1 2 --steps 2000 --eval_every 200 \
        --eval_conditions 64 --eval_inference_steps 10 --pretrain_steps 3000 \
        --set learning_rate=1e-4 train_batch_size=64 --parallel 6 --workers_per_run 1 \
        --run_dir runs/composition --out benchmarks/results/composition.json

A CPU smoke run (minutes; the numbers mean nothing):

    python benchmarks/composition.py --seeds 0 1 --steps 2 --eval_every 2 --eval_conditions 4 \
        --eval_inference_steps 2 --resolution 16 --pretrain_steps 2 --pretrain_set \
        train_size=64 train_batch_size=8 "block_out_channels=16 32" layers_per_block=1 \
        sample_every=1000 num_samples=4 sample_steps=2 --set train_batch_size=2 --parallel 1 \
        --workers_per_run 0 --device cpu --run_dir /tmp/composition --out /tmp/composition.json

Without ``--main``, the main network is made first: ``lisa pretrain --task pose_segmentation``
from the shipped pose network (``--init_from embedded:pose``) for ``--pretrain_steps`` steps.
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

import torch
from convergence import _mean_sd, median_step_seconds
from provenance import write_result

TASK = "pose_segmentation"
REGULARIZERS = {"plain": "none", "lisa": "lisa"}
# run name -> --conditioning_image_column of `lisa train`
RUNS = {"pose": ["pose"], "segmentation": ["segmentation"], "joint": ["pose", "segmentation"]}
SETTINGS = (
    "prior",
    "pose_alone",
    "segmentation_alone",
    "composed",
    "joint_pose_alone",
    "joint_segmentation_alone",
    "joint_composed",
)
METRICS = ("pck", "miou", "fidelity")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), choices=REGULARIZERS)
    p.add_argument("--steps", type=int, default=2000, help="training steps of every side network")
    p.add_argument("--eval_every", type=int, default=200, help="validation curve spacing")
    p.add_argument("--eval_conditions", type=int, default=64)
    p.add_argument("--eval_inference_steps", type=int, default=20)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--main", default=None, help="main network folder (default: pretrain one)")
    p.add_argument("--pretrain_steps", type=int, default=3000)
    p.add_argument(
        "--pretrain_set",
        nargs="*",
        default=["init_from=embedded:pose", "mixed_precision=bf16", "train_size=40000",
                 "train_batch_size=256"],  # fmt: skip
        help="`lisa pretrain` flags as key=value",
    )
    p.add_argument("--set", nargs="*", default=[], help="extra `lisa train` flags as key=value")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--workers_per_run", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--run_dir", default="runs/composition")
    p.add_argument("--out", default="benchmarks/results/composition.json")
    p.add_argument("--evaluate_only", action="store_true", help="score runs already trained")
    return p


def _flags(pairs: dict) -> list[str]:
    argv = []
    for key, value in pairs.items():
        argv += [f"--{key}", *str(value).split()]
    return argv


def _key_values(items: list[str]) -> dict:
    return dict(item.split("=", 1) for item in items)


def run_dir(args, regularizer: str, run: str, seed: int) -> Path:
    return Path(args.run_dir) / regularizer / run / f"seed{seed}"


def pretrain_main(args) -> str:
    """The main network folder: ``--main``, or one pretrained on the task's images."""
    if args.main:
        return args.main
    out = Path(args.run_dir) / "main"
    model = out / "model"
    if not (model / "lisa_model.json").is_file():
        flags = {"task": TASK, "resolution": args.resolution,
                 "max_train_steps": args.pretrain_steps, "output_dir": out,
                 **_key_values(args.pretrain_set)}  # fmt: skip
        if args.device:
            flags["device"] = args.device
        cmd = [sys.executable, "-m", "lisa_control", "pretrain", *_flags(flags)]
        print("pretraining the main network:", " ".join(map(str, cmd)), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return str(model)


def train_flags(args, main: str, regularizer: str, run: str, seed: int) -> list[str]:
    flags = {
        "pretrained_model_name_or_path": main,
        "task": TASK,
        "conditioning_image_column": " ".join(RUNS[run]),
        "regularizer": REGULARIZERS[regularizer],
        "loss_weighting": "none",  # the unweighted loss of the paper's comparison
        "seed": seed,
        "resolution": args.resolution,
        "max_train_steps": args.steps,
        "validation_steps": args.eval_every,
        "validation_conditions": args.eval_conditions,
        "validation_inference_steps": args.eval_inference_steps,
        "checkpointing_steps": args.steps,
        "checkpoints_total_limit": 1,
        "dataloader_num_workers": args.workers_per_run,
        "report_to": "none",
        "output_dir": run_dir(args, regularizer, run, seed),
        **_key_values(args.set),
    }
    if args.device:
        flags["device"] = args.device
    return _flags(flags) + ["--no-progress"]


def train_all(args, main: str) -> None:
    """Every (seed, regularizer, run) as a `lisa train` subprocess, ``--parallel`` at a time."""
    jobs = [(r, run, s) for s in args.seeds for r in args.regularizers for run in RUNS]
    running: list[tuple[subprocess.Popen, tuple]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    failed = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            job = jobs.pop(0)
            out = run_dir(args, *job)
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("loss_log.jsonl", "validation.jsonl"):
                (out / stale).unlink(missing_ok=True)
            log = (out / "stdout.txt").open("w")
            cmd = [sys.executable, "-m", "lisa_control", "train", *train_flags(args, main, *job)]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            job))  # fmt: skip
            print(f"started {job}", flush=True)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                print(f"finished {job} rc={proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(job)
        time.sleep(1)
    if failed:
        raise SystemExit(f"runs failed: {failed}; see their stdout.txt")


# ----------------------------------------------------------------------------- evaluation


def load_networks(args, regularizer: str, seed: int, cls) -> dict:
    """Side networks by setting name: the separately trained pair and the jointly trained one."""

    def load(path):
        return cls.side_network_class.from_pretrained(path)

    joint = run_dir(args, regularizer, "joint", seed) / "controlnet"
    return {
        "pose": load(run_dir(args, regularizer, "pose", seed) / "controlnet"),
        "segmentation": load(run_dir(args, regularizer, "segmentation", seed) / "controlnet"),
        "joint_pose": load(joint / "pose"),
        "joint_segmentation": load(joint / "segmentation"),
    }


def generate(model, networks: list, conditions: list, args, seed: int, device):
    """Samples (N, 3, R, R) in [-1, 1] for ``conditions`` (one batch per network) with the side
    networks composed (none: the main network alone); the noise depends only on ``seed``, so
    every setting of a seed starts from the same x_T."""
    import torch

    from lisa_control.eval.sampling import decode, init_noise_sigma, sample
    from lisa_control.eval.validation import inference_schedule
    from lisa_control.families import branch_class
    from lisa_control.families.composition import ComposedBranch
    from lisa_control.families.encoders import FrozenEncoders

    size = args.resolution // model.vae_scale_factor
    n = conditions[0].shape[0] if conditions else args.eval_conditions
    g = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn((n, model.sample_channels, size, size), generator=g)
    encoders = FrozenEncoders(model, device)
    cls = branch_class(model.family, "controlnet")
    outputs = []
    prior = PriorOnly(model)
    for start in range(0, n, args.eval_batch_size):
        rows = slice(start, start + args.eval_batch_size)
        scheduler, schedule = inference_schedule(model, size, size, args.eval_inference_steps)
        batch_noise = noise[rows].to(device) * init_noise_sigma(scheduler)
        context = encoders.null_context(batch_noise.shape[0])
        if networks:
            branch = ComposedBranch.from_side_networks(cls, model.main_network, networks)
            condition = [encoders.encode_condition(c[rows].to(device)) for c in conditions]
        else:
            branch, condition = prior, batch_noise  # the condition is not read
        branch = branch.to(device).eval()
        x0 = sample(branch, condition, context, scheduler, args.eval_inference_steps,
                    latents=batch_noise, schedule=schedule)  # fmt: skip
        outputs.append(decode(model.vae, x0).float().cpu())
    return torch.cat(outputs)


class PriorOnly(torch.nn.Module):
    """The main network alone behind the sampler's branch interface."""

    def __init__(self, model):
        super().__init__()
        self.family = model.family
        self.main_network = model.main_network
        self.side_network = model.main_network  # where the sampler looks for the device

    def forward(self, x_t, timesteps, context, condition):
        from lisa_control.core.branch import Prediction

        return Prediction(self.family.predict(self.main_network, x_t, timesteps, context))


def evaluate(args, main: str) -> dict:
    """Per regularizer and seed, the scores of every setting (see the module docstring)."""
    import torch

    from lisa_control.data.tasks import get_task
    from lisa_control.eval.composition import condition_batch
    from lisa_control.eval.validation import held_out_task_samples
    from lisa_control.families import branch_class
    from lisa_control.families.loading import load_main_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(main)
    cls = branch_class(model.family, "controlnet")
    model.main_network.to(device)
    task = get_task(TASK, resolution=args.resolution)
    scores: dict = {}
    for seed in args.seeds:
        samples = held_out_task_samples(task, args.eval_conditions, seed)
        pose = condition_batch(samples, "pose")
        segmentation = condition_batch(samples, "segmentation")
        prior = task.fidelity(generate(model, [], [], args, seed, device), samples)
        for regularizer in args.regularizers:
            loaded = load_networks(args, regularizer, seed, cls)
            nets = {k: v.to(device) for k, v in loaded.items()}
            settings = {
                "pose_alone": ([nets["pose"]], [pose]),
                "segmentation_alone": ([nets["segmentation"]], [segmentation]),
                "composed": ([nets["pose"], nets["segmentation"]], [pose, segmentation]),
                "joint_pose_alone": ([nets["joint_pose"]], [pose]),
                "joint_segmentation_alone": ([nets["joint_segmentation"]], [segmentation]),
                "joint_composed": (
                    [nets["joint_pose"], nets["joint_segmentation"]],
                    [pose, segmentation],
                ),
            }
            result = {"prior": prior}
            for name, (networks, conds) in settings.items():
                images = generate(model, networks, conds, args, seed, device)
                result[name] = task.fidelity(images, samples)
                cells = " ".join(f"{m} {result[name][m]:.3f}" for m in METRICS)
                print(f"seed {seed} {regularizer:6s} {name:26s} {cells}", flush=True)
            scores.setdefault(regularizer, {})[str(seed)] = result
    return scores


# ----------------------------------------------------------------------------- summary


def derived(result: dict) -> dict:
    """Interference (as `lisa eval --each_alone` reports it: each condition's own metric alone
    minus composed, ``pose_interference`` on PCK, ``segmentation_interference`` on mIoU) and
    joint-training gains of one (regularizer, seed)."""
    from lisa_control.data.tasks import get_task
    from lisa_control.eval.composition import condition_metrics, interference

    conditions = RUNS["joint"]
    metrics = condition_metrics(get_task(TASK), conditions)
    separate = interference(
        {c: result[f"{c}_alone"] for c in conditions}, result["composed"], metrics
    )
    joint = interference(
        {c: result[f"joint_{c}_alone"] for c in conditions}, result["joint_composed"], metrics
    )
    return {
        **separate,
        **{f"joint_{k}": v for k, v in joint.items()},
        **{
            f"joint_gain_{m}": result["joint_composed"][m] - result["composed"][m]
            for m in METRICS
        },
    }


def summarize(args, scores: dict) -> dict:
    per_regularizer = {}
    for regularizer, per_seed in scores.items():
        table = {
            setting: {m: _mean_sd([r[setting][m] for r in per_seed.values()]) for m in METRICS}
            for setting in SETTINGS
        }
        extra = [derived(r) for r in per_seed.values()]
        per_regularizer[regularizer] = {
            "scores": table,
            "derived": {k: _mean_sd([d[k] for d in extra]) for k in extra[0]} if extra else {},
        }
    lisa_minus_plain = {}
    if {"plain", "lisa"} <= set(scores):
        seeds = sorted(set(scores["plain"]) & set(scores["lisa"]))
        for setting in SETTINGS[1:]:
            lisa_minus_plain[setting] = {
                m: _mean_sd([scores["lisa"][s][setting][m] - scores["plain"][s][setting][m]
                             for s in seeds])  # fmt: skip
                for m in METRICS
            }
        d_plain = {s: derived(scores["plain"][s]) for s in seeds}
        d_lisa = {s: derived(scores["lisa"][s]) for s in seeds}
        keys = next(iter(d_plain.values())).keys() if seeds else []
        lisa_minus_plain["derived"] = {
            k: _mean_sd([d_lisa[s][k] - d_plain[s][k] for s in seeds]) for k in keys
        }
    return {
        "task": TASK,
        "settings": list(SETTINGS),
        "per_regularizer": per_regularizer,
        "lisa_minus_plain": lisa_minus_plain,
        "raw": scores,
        "runs": collect_runs(args),
    }


def collect_runs(args) -> dict:
    """Every training run's validation curve and step time."""
    runs = {}
    for regularizer in args.regularizers:
        for run in RUNS:
            for seed in args.seeds:
                folder = run_dir(args, regularizer, run, seed)
                vpath, lpath = folder / "validation.jsonl", folder / "loss_log.jsonl"
                if not vpath.is_file():
                    continue
                losses = [json.loads(x) for x in lpath.read_text().splitlines()]
                runs[f"{regularizer}/{run}/seed{seed}"] = {
                    "validation": [json.loads(x) for x in vpath.read_text().splitlines()],
                    "diffusion_loss_last100": statistics.fmean(
                        r["diffusion_loss"] for r in losses[-100:]
                    ),
                    "seconds_per_step": median_step_seconds(losses),
                }
    return runs


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    main_network = pretrain_main(args)
    if not args.evaluate_only:
        train_all(args, main_network)
    summary = summarize(args, evaluate(args, main_network))
    summary["main_network"] = main_network
    out = write_result(summary, "composition.py", argv, t0, args.out)
    for regularizer, info in summary["per_regularizer"].items():
        for setting, cells in info["scores"].items():
            text = "  ".join(f"{m} {c['mean']:.3f}" for m, c in cells.items() if c)
            print(f"{regularizer:6s} {setting:26s} {text}")
        for key, cell in info["derived"].items():
            if cell:
                print(f"{regularizer:6s} {key:34s} {cell['mean']:+.3f}")
    for key, cell in summary["lisa_minus_plain"].get("derived", {}).items():
        if cell:
            print(f"lisa - plain {key:34s} {cell['mean']:+.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
