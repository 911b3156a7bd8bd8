"""``lisa pretrain``'s library side: train a small pixel-space main network from scratch on
task images or on the user's own images, through the shared loop.

The network is a diffusers ``UNet2DConditionModel`` (DDPM eps or v objective) or a tiny
``SD3Transformer2DModel`` flow DiT (rectified flow), conditioned on a constant null context,
so every ControlNet tool works on it unchanged. A video task (``pose_video``) trains an
AnimateDiff ``UNetMotionModel`` on clips (B, C, F, H, W) instead (``--architecture
motion_unet``, its default there); ``--init_from`` an image UNet then gives its spatial layers,
joined with new motion modules that start as the identity (AnimateDiff's start), and
``--motion_modules_only`` trains those alone. This module builds the network, the data
(task renders, or the images of ``--train_data_dir`` / ``--dataset_name`` read once through
:class:`~lisa_control.data.folder.ControlDataset`, kept on the device as uint8), the step, an
EMA of the weights and the sample grids and realism curve;
:class:`~lisa_control.training.loop.Loop` does the optimization.

With ``--text_encoder`` (a CLIP text model folder) a UNet learns the user's captions instead:
its cross-attention width is the encoder's hidden size, each batch's captions are encoded by
the frozen encoder (replaced by the empty caption with probability
``--proportion_empty_prompts``, for classifier-free guidance), and the saved folder holds the
encoder and tokenizer, so ``lisa train`` and ``lisa sample`` prompt it.

Writes ``output_dir/model`` (EMA weights, a folder ``lisa train --pretrained_model_name_or_path``
takes), ``loss_log.jsonl``, ``curve.jsonl`` (realism of samples vs step, for tasks),
``samples/step-N.png`` (video networks: ``samples/step-N.gif``, the animated grid, and
``samples/step-N_frames.png``, one line of frames per clip) and ``training_curve.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..core.branch import Context
from ..core.errors import ConfigError, DataError
from ..core.step import StepOutput
from ..families import family_of_network
from ..families.loading import save_pixel_model
from .logs import JsonLines, LossRecorder
from .loop import Callback, Loop

# Records stay on the device this many steps: a network this small is bound by kernel
# launches, and a host sync per step would stall it.
FLUSH_STEPS = 100


# ----------------------------------------------------------------------------- the network


def null_context(network, batch: int, device):
    """The constant context the main network is trained and sampled with, from its family."""
    return family_of_network(network).null_context(network, batch, device)


def predict(network, x, t, context):
    """The main network's own prediction, as its family calls it."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return family_of_network(network).predict(network, x, t, context)


@torch.no_grad()
def sample_unconditional(
    network,
    scheduler,
    n,
    resolution,
    steps,
    seed,
    device,
    context: Context | None = None,
    frames: int | None = None,
) -> torch.Tensor:
    """Samples of the main network alone, in [-1, 1] (DPM-Solver++, or Euler for flow), under
    its null context or ``context`` (one row per sample): images (n, C, R, R), or with
    ``frames`` clips (n, C, frames, R, R) of a video network."""
    from ..eval.sampling import init_noise_sigma, scale_model_input
    from ..eval.validation import evaluation_scheduler

    sampler = evaluation_scheduler(scheduler)
    sampler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    clip = () if frames is None else (frames,)
    shape = (n, network.config.in_channels, *clip, resolution, resolution)
    x = torch.randn(shape, generator=g).to(device) * init_noise_sigma(sampler)
    ctx = context if context is not None else null_context(network, n, device)
    for t in sampler.timesteps:
        out = predict(network, scale_model_input(sampler, x, t), t, ctx)
        x = sampler.step(out.float(), t, x).prev_sample
    return x.clamp(-1, 1)


