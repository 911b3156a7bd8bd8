"""Everything ``lisa train`` trains with, built from a :class:`TrainConfig`: the accelerator,
main model, dataset, dual branch, regularizers, step module, optimizer (with its parameter
groups), LR scheduler, data order and loader, validator, and the state of a resumed run.

This module is where the trainer calls into the model families, regularizers and evaluation;
it knows their interfaces, not their internals. :func:`build` runs the builders in the order
that fixes the random streams (weights initialized from the seed, then noise and timesteps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..core.errors import CheckpointError, ConfigError, DataError, ModelError
from ..core.weighting import make_weighting
from ..core.step import ControlTrainingStep
from . import checkpoint as ckpt
from .config import TrainConfig


@dataclass
class Training:
    """What :func:`build` returns: the prepared (DDP-wrapped) step module and its unwrapped
    ``inner`` module, and what the loop, the callbacks and a resume need."""

    model: Any  # the MainModel
    dataset: Any
    sample_size: int
    step_module: torch.nn.Module
    inner: ControlTrainingStep
    encoders: Any  # FrozenEncoders
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    order: Any  # ResumableBatchOrder
    max_steps: int


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    # accelerate keeps one state per process and refuses a second run (a notebook, a benchmark,
    # a test) another mixed precision; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to in (None, "none") else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)
        ),
        # Without a GPU, processes started by `accelerate launch` form a gloo group on the CPU.
        cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
    )
    if cfg.seed is not None:
        set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def build(cfg: TrainConfig, accelerator) -> Training:
    """Build every part of a run, on ``accelerator``'s device, prepared for it."""
    model = load_model(cfg)
    dataset, resolution = build_dataset(cfg, model)
    sample_size, condition_channels = data_shapes(model, dataset, resolution)
    branch = build_branch(cfg, model, condition_channels, getattr(dataset, "condition_names", ()))
    regularizers = build_regularizers(cfg, branch, sample_size)
    if cfg.loss_weighting is None:
        # Resolved before any checkpoint is written, so checkpoints record what ran.
        cfg.loss_weighting = model.default_loss_weighting(cfg.prediction_type)
    weighting = make_weighting(cfg.loss_weighting, cfg.snr_gamma, cfg.x0_weight_max)
    objective = model.training_objective(cfg.prediction_type, cfg.timestep_sampler, weighting)
    step_module = ControlTrainingStep(branch, objective, regularizers)
    if cfg.torch_compile:
        compile_networks(cfg, branch, accelerator.print)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    branch.main_network.to(accelerator.device)
    if weight_dtype != torch.float32:
        branch.main_network.to(dtype=weight_dtype)
    encoders = build_encoders(cfg, model, accelerator.device, weight_dtype)
    optimizer = build_optimizer(cfg, step_module, accelerator.num_processes)
    order = build_batch_order(cfg, dataset, accelerator)
    steps_per_epoch = math.ceil(order.batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(cfg, optimizer, max_steps, accelerator.num_processes)
    prepared, optimizer, lr_scheduler = accelerator.prepare(step_module, optimizer, lr_scheduler)
    return Training(
        model=model,
        dataset=dataset,
        sample_size=sample_size,
        step_module=prepared,
        inner=accelerator.unwrap_model(prepared),
        encoders=encoders,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        order=order,
        max_steps=max_steps,
    )


# ----------------------------------------------------------------------------- model and data


def load_model(cfg: TrainConfig):
    from ..families.loading import load_main_model

    return load_main_model(
        cfg.pretrained_model_name_or_path, cfg.task, cfg.revision, cfg.variant, cfg.allow_pickle
    )


def data_resolution_multiple(model) -> int:
    """The multiple a dataset checks its size against: the latent model's rule (VAE and
    network down-sampling); 1 for pixel-space models, which check their size themselves."""
    return 1 if model.vae is None else model.resolution_multiple


def build_dataset(cfg: TrainConfig, model):
    """(dataset, resolution): a task's renders, an image folder / hub dataset, or for video
    models a video folder / hub dataset."""
    resolution = cfg.resolution or model.resolution
    if model.family.takes_video and not isinstance(cfg.conditioning_image_column, str):
        raise ConfigError(
            f"--conditioning_image_column {' '.join(cfg.conditioning_image_column)} trains one "
            f"side network per condition, composed, but video side networks are not composed; "
            f"{model.family.name} trains one, on --conditioning_video_column."
        )
    task = cfg.task or (None if cfg.train_data_dir or cfg.dataset_name else model.task)
    if task:
        from ..data.multi import select_task_conditions
        from ..data.tasks import TaskDataset, get_task

        settings = {} if cfg.num_frames is None else {"frames": cfg.num_frames}
        task = get_task(task, resolution=resolution, **settings)
        check_task_fits_model(task, model)
        task = select_task_conditions(task, cfg.conditioning_image_column)
        return TaskDataset(task, size=cfg.task_train_size, seed=cfg.seed or 0), resolution
    if not (cfg.train_data_dir or cfg.dataset_name):
        raise ConfigError("no training data: pass --train_data_dir, --dataset_name or --task.")
    if model.family.takes_video:
        return build_video_dataset(cfg, model, resolution), resolution
    from ..data.folder import ControlDataset
    from ..data.multi import MultiConditionDataset

    dataset_class = ControlDataset
    columns = {"conditioning_image_column": cfg.conditioning_image_column}
    if not isinstance(cfg.conditioning_image_column, str):  # several conditions
        dataset_class = MultiConditionDataset
        columns = {"conditioning_image_columns": cfg.conditioning_image_column}
    dataset = dataset_class(
        cfg.train_data_dir or cfg.dataset_name,
        resolution=resolution,
        image_column=cfg.image_column,
        **columns,
        caption_column=cfg.caption_column,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
        seed=cfg.seed or 0,
        max_samples=cfg.max_train_samples,
        dataset_config_name=cfg.dataset_config_name,
        resolution_multiple=data_resolution_multiple(model),
    )
    return dataset, resolution


def check_task_fits_model(task, model) -> None:
    """Refuse a video task (one with ``frames``) for an image model and the reverse."""
    video_task = getattr(task, "frames", None) is not None
    if video_task != model.family.takes_video:
        wants = "videos" if model.family.takes_video else "images"
        raise ConfigError(
            f"task {task.name!r} renders {'videos' if video_task else 'images'} but the main "
            f"network ({model.family.name}) denoises {wants}; pick a task of its kind "
            f"({'pose_video' if model.family.takes_video else 'pose, edges, ...'}) or another "
            "model."
        )


def build_video_dataset(cfg: TrainConfig, model, resolution: int):
    """Clips from a folder or hub dataset naming videos and condition videos."""
    from ..data.video_folder import VideoControlDataset

    return VideoControlDataset(
        cfg.train_data_dir or cfg.dataset_name,
        resolution=resolution,
        num_frames=cfg.num_frames or 8,
        video_column=cfg.video_column,
        conditioning_video_column=cfg.conditioning_video_column,
        caption_column=cfg.caption_column,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
        seed=cfg.seed or 0,
        max_samples=cfg.max_train_samples,
        dataset_config_name=cfg.dataset_config_name,
        resolution_multiple=data_resolution_multiple(model),
    )


def data_shapes(model, dataset, resolution: int) -> tuple[int, int]:
    """(sample size the main network denoises, channels of the side network's condition)."""
    model.check_resolution(resolution)
    condition_channels = getattr(dataset, "condition_channels", 3)
    if model.condition_in_latent_space:
        if condition_channels != 3:
            raise DataError(
                f"{model.family.name} ControlNets take the VAE-encoded control image, which must be "
                f"RGB; the data has {condition_channels}-channel conditions."
            )
        condition_channels = model.family.latent_condition_channels(model)
    return resolution // model.vae_scale_factor, condition_channels


def build_encoders(cfg: TrainConfig, model, device, dtype):
    from ..families.encoders import FrozenEncoders

    return FrozenEncoders(model, device, dtype, cache=cfg.cache_latents)


# ----------------------------------------------------------------------------- networks


def build_branch(cfg: TrainConfig, model, condition_channels: int, condition_names=()):
    """The dual branch of the main model's family, with a new or loaded side network; with
    several ``condition_names``, one side network per condition, composed."""
    from ..families import branch_class
    from ..families.loading import load_side_network

    if len(condition_names) > 1:
        from .composition import build_composed_branch

        return build_composed_branch(cfg, model, condition_channels, condition_names)

    cls = branch_class(model.family, cfg.side_network)
    side_network = None
    if cfg.controlnet_model_name_or_path:
        side_network = load_side_network(
            cfg.controlnet_model_name_or_path, cfg.allow_pickle, cls.side_network_class
        )
    branch = cls.for_training(
        model.main_network, side_network, condition_channels, model.vae_scale_factor
    )
    expected = branch.condition_channels
    if expected != condition_channels:
        raise ModelError(
            f"the side network takes {expected}-channel conditions but the data has "
            f"{condition_channels} channels; convert the condition images or use a side network "
            f"built with conditioning_channels={condition_channels}."
        )
    if cfg.gradient_checkpointing:
        branch.side_network.enable_gradient_checkpointing()
    return branch


def build_regularizers(cfg: TrainConfig, branch, sample_size: int) -> list:
    """The regularizers of ``--regularizer``, each built by its registered builder from the
    config's ``<name>_*`` settings."""
    from ..regularizers import build_regularizers as build_named

    return build_named(cfg.regularizer_names, branch, sample_size, vars(cfg))


def compile_networks(cfg: TrainConfig, branch, report) -> None:
    """torch.compile both networks' blocks; after the regularizers, whose hooks decide which
    blocks stay eager."""
    from .compilation import compile_blocks

    for role, net in (("main", branch.main_network), ("side", branch.side_network)):
        counts = compile_blocks(net, cfg.torch_compile_backend)
        report(
            f"torch.compile ({cfg.torch_compile_backend}): {role} network "
            f"{counts['compiled']} blocks compiled, {counts['left_eager']} left eager (hooked)"
        )


# ----------------------------------------------------------------------------- optimization


def parameter_groups(step_module, lr: float, overrides: dict[str, float]) -> list[dict]:
    """Optimizer parameter groups: every trainable parameter at ``lr``, except those of the
    regularizers named in ``overrides`` (regularizer name -> learning rate), which follow in a
    group each, in the step module's regularizer order."""
    regularizers = list(step_module.regularizers)
    unknown = set(overrides) - {r.name for r in regularizers}
    if unknown:
        raise ValueError(f"learning rates for regularizers not in the step: {sorted(unknown)}")
    own = [r for r in regularizers if r.name in overrides]
    apart = {id(p) for r in own for p in r.parameters()}
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in apart], "lr": lr}]
    for reg in own:
        params = [p for p in reg.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": overrides[reg.name]})
    return groups


def learning_rates(cfg: TrainConfig, num_processes: int) -> tuple[float, dict[str, float]]:
    """(side network's learning rate, regularizer name -> its own rate), both scaled by the
    global batch size under ``--scale_lr``."""
    scale = 1.0
    if cfg.scale_lr:
        scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes
    overrides = {}
    if cfg.lisa_decoder_learning_rate is not None:
        overrides["lisa"] = cfg.lisa_decoder_learning_rate * scale
    return cfg.learning_rate * scale, overrides


def build_optimizer(cfg: TrainConfig, step_module, num_processes: int):
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        # As in diffusers' script: bitsandbytes is the user's choice, not our dependency.
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or "
                "drop the flag."
            ) from None
        optimizer_cls = bnb.optim.AdamW8bit
    lr, overrides = learning_rates(cfg, num_processes)
    optimizer = optimizer_cls(
        parameter_groups(step_module, lr, overrides),
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    for reg in step_module.regularizers:
        reg.check_optimizer(optimizer)
    return optimizer


def build_lr_scheduler(cfg: TrainConfig, optimizer, max_steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


# ----------------------------------------------------------------------------- data order


def build_batch_order(cfg: TrainConfig, dataset, accelerator):
    from ..data.sampler import ResumableBatchOrder

    return ResumableBatchOrder(
        len(dataset),
        cfg.train_batch_size,
        seed=cfg.seed or 0,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )


class _Batches(Sampler):
    def __init__(self, order, start):
        self.order, self.start = order, start

    def __iter__(self):
        # (epoch, index) keys: per-visit draws (caption dropout) follow the resumable order.
        yield from self.order.batch_keys(self.start)


def build_loader(cfg: TrainConfig, dataset, order, start_step: int) -> DataLoader:
    """This rank's micro-batches from optimizer step ``start_step`` on, endlessly."""
    return DataLoader(
        dataset,
        batch_sampler=_Batches(order, start_step * cfg.gradient_accumulation_steps),
        num_workers=cfg.dataloader_num_workers,
        # Its own generator: iterating a DataLoader draws a worker seed, which must not shift
        # the global RNG stream that noise and timesteps come from (resume would drift).
        generator=torch.Generator().manual_seed(cfg.seed or 0),
    )


def build_validator(cfg: TrainConfig, run: Training):
    """The validator of ``--validation_image`` or of the task's held-out conditions; None when
    validation is off or there is nothing to validate on."""
    if not cfg.validation_steps or not (cfg.validation_image or hasattr(run.dataset, "task")):
        return None
    from ..eval.validation import Validator

    return Validator.from_config(cfg, run.model, run.dataset, run.encoders, run.sample_size)


# ----------------------------------------------------------------------------- resume


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


# Settings resolved per run when left unnamed, at the values a checkpoint that does not record
# them ran with.
UNRECORDED_SETTINGS = {"loss_weighting": "none"}


def adopt_checkpoint_settings(cfg: TrainConfig) -> None:
    """Settings left unnamed on a resumed run take the checkpoint's values, so that resuming
    with the command that started the run continues it, whatever the defaults resolve to."""
    if not cfg.resume_from_checkpoint or cfg.loss_weighting is not None:
        return
    path = ckpt.resolve_resume_path(Path(cfg.output_dir), cfg.resume_from_checkpoint)
    if path is None:
        return
    fingerprint = ckpt.read_trainer_state(path).get("fingerprint", {})
    cfg.loss_weighting = fingerprint.get("loss_weighting", UNRECORDED_SETTINGS["loss_weighting"])


def resume(cfg: TrainConfig, run: Training, accelerator) -> int:
    """Restore the checkpoint ``--resume_from_checkpoint`` names into ``run``; returns its
    step (0 when ``latest`` finds none). Refuses one written under another fingerprint."""
    output_dir = Path(cfg.output_dir)
    path = ckpt.resolve_resume_path(output_dir, cfg.resume_from_checkpoint)
    if path is None:
        accelerator.print("no checkpoint to resume from; starting a new run")
        return 0
    saved = ckpt.read_trainer_state(path)
    now = jsonable(cfg.fingerprint())
    # A setting newer than the checkpoint was at its default when the checkpoint ran.
    then = jsonable(TrainConfig().fingerprint()) | UNRECORDED_SETTINGS | saved.get("fingerprint", {})
    diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written by another configuration (saved vs now: "
            f"{diff}); resume with the same settings or use a new --output_dir."
        )
    ckpt.load_checkpoint(
        path,
        side_network=run.inner.branch.side_network,
        regularizers=run.inner.regularizers,
        optimizer=run.optimizer,
        lr_scheduler=run.lr_scheduler,
        rank=accelerator.process_index,
        grad_scaler=accelerator.scaler,
    )
    accelerator.print(f"resumed from {path} at step {saved['step']}")
    return int(saved["step"])


def save_checkpoint(cfg: TrainConfig, run: Training, accelerator, step: int) -> None:
    """Write ``checkpoint-<step>`` (every rank's RNG state, the rest from the main process)."""
    rng = [ckpt.rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    if accelerator.is_main_process:
        ckpt.save_checkpoint(
            cfg.output_dir,
            step,
            side_network=run.inner.branch.side_network,
            regularizers=run.inner.regularizers,
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            trainer_state={"fingerprint": jsonable(cfg.fingerprint())},
            rng_states=rng,
            total_limit=cfg.checkpoints_total_limit,
            grad_scaler=accelerator.scaler,
        )
    accelerator.wait_for_everyone()
