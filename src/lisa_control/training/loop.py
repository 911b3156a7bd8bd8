"""The training loop, on accelerate. It knows the interfaces (DualBranch, Objective,
Regularizer, datasets) and nothing about which model family or regularizer it runs.

Read top to bottom: build everything from the config, restore a checkpoint if asked, then loop:
encode -> one ControlTrainingStep -> guard against non-finite values -> optimizer step ->
log, checkpoint, validate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt
from ..families import branch_class
from .config import TrainConfig
from ..families.encoders import FrozenEncoders
from ..core.errors import CheckpointError, ConfigError, DataError, ModelError, NonFiniteLossError
from ..families.loading import MainModel, load_main_model, load_side_network
from ..core.step import ControlTrainingStep

logger = logging.getLogger("lisa_control")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    final_side_network: Path | None = None


# ----------------------------------------------------------------------------- building blocks


def build_dataset(cfg: TrainConfig, model: MainModel):
    resolution = cfg.resolution or model.resolution
    if cfg.task:
        from ..data.tasks import TaskDataset, get_task

        task = get_task(cfg.task, resolution=resolution)
        return TaskDataset(task, size=cfg.task_train_size, seed=cfg.seed or 0), resolution
    if cfg.train_data_dir or cfg.dataset_name:
        from ..data.folder import ControlDataset

        dataset = ControlDataset(
            cfg.train_data_dir or cfg.dataset_name,
            resolution=resolution,
            image_column=cfg.image_column,
            conditioning_image_column=cfg.conditioning_image_column,
            caption_column=cfg.caption_column,
            proportion_empty_prompts=cfg.proportion_empty_prompts,
            seed=cfg.seed or 0,
            max_samples=cfg.max_train_samples,
            dataset_config_name=cfg.dataset_config_name,
            resolution_multiple=8 * model.vae_scale_factor // (8 if model.vae is None else 1),
        )
        return dataset, resolution
    if model.task:
        from ..data.tasks import TaskDataset, get_task

        task = get_task(model.task, resolution=resolution)
        return TaskDataset(task, size=cfg.task_train_size, seed=cfg.seed or 0), resolution
    raise ConfigError("no training data: pass --train_data_dir, --dataset_name or --task.")


def build_branch(cfg: TrainConfig, model: MainModel, condition_channels: int):
    """The dual branch of the main model's family, with a new or loaded side network."""
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
    names = [n for n in cfg.regularizer.split("+") if n != "none"]
    regularizers = []
    for name in names:
        if name == "lisa":
            from ..regularizers.lisa import lisa_for_branch

            regularizers.append(
                lisa_for_branch(
                    branch,
                    layer=cfg.lisa_layer,
                    weight=cfg.lisa_weight,
                    sample_size=sample_size,
                    distance=cfg.lisa_distance,
                    target=cfg.lisa_target,
                    final_weight=cfg.lisa_final_weight,
                    weight_decay_steps=cfg.lisa_weight_decay_steps,
                    timestep_range=tuple(cfg.lisa_timestep_range)
                    if cfg.lisa_timestep_range
                    else None,
                    learning_rate=cfg.lisa_decoder_learning_rate,
                )
            )
        elif name == "layersync":
            from ..regularizers.layersync import LayerSync, default_pairs

            pairs = cfg.layersync_pairs or default_pairs(branch.side_network)
            regularizers.append(
                LayerSync(branch.side_network, pairs=pairs, weight=cfg.layersync_weight)
            )
    return regularizers


class _Batches(Sampler):
    def __init__(self, order, start):
        self.order, self.start = order, start

    def __iter__(self):
        # (epoch, index) keys: datasets draw per-visit caption choices from the epoch.
        yield from self.order.batch_keys(self.start)


def _nonfinite_terms(logs: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in logs.items() if not torch.isfinite(v).all()]