def build_main_network(args, cross_attention_dim: int | None = None):
    """(network, scheduler, objective name) for ``--architecture``; a UNet attends to
    ``cross_attention_dim``-wide text (a text encoder's hidden size), default
    ``--cross_attention_dim``. A ``motion_unet`` is the same UNet with a motion module after
    every resnet."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        UNetMotionModel,
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
    from ..zoo.unet import tiny_unet
    from ..zoo.video import tiny_unet_motion_config

    objective = args.objective or "epsilon"
    if objective == "flow":
        raise ConfigError("--objective flow needs --architecture dit.")
    layout = dict(
        sample_size=args.resolution,
        in_channels=3,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        cross_attention_dim=cross_attention_dim or args.cross_attention_dim,
        attention_at_full_resolution=False,
    )
    if args.architecture == "motion_unet":
        # As many spatial heads as tiny_unet gives the image UNet, so that the two match.
        heads = tiny_unet(**layout)["attention_head_dim"]
        network = UNetMotionModel(**tiny_unet_motion_config(**layout, num_attention_heads=heads))
    else:
        network = UNet2DConditionModel(**tiny_unet(**layout))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type=objective
    )
    return network, scheduler, objective


def load_initial_network(args):
    """(network in fp32, scheduler, objective name, steps it was trained) from ``--init_from``,
    refusing one that does not match the flags that still apply. An image UNet given for
    ``--architecture motion_unet`` becomes the spatial layers of a new motion UNet
    (:func:`~lisa_control.zoo.video.motion_unet_from_image`), which has been trained 0 steps
    (the image network's record keeps its own)."""
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
            "continues UNets (--architecture unet), SD3-style DiTs (--architecture dit) and "
            "motion UNets (--architecture motion_unet)."
        )
    extends = architecture == "unet" and args.architecture == "motion_unet"
    if architecture != args.architecture and not extends:
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
    if extends:
        from ..zoo.video import motion_unet_from_image

        print(
            f"spatial layers from {args.init_from} ({steps} steps on images), new motion modules "
            "starting as the identity"
        )
        return motion_unet_from_image(model.main_network), model.scheduler, model.objective, 0
    print(f"continuing from {args.init_from} ({steps} steps)")
    return model.main_network.float(), model.scheduler, model.objective, steps


# ----------------------------------------------------------------------------- data and step


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


