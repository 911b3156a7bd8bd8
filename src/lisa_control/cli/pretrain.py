"""``lisa pretrain``: train a small pixel-space main network from scratch on a task's images.

This is how the project makes the frozen "foundation" networks its embedded default and
benchmarks start from, since no pretrained model can be downloaded here. The network is a
diffusers ``UNet2DConditionModel`` (``--architecture unet``, DDPM eps or v objective) or a tiny
``SD3Transformer2DModel`` flow DiT (``--architecture dit``, rectified flow), conditioned on a
constant null text context, so every ControlNet tool works on it unchanged. The images of several
tasks can be mixed (``--task edges,segmentation``) to make one network serve them all.

Writes ``output_dir/model`` (a folder ``lisa train --pretrained_model_name_or_path`` takes, EMA
weights), ``loss_log.jsonl``, ``curve.jsonl`` (realism of samples vs step), ``samples/step-N.png``
and ``training_curve.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..core.errors import ConfigError
from ..families.loading import save_pixel_model
from ..zoo.unet import tiny_unet
from ..core.objectives import make_objective


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="task name, or several joined by commas")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[48, 96, 96])
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--cross_attention_dim", type=int, default=32)
    p.add_argument("--architecture", choices=["unet", "dit"], default="unet")
    p.add_argument(
        "--objective",
        choices=["epsilon", "v_prediction", "flow"],
        default=None,
        help="default: epsilon for unet, flow for dit",
    )
    p.add_argument("--dit_layers", type=int, default=6)
    p.add_argument("--dit_heads", type=int, default=4)
    p.add_argument("--dit_head_dim", type=int, default=32)
    p.add_argument("--train_size", type=int, default=20_000, help="images rendered once")
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--regularizer", choices=["none", "layersync"], default="none")
    p.add_argument("--layersync_pairs", default=None)
    p.add_argument("--layersync_weight", type=float, default=0.2)
    p.add_argument("--sample_every", type=int, default=500)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument(
        "--feature_distance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also score samples by the task-feature Fréchet distance (not Inception FID); "
        "default: on with CUDA, off on CPU, where training its feature network takes minutes",
    )
    p.add_argument("--feature_network_steps", type=int, default=1500)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time_budget_s", type=float, default=None, help="stop (and save) after this long"
    )
    p.add_argument(
        "--save_dtype", choices=["fp32", "fp16"], default="fp32", help="fp16 halves the file"
    )
    p.add_argument(
        "--init_from",
        default=None,
        help="continue from a main network `lisa pretrain` wrote (a folder, or embedded:TASK for "
        "a shipped one); its own architecture and objective replace the size flags",
    )
    p.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the network's blocks (GPU; the first steps take longer)",
    )
    p.add_argument("--torch_compile_backend", default="inductor")
    p.add_argument("--device", default=None)
    p.add_argument("--output_dir", required=True)
    return p


def render_dataset(tasks, size: int, seed: int, num_workers: int) -> torch.Tensor:
    """Render ``size`` images once (uint8, N x 3 x H x W), cycling through ``tasks``."""
    from ..data.tasks import TaskDataset

    per_task = [TaskDataset(t, size=size, seed=seed) for t in tasks]
    mixed = torch.utils.data.Subset(
        torch.utils.data.ConcatDataset(per_task),
        [(i % len(tasks)) * size + i for i in range(size)],
    )
    loader = DataLoader(mixed, batch_size=256, num_workers=num_workers)
    chunks = [((b["pixel_values"] + 1) * 127.5).round().to(torch.uint8) for b in loader]
    return torch.cat(chunks)


def null_context(network, batch: int, device):
    """The constant context the main network is trained and sampled with."""
    from ..families import family_of_network

    return family_of_network(network).null_context(network, batch, device)


def predict(network, x, t, context):
    """The main network's own prediction, as its family calls it."""
    from ..families import family_of_network

    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return family_of_network(network).predict(network, x, t, context)


@torch.no_grad()
def sample_unconditional(network, scheduler, n, resolution, steps, seed, device) -> torch.Tensor:
    """Samples of the main network alone, in [-1, 1] (DPM-Solver++, or Euler for flow)."""
    from ..eval.sampling import init_noise_sigma, scale_model_input
    from ..eval.validation import evaluation_scheduler

    sampler = evaluation_scheduler(scheduler)
    sampler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    shape = (n, network.config.in_channels, resolution, resolution)
    x = torch.randn(shape, generator=g).to(device) * init_noise_sigma(sampler)
    ctx = null_context(network, n, device)
    for t in sampler.timesteps:
        out = predict(network, scale_model_input(sampler, x, t), t, ctx)
        x = sampler.step(out.float(), t, x).prev_sample
    return x.clamp(-1, 1)