def _gradient_is_nonfinite_error(accelerator, norm) -> bool:
    """Whether a clipped gradient's norm goes to the non-finite guard. Under fp16 accelerate
    keeps a GradScaler (``accelerator.scaler``), and an overflowing gradient is the scaler's
    signal, not an error: ``optimizer.step()`` skips the update and lowers the scale, and
    ``accelerator.optimizer_step_was_skipped`` reports it. Under bf16 and fp32 there is no
    scaler and a non-finite norm is an error."""
    return accelerator.scaler is None and not torch.isfinite(torch.as_tensor(norm)).all()


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from ..data.sampler import ResumableBatchOrder

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

    model = load_main_model(
        cfg.pretrained_model_name_or_path, cfg.task, cfg.revision, cfg.variant, cfg.allow_pickle
    )
    dataset, resolution = build_dataset(cfg, model)
    if resolution % model.resolution_multiple:
        raise ConfigError(
            f"--resolution {resolution} is not divisible by {model.resolution_multiple}, the "
            "model's down-sampling factor."
        )
    sample_size = resolution // model.vae_scale_factor
    condition_channels = getattr(dataset, "condition_channels", 3)
    if model.condition_in_latent_space:
        if condition_channels != 3:
            raise DataError(
                f"{model.family.name} ControlNets take the VAE-encoded control image, which must be "
                f"RGB; the data has {condition_channels}-channel conditions."
            )
        condition_channels = model.vae.config.latent_channels
    branch = build_branch(cfg, model, condition_channels)
    regularizers = build_regularizers(cfg, branch, sample_size)
    objective = model.training_objective(cfg.prediction_type, cfg.timestep_sampler)
    step_module = ControlTrainingStep(branch, objective, regularizers)
    if cfg.torch_compile:
        from .compilation import compile_blocks

        # After the regularizers: their hooks decide which blocks stay eager.
        for role, net in (("main", branch.main_network), ("side", branch.side_network)):
            counts = compile_blocks(net, cfg.torch_compile_backend)
            accelerator.print(
                f"torch.compile ({cfg.torch_compile_backend}): {role} network "
                f"{counts['compiled']} blocks compiled, {counts['left_eager']} left eager (hooked)"
            )

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    branch.main_network.to(accelerator.device)
    if weight_dtype != torch.float32:
        branch.main_network.to(dtype=weight_dtype)
    encoders = FrozenEncoders(model, accelerator.device, weight_dtype, cache=cfg.cache_latents)

    lr_scale = 1.0
    if cfg.scale_lr:
        lr_scale = (
            cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
        )
    lr = cfg.learning_rate * lr_scale
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
    optimizer = optimizer_cls(
        step_module.parameter_groups(lr_scale),
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    for reg in regularizers:
        reg.check_optimizer(optimizer)

    order = ResumableBatchOrder(
        len(dataset),
        cfg.train_batch_size,
        seed=cfg.seed or 0,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    steps_per_epoch = math.ceil(order.batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    step_module, optimizer, lr_scheduler = accelerator.prepare(step_module, optimizer, lr_scheduler)
    inner = accelerator.unwrap_model(step_module)

    global_step = 0
    log_path = output_dir / "loss_log.jsonl"
    if cfg.resume_from_checkpoint:
        path = ckpt.resolve_resume_path(output_dir, cfg.resume_from_checkpoint)
        if path is None:
            accelerator.print("no checkpoint to resume from; starting a new run")
        else:
            saved = ckpt.read_trainer_state(path)
            now = _jsonable(cfg.fingerprint())
            # A setting newer than the checkpoint was at its default when the checkpoint ran.
            then = _jsonable(TrainConfig().fingerprint()) | saved.get("fingerprint", {})
            diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
            if diff:
                raise CheckpointError(
                    f"checkpoint {path} was written by another configuration (saved vs now: "
                    f"{diff}); resume with the same settings or use a new --output_dir."
                )
            ckpt.load_checkpoint(
                path,
                side_network=inner.branch.side_network,
                regularizers=inner.regularizers,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                rank=accelerator.process_index,
            )
            global_step = int(saved["step"])
            _truncate_log(log_path, global_step)
            _truncate_log(output_dir / "validation.jsonl", global_step)
            accelerator.print(f"resumed from {path} at step {global_step}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=2))
        if accelerator.log_with:
            accelerator.init_trackers(
                cfg.tracker_project_name,
                config={k: v for k, v in _jsonable(asdict(cfg)).items() if _scalar(v)},
            )

    validator = None
    if cfg.validation_steps and (cfg.validation_image or hasattr(dataset, "task")):
        from ..eval.validation import Validator

        validator = Validator.from_config(cfg, model, dataset, encoders, sample_size)

    loader = DataLoader(
        dataset,
        batch_sampler=_Batches(order, global_step * cfg.gradient_accumulation_steps),
        num_workers=cfg.dataloader_num_workers,
        # Its own generator: iterating a DataLoader draws a worker seed, which must not shift
        # the global RNG stream that noise and timesteps come from (resume would drift).
        generator=torch.Generator().manual_seed(cfg.seed or 0),
    )
    losses: list[dict] = []
    validation: list[dict] = []
    progress = _progress(cfg, accelerator, global_step, max_steps)
    step_module.train()
    window: dict[str, torch.Tensor] = {}
    skipped_steps = 0  # optimizer steps the fp16 grad scaler skipped in this process's run
    t_start = t_last = time.perf_counter()
    for batch in loader:
        if global_step >= max_steps:
            break
        with accelerator.accumulate(step_module):
            x0, context, condition = encoders.encode(batch)
            out = step_module(x0, context, condition, step=global_step)
            bad = _nonfinite_terms(out.logs)
            flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=x0.device), "max")
            if flag.item() > 0:
                _handle_nonfinite(cfg, global_step + 1, bad or ["another rank's loss"], "loss")
                optimizer.zero_grad(set_to_none=True)
                continue
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(inner.trainable_parameters(), cfg.max_grad_norm)
                if _gradient_is_nonfinite_error(accelerator, norm):
                    _handle_nonfinite(cfg, global_step + 1, _grad_terms(out.logs), "gradient")
                    optimizer.zero_grad(set_to_none=True)
                    continue
            optimizer.step()
            if accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                skipped_steps += 1
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in out.logs.items():
            window[k] = window.get(k, 0) + v.detach().float() / cfg.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {k: accelerator.reduce(v, "mean").item() for k, v in window.items()}
        window = {}
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        if accelerator.scaler is not None:
            logs["skipped_steps"] = skipped_steps
        # Wall time since the previous step was logged (validation and checkpoints included).
        now = time.perf_counter()
        logs["step_seconds"], t_last = now - t_last, now
        record = {"step": global_step, **logs}
        losses.append(record)
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            # Every rank records what it saw after the all-reduce, so agreement can be checked.
            rank_log = output_dir / f"loss_log.rank{accelerator.process_index}.jsonl"
            with rank_log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if accelerator.log_with:
                accelerator.log(logs, step=global_step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{logs['loss']:.4f}",
                **({"aux": f"{logs['aux_loss']:.4f}"} if "aux_loss" in logs else {}),
            )
        if global_step % cfg.checkpointing_steps == 0 or global_step == max_steps:
            _save(cfg, accelerator, inner, optimizer, lr_scheduler, global_step, output_dir)
        if validator is not None and (
            global_step % cfg.validation_steps == 0 or global_step == max_steps
        ):
            if accelerator.is_main_process:
                metrics = validator.run(inner.branch, global_step, output_dir / "validation")
                if metrics:
                    validation.append({"step": global_step, **metrics})
                    with (output_dir / "validation.jsonl").open("a") as f:
                        f.write(json.dumps(validation[-1]) + "\n")
                    if accelerator.log_with:
                        accelerator.log(
                            {f"validation/{k}": v for k, v in metrics.items()}, global_step
                        )
            accelerator.wait_for_everyone()
    if progress is not None:
        progress.close()

    final = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = output_dir / "controlnet"
        inner.branch.save_side_network(final)
        elapsed = time.perf_counter() - t_start
        accelerator.print(f"saved side network to {final} ({elapsed:.1f}s)")
    accelerator.end_training()
    for reg in regularizers:
        reg.remove_hooks()
    return TrainResult(output_dir, global_step, losses, validation, final)


# ----------------------------------------------------------------------------- helpers


def _save(cfg, accelerator, inner, optimizer, lr_scheduler, step, output_dir):
    rng = [ckpt.rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    if accelerator.is_main_process:
        ckpt.save_checkpoint(
            output_dir,
            step,
            side_network=inner.branch.side_network,
            regularizers=inner.regularizers,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            trainer_state={"fingerprint": _jsonable(cfg.fingerprint())},
            rng_states=rng,
            total_limit=cfg.checkpoints_total_limit,
        )
    accelerator.wait_for_everyone()


def _handle_nonfinite(cfg, step, terms, what):
    message = (
        f"non-finite {what} at step {step} in {', '.join(terms)}; the last checkpoint is intact. "
        "Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or pass "
        "--on_nonfinite skip to skip such steps."
    )
    if cfg.on_nonfinite == "stop":
        raise NonFiniteLossError(message)
    logger.warning(message.replace("; the last", " (skipped); the last"))


def _grad_terms(logs):
    return [k for k in logs if k.endswith("_loss") and k != "loss"] or ["loss"]


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it is resumed from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the kill
    path.write_text("".join(line + "\n" for line in kept))


def _progress(cfg, accelerator, start, total):
    if not cfg.progress or not accelerator.is_local_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="steps", dynamic_ncols=True)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool))