def batch_indices(size: int, batch_size: int, seed: int, time_budget_s: float | None, device):
    """Random index batches into ``size`` items, drawn on the CPU from ``seed`` and moved to
    ``device``; ends once ``time_budget_s`` seconds have passed since the first batch."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    drawn = 0
    while True:
        if time_budget_s and time.perf_counter() - t0 > time_budget_s:
            print(f"time budget reached at step {drawn}")
            return
        idx = torch.randint(0, size, (batch_size,), generator=g).to(device)
        drawn += 1
        yield idx


def image_batches(images, batch_size: int, seed: int, time_budget_s: float | None = None):
    """Random batches of ``images`` in [-1, 1], drawn on the CPU from ``seed``; ends once
    ``time_budget_s`` seconds have passed since the first batch."""
    for idx in batch_indices(len(images), batch_size, seed, time_budget_s, images.device):
        yield images[idx].float() / 127.5 - 1


def captioned_batches(data: UserImages, batch_size: int, seed: int, proportion_empty: float,
                      time_budget_s: float | None = None):  # fmt: skip
    """Random (images in [-1, 1], encoded captions) batches of ``data``, each caption replaced
    by the empty one with probability ``proportion_empty`` (drawn from ``seed + 1``)."""
    images, ids = data.images, data.token_ids
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    for idx in batch_indices(len(images), batch_size, seed, time_budget_s, images.device):
        empty = (torch.rand(batch_size, generator=g) < proportion_empty).to(images.device)
        rows = torch.where(empty[:, None], data.empty_ids[None], ids[idx])
        yield images[idx].float() / 127.5 - 1, data.encode(rows)


@dataclass
class UserImages:
    """The user's training images (uint8, N x 3 x R x R, on the device) and, when captioned,
    their captions' token ids (N x L), the empty caption's ids and the frozen CLIP encoder."""

    images: torch.Tensor
    captions: list[str] | None = None
    token_ids: torch.Tensor | None = None
    empty_ids: torch.Tensor | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None

    @torch.no_grad()
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states of token ids, as the main network is trained on."""
        return self.text_encoder(ids, return_dict=False)[0].float()

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(
            captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip


def load_text_encoder(args):
    """(CLIP text model, tokenizer) from ``--text_encoder``: a folder holding both, or a Stable
    Diffusion folder with ``text_encoder/`` and ``tokenizer/``."""
    from ..families.loading import load_clip_text_encoder

    folder = Path(args.text_encoder).expanduser()
    if (folder / "text_encoder" / "config.json").is_file():
        return load_clip_text_encoder(
            folder / "text_encoder", folder / "tokenizer", what="--text_encoder"
        )
    return load_clip_text_encoder(folder, what="--text_encoder")


def check_data_flags(args) -> None:
    """One source of images (``--task``, ``--train_data_dir`` or ``--dataset_name``), and
    caption flags only with user data and a text encoder."""
    sources = [f for f in ("task", "train_data_dir", "dataset_name") if getattr(args, f, None)]
    if len(sources) != 1:
        named = " and ".join(f"--{f}" for f in sources)
        raise ConfigError(
            f"{named} exclude each other; pass one of them."
            if sources
            else "no training images: pass --task, --train_data_dir or --dataset_name."
        )
    if args.task:
        for flag in ("text_encoder", "caption_column", "proportion_empty_prompts"):
            if getattr(args, flag, None) is not None:
                raise ConfigError(f"--{flag} needs --train_data_dir or --dataset_name, not --task.")
        return
    if args.feature_distance:
        raise ConfigError(
            "--feature_distance scores samples with a task's feature network; drop it when "
            "training on --train_data_dir or --dataset_name."
        )
    if args.text_encoder is None:
        for flag in ("caption_column", "proportion_empty_prompts"):
            if getattr(args, flag) is not None:
                raise ConfigError(
                    f"--{flag} needs --text_encoder (a CLIP text model folder) to encode the "
                    "captions; pass one, or drop it to train unconditionally."
                )
    elif args.architecture not in (None, "unet"):
        raise ConfigError("captioned pretraining (--text_encoder) trains --architecture unet.")
    share = args.proportion_empty_prompts
    if share is not None and not 0.0 <= share <= 1.0:
        raise ConfigError(
            f"--proportion_empty_prompts must be a number in [0, 1], got {share}; e.g. 0.1 "
            "drops one caption in ten"
        )


def resolve_architecture(args, tasks) -> str:
    """``--architecture`` checked against the data: a motion UNet for video tasks (tasks with
    ``frames``, whose renders are clips), an image network for everything else; unset, the
    one the data needs."""
    videos = {t.name: getattr(t, "frames", None) is not None for t in tasks}
    if len(set(videos.values())) > 1:
        clips = ", ".join(n for n, v in videos.items() if v)
        raise ConfigError(
            f"--task mixes video tasks ({clips}) with image tasks; one network learns one kind: "
            "pretrain them apart."
        )
    video = any(videos.values())
    architecture = args.architecture or ("motion_unet" if video else "unet")
    if video and architecture != "motion_unet":
        raise ConfigError(
            f"--task {','.join(videos)} renders videos, which --architecture {architecture} "
            "cannot denoise; pass --architecture motion_unet (or leave it out)."
        )
    if not video and architecture == "motion_unet":
        raise ConfigError(
            "--architecture motion_unet denoises videos; pass a video task (--task pose_video), "
            "or --architecture unet or dit for images."
        )
    if getattr(args, "motion_modules_only", False) and architecture != "motion_unet":
        raise ConfigError(
            "--motion_modules_only trains the motion modules of a video network; pass a video "
            "task (--task pose_video) or drop it."
        )
    return architecture


def read_user_images(args, device) -> UserImages:
    """The images (and captions) of ``--train_data_dir`` / ``--dataset_name``, checked and
    resized as :class:`ControlDataset` does, read once; every unreadable image is reported in
    one DataError."""
    from ..data.folder import ControlDataset

    captioned = args.text_encoder is not None
    dataset = ControlDataset(
        args.train_data_dir or args.dataset_name,
        resolution=args.resolution,
        image_column=args.image_column,
        conditioning_image_column=None,
        caption_column=(args.caption_column or "text") if captioned else None,
        seed=args.seed,
        max_samples=args.max_train_samples,
        resolution_multiple=1,
        dataset_config_name=args.dataset_config_name,
    )
    # after the cheap checks of the data, before decoding it
    text_encoder, tokenizer = load_text_encoder(args) if captioned else (None, None)
    images, captions, problems = [], [], []
    for index in range(len(dataset)):
        try:
            item = dataset[index]
        except DataError as err:
            problems.append(str(err))
            continue
        images.append(((item["pixel_values"] + 1) * 127.5).round().to(torch.uint8))
        captions.append(item["caption"])
    if problems:
        shown = " ".join(f"({k}) {p}" for k, p in enumerate(problems[:3], 1))
        more = f" ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DataError(f"{len(problems)} of {len(dataset)} images cannot be used: {shown}{more}")
    data = UserImages(torch.stack(images).to(device))
    if captioned:
        data.captions, data.tokenizer = captions, tokenizer
        data.text_encoder = text_encoder.requires_grad_(False).eval().to(device)
        data.token_ids = data.tokenize(captions).to(device)
        data.empty_ids = data.tokenize([""])[0].to(device)
    return data


class PretrainStep:
    """The loop's step function: the objective's loss of the main network under its null
    context (or the batch's encoded captions), plus the regularizer's (LayerSync) when there is
    one."""

    def __init__(self, network, objective, context, regularizer=None, bf16: bool = False):
        self.network, self.objective, self.context = network, objective, context
        self.regularizer = regularizer
        device = next(network.parameters()).device
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def __call__(self, batch, step: int) -> StepOutput:
        """``batch``: images, or (images, encoded captions) for a network trained on text."""
        if torch.is_tensor(batch):
            x0, context = batch, self.context
        else:
            x0, context = batch[0], Context(encoder_hidden_states=batch[1])
        noised = self.objective.sample(x0)
        with self.autocast:
            pred = predict(self.network, noised.x_t, noised.timesteps, context)
            loss = self.objective.loss(pred, noised)
            logs = {"diffusion_loss": loss.detach()}
            if self.regularizer is not None:
                reg = self.regularizer.loss()
                loss = loss + reg.loss
                logs["layersync_loss"] = reg.loss.detach()
                logs.update(reg.logs)
        logs["loss"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)


# ----------------------------------------------------------------------------- callbacks


class EMA(Callback):
    """An exponential moving average of ``network``'s weights, updated after every step with
    the decay warmed up as ``min(decay, (1 + step) / (10 + step))``."""

    def __init__(self, network, decay: float):
        self.average = copy.deepcopy(network).requires_grad_(False)
        self.decay = decay
        self._targets, self._sources = list(self.average.parameters()), list(network.parameters())

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._targets, self._sources, 1 - decay)