def build_main_network(args):
    """(network, scheduler, objective name) for ``--architecture``."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    if args.architecture == "dit":
        from ..zoo.flow import tiny_flow_dit_config

        objective = args.objective or "flow"
        if objective != "flow":
            raise ConfigError("--architecture dit trains with --objective flow.")
        network = SD3Transformer2DModel(
            **tiny_flow_dit_config(
                sample_size=args.resolution,
                num_layers=args.dit_layers,
                num_attention_heads=args.dit_heads,
                attention_head_dim=args.dit_head_dim,
            )
        )
        return network, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), objective
    objective = args.objective or "epsilon"
    if objective == "flow":
        raise ConfigError("--objective flow needs --architecture dit.")
    network = UNet2DConditionModel(
        **tiny_unet(
            sample_size=args.resolution,
            in_channels=3,
            block_out_channels=tuple(args.block_out_channels),
            layers_per_block=args.layers_per_block,
            cross_attention_dim=args.cross_attention_dim,
            attention_at_full_resolution=False,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type=objective
    )
    return network, scheduler, objective


def load_initial_network(args):
    """(network in fp32, scheduler, objective name, steps it was trained) from ``--init_from``,
    refusing one that does not match the flags that still apply."""
    from ..core.errors import ModelError
    from ..families.loading import PIXEL_MODEL_FILE, load_main_model

    model = load_main_model(args.init_from)
    meta_file = Path(model.source) / PIXEL_MODEL_FILE
    if not meta_file.is_file():
        raise ConfigError(
            f"--init_from {args.init_from!r} is not a `lisa pretrain` main network (no "
            f"{PIXEL_MODEL_FILE}); pass a folder that `lisa pretrain` wrote, or embedded:TASK."
        )
    architecture = model.family.pretrain_architecture
    if architecture is None:
        raise ModelError(
            f"--init_from {args.init_from!r} holds a {model.family.name} network; `lisa pretrain` "
            "continues UNets (--architecture unet) and SD3-style DiTs (--architecture dit)."
        )
    if architecture != args.architecture:
        raise ModelError(
            f"--init_from {args.init_from!r} holds a {model.family.name} network but --architecture "
            f"is {args.architecture}; pass --architecture {architecture}."
        )
    if model.resolution != args.resolution:
        raise ConfigError(
            f"--init_from {args.init_from!r} was trained at resolution {model.resolution}; "
            f"pass --resolution {model.resolution}."
        )
    if args.objective and args.objective != model.objective:
        raise ConfigError(
            f"--init_from {args.init_from!r} predicts {model.objective}; drop --objective or "
            f"pass --objective {model.objective}."
        )
    steps = int(json.loads(meta_file.read_text()).get("steps") or 0)
    return model.main_network.float(), model.scheduler, model.objective, steps


def pretrain(args: argparse.Namespace) -> Path:
    from ..data.tasks import get_task

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [n.strip() for n in args.task.split(",") if n.strip()]
    tasks = [get_task(n, resolution=args.resolution) for n in names]
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {args.output_dir!r} is a file; give a directory.")
    (out / "samples").mkdir(parents=True, exist_ok=True)

    if args.torch_compile:
        from ..training.compilation import check_backend

        check_backend(args.torch_compile_backend)
    # before rendering, so a wrong folder fails in seconds, not after minutes of rendering
    initial = load_initial_network(args) if args.init_from else None

    t0 = time.perf_counter()
    images = render_dataset(tasks, args.train_size, args.seed, args.num_workers).to(device)
    print(f"rendered {len(images)} images in {time.perf_counter() - t0:.1f}s")

    if initial is not None:
        unet, scheduler, objective_name, earlier_steps = initial
        print(f"continuing from {args.init_from} ({earlier_steps} steps)")
    else:
        unet, scheduler, objective_name = build_main_network(args)
        earlier_steps = 0
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    objective = make_objective(
        objective_name, scheduler=None if objective_name == "flow" else scheduler
    )
    regularizer = None
    if args.regularizer == "layersync":
        from ..regularizers.layersync import LayerSync, default_pairs

        regularizer = LayerSync(
            unet, pairs=args.layersync_pairs or default_pairs(unet), weight=args.layersync_weight
        )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(args.lr_warmup_steps, 1))
    )
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"main network: {n_params / 1e6:.2f}M parameters on {device}")
    if args.torch_compile:
        # after LayerSync's hooks, which keep their blocks eager
        from ..training.compilation import compile_blocks

        print("torch.compile:", compile_blocks(unet, args.torch_compile_backend))
    ema_params, params = list(ema.parameters()), list(unet.parameters())

    ctx = null_context(unet, args.train_batch_size, device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.mixed_precision == "bf16")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    distances = {}
    if args.feature_distance or (args.feature_distance is None and device.type == "cuda"):
        from ..eval.feature_distance import TaskFeatureDistance

        distances = {
            t.name: TaskFeatureDistance(
                t, train_steps=args.feature_network_steps, device=device
            ).prepare()
            for t in tasks
        }
        print("feature networks:", {n: round(d.accuracy, 3) for n, d in distances.items()})
    log = (out / "loss_log.jsonl").open("w")
    curve = (out / "curve.jsonl").open("w")
    # Losses stay on the device until a flush: a .item() per step would stall the CPU on
    # every step of a network this small, whose steps are bound by kernel launches.
    pending: list[dict] = []
    t0 = time.perf_counter()
    last_step = args.max_train_steps
    for step in range(1, args.max_train_steps + 1):
        out_of_time = args.time_budget_s and time.perf_counter() - t0 > args.time_budget_s
        if out_of_time:
            last_step = step - 1
            print(f"time budget reached at step {last_step}")
            break
        idx = torch.randint(0, len(images), (args.train_batch_size,), generator=g).to(device)
        x0 = images[idx].float() / 127.5 - 1
        noised = objective.sample(x0)
        with autocast:
            pred = predict(unet, noised.x_t, noised.timesteps, ctx)
            loss = objective.loss(pred, noised)
            record = {"step": step, "diffusion_loss": loss.detach()}
            if regularizer is not None:
                reg = regularizer.loss()
                loss = loss + reg.loss
                record["layersync_loss"] = reg.loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        record["loss"] = loss.detach()
        pending.append(record)
        sample_now = step % args.sample_every == 0 or step == args.max_train_steps
        if sample_now or step % 100 == 0:
            record = _flush_losses(pending, log)
        if sample_now:
            _write_samples(
                args, tasks, images, ema, scheduler, record, step, t0, out, curve, distances
            )
    if pending:
        record = _flush_losses(pending, log)
    if last_step % args.sample_every:
        _write_samples(
            args, tasks, images, ema, scheduler, record, last_step, t0, out, curve, distances
        )
    log.close()
    curve.close()
    if regularizer is not None:
        regularizer.remove_hooks()
    model_dir = out / "model"
    dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    save_pixel_model(
        model_dir,
        ema.to(dtype).cpu(),
        scheduler,
        args.resolution,
        names[0] if len(names) == 1 else None,
        tasks=names,
        objective=objective_name,
        steps=earlier_steps + last_step,
        parameters=n_params,
        initialized_from=args.init_from,
        command="lisa pretrain " + " ".join(_argv_of(args)),
    )
    plot_curve(out)
    print(f"saved main network to {model_dir}")
    return model_dir


def _flush_losses(pending: list[dict], log) -> dict | None:
    """Write the pending loss records as numbers; return the last one."""
    last = None
    for record in pending:
        last = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
        log.write(json.dumps(last) + "\n")
    pending.clear()
    return last


def _write_samples(args, tasks, images, ema, scheduler, record, step, t0, out, curve, distances):
    """Sample the EMA network, score realism per task, write a grid and a curve point."""
    from ..eval.validation import image_grid, to_uint8

    device = next(ema.parameters()).device
    samples = sample_unconditional(
        ema, scheduler, args.num_samples, args.resolution, args.sample_steps, 1234, device
    )
    reference = images[: args.num_samples].float() / 127.5 - 1
    point = {
        "step": step,
        "seconds": time.perf_counter() - t0,
        "loss": record["loss"],
        "realism": {t.name: t.realism(samples) for t in tasks},
        "realism_of_training_images": {t.name: t.realism(reference) for t in tasks},
    }
    if distances:
        point["feature_distance"] = {name: fd(samples) for name, fd in distances.items()}
    curve.write(json.dumps(point) + "\n")
    curve.flush()
    u8 = to_uint8(samples[:64])
    image_grid([list(u8[i : i + 8]) for i in range(0, len(u8), 8)]).save(
        out / "samples" / f"step-{step}.png"
    )
    print(json.dumps(point), flush=True)


def plot_curve(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    points = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    with_distance = bool(points) and "feature_distance" in points[0]
    fig, axes = plt.subplots(
        1, 3 if with_distance else 2, figsize=(15 if with_distance else 10, 3.5)
    )
    a, b = axes[0], axes[1]
    steps = [r["step"] for r in losses]
    raw = torch.tensor([r["diffusion_loss"] for r in losses])
    k = max(1, len(raw) // 100)
    smooth = raw.unfold(0, k, k).mean(1) if len(raw) >= k else raw
    a.plot(steps[k - 1 :: k][: len(smooth)], smooth.tolist())
    a.set_xlabel("step")
    a.set_ylabel("diffusion loss (mean of windows)")
    for name in points[0]["realism"] if points else []:
        b.plot([p["step"] for p in points], [p["realism"][name] for p in points], label=name)
    b.set_xlabel("step")
    b.set_ylabel("realism of samples")
    b.legend()
    if with_distance:
        c = axes[2]
        for name in points[0]["feature_distance"]:
            c.plot([p["step"] for p in points], [p["feature_distance"][name] for p in points])
        c.set_xlabel("step")
        c.set_ylabel("task-feature Fréchet distance")
        c.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=100)
    plt.close(fig)


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The flags that reproduce ``args`` (what the saved model records as its command)."""
    negatable = {
        a.dest for a in build_parser()._actions if isinstance(a, argparse.BooleanOptionalAction)
    }
    parts = []
    for key, value in vars(args).items():
        if value is None or key == "output_dir":
            continue
        if isinstance(value, bool):
            if value or key in negatable:
                parts.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            parts += [f"--{key}", *map(str, value)]
        else:
            parts += [f"--{key}", str(value)]
    return parts


def main(argv=None) -> None:
    pretrain(build_parser().parse_args(argv))