class SampleGrids(Callback):
    """Every ``--sample_every`` steps and at the last step: sample the EMA network, score the
    samples' realism (and feature distance) per task, write a grid and a curve point.
    ``context``: what the samples are conditioned on (the training captions' encodings for a
    network trained on text), else the null context. A video network (its family's
    ``takes_video``) samples clips as long as the training clips and writes them animated."""

    def __init__(
        self, args, tasks, images, ema, scheduler, recorder, out: Path, distances, context=None
    ):
        self.args, self.tasks, self.images, self.ema = args, tasks, images, ema
        self.scheduler, self.recorder, self.distances = scheduler, recorder, distances
        self.out, self.context = out, context
        self.video = family_of_network(ema).takes_video
        # training data (N, C, F, H, W) for a video network
        self.frames = images.shape[2] if self.video else None
        self.t0 = time.perf_counter()
        self.last_sampled = None
        (out / "curve.jsonl").write_text("")

    def on_step_end(self, step: int) -> None:
        if step % self.args.sample_every == 0 or step == self.args.max_train_steps:
            self.write(step)

    def on_train_end(self, step: int) -> None:
        if step != self.last_sampled:
            self.write(step)

    def write(self, step: int) -> None:
        args, device = self.args, next(self.ema.parameters()).device
        samples = sample_unconditional(
            self.ema, self.scheduler, args.num_samples, args.resolution, args.sample_steps, 1234,
            device, self.context, self.frames,
        )  # fmt: skip
        reference = self.images[: args.num_samples].float() / 127.5 - 1
        last = self.recorder.last
        point = {
            "step": step,
            "seconds": time.perf_counter() - self.t0,
            "loss": last["loss"] if last else None,
        }
        if self.tasks:  # realism is a task's own measure; user images have none
            point["realism"] = {t.name: t.realism(samples) for t in self.tasks}
            point["realism_of_training_images"] = {t.name: t.realism(reference) for t in self.tasks}
        if self.distances:
            point["feature_distance"] = {name: fd(samples) for name, fd in self.distances.items()}
        JsonLines(self.out / "curve.jsonl").write([point])
        save_samples(samples[:64], self.out / "samples" / f"step-{step}", self.video)
        print(json.dumps(point), flush=True)
        self.last_sampled = step


def save_samples(samples: torch.Tensor, stem: Path, video: bool) -> None:
    """Samples in [-1, 1], 8 a row: images as ``stem.png``; clips (N, C, F, H, W) as
    ``stem.gif`` (the grid, animated) and ``stem_frames.png`` (one line of frames per clip)."""
    from ..eval.images import image_grid, to_uint8

    if video:
        from ..eval.video import video_to_uint8, write_animation

        clips = list(video_to_uint8(samples))
        rows = [clips[i : i + 8] for i in range(0, len(clips), 8)]
        write_animation(rows, stem.with_suffix(".gif"), stem.with_name(f"{stem.name}_frames.png"))
        return
    u8 = to_uint8(samples)
    image_grid([list(u8[i : i + 8]) for i in range(0, len(u8), 8)]).save(stem.with_suffix(".png"))


def feature_distances(args, tasks, device) -> dict:
    """Task-feature Fréchet distances per task when ``--feature_distance`` asks (default: on
    CUDA only, where training their feature networks is quick)."""
    if not (args.feature_distance or (args.feature_distance is None and device.type == "cuda")):
        return {}
    from ..eval.feature_distance import TaskFeatureDistance

    distances = {
        t.name: TaskFeatureDistance(
            t, train_steps=args.feature_network_steps, device=device
        ).prepare()
        for t in tasks
    }
    print("feature networks:", {n: round(d.accuracy, 3) for n, d in distances.items()})
    return distances


# ----------------------------------------------------------------------------- the run


def prepare_output(args) -> Path:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {args.output_dir!r} is a file; give a directory.")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    return out


def make_network(args, initial, device, cross_attention_dim: int | None = None):
    """(network in training mode on ``device``, scheduler, objective name, steps it was
    trained before): ``initial`` (from :func:`load_initial_network`) or a new one (attending
    to ``cross_attention_dim``-wide text when given). With ``--motion_modules_only`` only the
    motion modules keep ``requires_grad``."""
    if initial is not None:
        network, scheduler, objective, earlier_steps = initial
    else:
        network, scheduler, objective = build_main_network(args, cross_attention_dim)
        earlier_steps = 0
    if getattr(args, "motion_modules_only", False):
        from ..zoo.video import motion_module_parameters

        network.requires_grad_(False)
        for parameter in motion_module_parameters(network):
            parameter.requires_grad_(True)
    return network.to(device).train(), scheduler, objective, earlier_steps


def make_step(args, network, objective_name: str, scheduler, device) -> PretrainStep:
    """The objective, LayerSync on the main network when asked, and the step around them."""
    from ..core.objectives import make_objective

    objective = make_objective(
        objective_name, scheduler=None if objective_name == "flow" else scheduler
    )
    regularizer = None
    if args.regularizer == "layersync":
        from ..regularizers.layersync import LayerSync, default_pairs

        pairs = args.layersync_pairs or default_pairs(network)
        regularizer = LayerSync(network, pairs=pairs, weight=args.layersync_weight)
    context = null_context(network, args.train_batch_size, device)
    return PretrainStep(network, objective, context, regularizer, args.mixed_precision == "bf16")


def make_optimizer(args, network):
    """AdamW over the trainable parameters without weight decay, and a linear warmup over
    ``--lr_warmup_steps``."""
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(args.lr_warmup_steps, 1))
    )
    return optimizer, warmup


def fit_network(args, network, step_fn, images, recorder, callbacks, batches=None) -> int:
    """Run the shared loop on ``network`` over ``batches`` (default: random batches of
    ``images``); returns the steps done (fewer than ``--max_train_steps`` when the time budget
    ran out)."""
    optimizer, warmup = make_optimizer(args, network)
    loop = Loop(
        recorder.accelerator,
        network,
        step_fn,
        optimizer,
        warmup,
        recorder,
        max_grad_norm=1.0,
        on_nonfinite=None,  # no per-step host sync; a NaN shows in the loss log and curve
        callbacks=callbacks,
    )
    if batches is None:
        batches = image_batches(images, args.train_batch_size, args.seed, args.time_budget_s)
    return loop.run(batches, 0, args.max_train_steps)


def loss_recorder(out: Path, device) -> LossRecorder:
    """A record per step in ``loss_log.jsonl``, written every :data:`FLUSH_STEPS` steps (and
    when a sample grid reads the newest loss)."""
    from accelerate import Accelerator

    # One process; the step applies bf16 autocast itself.
    accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    log = out / "loss_log.jsonl"
    log.write_text("")
    return LossRecorder(accelerator, [JsonLines(log)], logging_steps=1, flush_steps=FLUSH_STEPS)


def pretrain(args: argparse.Namespace, command: str | None = None) -> Path:
    """Train a main network as ``args`` (the flags of ``lisa pretrain``) say; returns the saved
    model folder. ``command``, the command line that reproduces the run, goes into the model's
    metadata."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names, tasks, user, out, initial = _check_and_prepare(args, device)
    captioned = user is not None and user.text_encoder is not None
    if user is None:
        t0 = time.perf_counter()
        images = render_dataset(tasks, args.train_size, args.seed, args.num_workers).to(device)
        print(f"rendered {len(images)} renders {tuple(images.shape[1:])} in "
              f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    else:
        images = user.images
    text_width = user.text_encoder.config.hidden_size if captioned else None
    network, scheduler, objective, earlier_steps = make_network(args, initial, device, text_width)
    ema = EMA(network, args.ema_decay)  # before LayerSync hooks the network
    step_fn = make_step(args, network, objective, scheduler, device)
    n_params = sum(p.numel() for p in network.parameters())
    n_trained = sum(p.numel() for p in network.parameters() if p.requires_grad)
    trained = "" if n_trained == n_params else f" ({n_trained / 1e6:.2f}M trained)"
    print(f"main network: {n_params / 1e6:.2f}M parameters{trained} on {device}")
    if args.torch_compile:
        from .compilation import compile_blocks

        # after LayerSync's hooks, which keep their blocks eager
        print("torch.compile:", compile_blocks(network, args.torch_compile_backend))
    distances = feature_distances(args, tasks, device) if tasks else {}
    recorder = loss_recorder(out, device)
    sample_context, batches = None, None
    if captioned:  # samples from the first training captions, repeated up to --num_samples
        rows = torch.arange(args.num_samples, device=device) % len(user.token_ids)
        sample_context = Context(encoder_hidden_states=user.encode(user.token_ids[rows]))
        proportion = 0.1 if args.proportion_empty_prompts is None else args.proportion_empty_prompts
        batches = captioned_batches(
            user, args.train_batch_size, args.seed, proportion, args.time_budget_s
        )
    grids = SampleGrids(
        args, tasks, images, ema.average, scheduler, recorder, out, distances, sample_context
    )
    steps = fit_network(args, network, step_fn, images, recorder, [ema, grids], batches)
    if step_fn.regularizer is not None:
        step_fn.regularizer.remove_hooks()
    model_dir = out / "model"
    metadata = dict(
        objective=objective,
        steps=earlier_steps + steps,
        parameters=n_params,
        initialized_from=args.init_from,
        command=command,
    )
    _save_model(args, model_dir, ema, scheduler, names, user, metadata)
    plot_curve(out)
    print(f"saved main network to {model_dir}")
    return model_dir


def _check_and_prepare(args, device):
    """(task names, tasks, the user's images or None, the output folder, the network to start
    from or None), every flag checked before anything is written or rendered."""
    from ..data.tasks import get_task

    check_data_flags(args)
    names = [n.strip() for n in args.task.split(",") if n.strip()] if args.task else []
    settings = {} if args.num_frames is None else {"frames": args.num_frames}
    tasks = [get_task(n, resolution=args.resolution, **settings) for n in names]
    args.architecture = resolve_architecture(args, tasks)
    user = None
    if not tasks:  # before the output folder, so bad data leaves nothing behind
        t0 = time.perf_counter()
        user = read_user_images(args, device)
        print(f"read {len(user.images)} images in {time.perf_counter() - t0:.1f}s")
    out = prepare_output(args)
    if args.torch_compile:
        from .compilation import check_backend

        check_backend(args.torch_compile_backend)
    # before rendering, so a wrong folder fails in seconds, not after minutes of rendering
    initial = load_initial_network(args) if args.init_from else None
    if initial is not None and user is not None and user.text_encoder is not None:
        width = initial[0].config.get("cross_attention_dim")
        if width != user.text_encoder.config.hidden_size:
            raise ConfigError(
                f"--init_from {args.init_from!r} attends to {width}-wide text but the "
                f"--text_encoder's hidden size is {user.text_encoder.config.hidden_size}; pass "
                "the text encoder it was trained with."
            )
    return names, tasks, user, out, initial


def _save_model(args, model_dir, ema, scheduler, names, user, metadata) -> None:
    """The EMA network as a `lisa pretrain` model folder, with the text encoder it was trained
    with and where its images came from."""
    captioned = user is not None and user.text_encoder is not None
    if user is None:
        source = {"tasks": names}
    else:
        source = {"data": args.train_data_dir or args.dataset_name, "images": len(user.images)}
        if captioned:
            source["caption_column"] = args.caption_column or "text"
    dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    save_pixel_model(
        model_dir,
        ema.average.to(dtype).cpu(),
        scheduler,
        args.resolution,
        names[0] if len(names) == 1 else None,
        text_encoder=user.text_encoder.cpu() if captioned else None,
        tokenizer=user.tokenizer if captioned else None,
        **source,
        **metadata,
    )


def plot_curve(out: Path) -> None:
    """``training_curve.png``: the diffusion loss (means of windows), the samples' realism per
    task and, when scored, their feature distance, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    points = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    with_realism = bool(points) and "realism" in points[0]
    with_distance = bool(points) and "feature_distance" in points[0]
    panels = 1 + with_realism + with_distance
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    axes = list(axes[0])
    a = axes[0]
    steps = [r["step"] for r in losses]
    raw = torch.tensor([r["diffusion_loss"] for r in losses])
    k = max(1, len(raw) // 100)
    smooth = raw.unfold(0, k, k).mean(1) if len(raw) >= k else raw
    a.plot(steps[k - 1 :: k][: len(smooth)], smooth.tolist())
    a.set_xlabel("step")
    a.set_ylabel("diffusion loss (mean of windows)")
    if with_realism:
        b = axes[1]
        for name in points[0]["realism"]:
            b.plot([p["step"] for p in points], [p["realism"][name] for p in points], label=name)
        b.set_xlabel("step")
        b.set_ylabel("realism of samples")
        b.legend()
    if with_distance:
        c = axes[-1]
        for name in points[0]["feature_distance"]:
            c.plot([p["step"] for p in points], [p["feature_distance"][name] for p in points])
        c.set_xlabel("step")
        c.set_ylabel("task-feature Fréchet distance")
        c.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=100)
    plt.close(fig)
