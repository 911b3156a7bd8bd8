"""Validation during training: sample with the current side network for fixed conditions and a
fixed seed, write a PNG grid (condition | samples [| ground truth]) and, for embedded tasks,
score the samples with the task's fidelity metric."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.branch import Context
from ..core.errors import ConfigError
from .images import image_grid, to_uint8

# Held-out conditions of an embedded task come from stream HELD_OUT_SEED + seed, which the
# training stream (seed, index) never reaches.
HELD_OUT_SEED = 10_007


def held_out_task_samples(task, count: int, seed: int = 0) -> list:
    """The ``count`` held-out samples of ``task`` that validation, the convergence benchmark and
    ``lisa eval`` score: ``task.sample(HELD_OUT_SEED + seed, i)`` for i < count."""
    return [task.sample(seed=HELD_OUT_SEED + seed, index=i) for i in range(count)]


def score_task_samples(task, images: torch.Tensor, samples: list, feature_distance=None) -> dict:
    """The scores validation logs for one sample per held-out condition: the task's fidelity
    metric of ``images`` (N, 3, H, W) in [-1, 1] (a video task's videos (N, 3, F, H, W))
    against ``samples`` (the task samples whose conditions produced them, in order), and the
    feature distance when one is given, under
    :func:`~lisa_control.eval.feature_distance.feature_distance_name` (``feature_distance``, or
    ``video_feature_distance``). The convergence benchmark reads these numbers from
    ``validation.jsonl``."""
    from .feature_distance import feature_distance_name

    scores = task.fidelity(images, samples)
    if feature_distance is not None:
        scores[feature_distance_name(task)] = feature_distance(images)
    return scores


def evaluation_scheduler(train_scheduler):
    """DPM-Solver++ from the training scheduler's config, as the LISA authors evaluate; flow
    models keep their Euler flow-matching scheduler."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(train_scheduler, FlowMatchEulerDiscreteScheduler):
        # Flux's scheduler shifts by image size (it needs a `mu` per call); without a size at
        # hand its static shift is used, so any sampler call works (inference_schedule gives
        # latent Flux models the size-dependent schedule).
        return FlowMatchEulerDiscreteScheduler.from_config(
            train_scheduler.config, use_dynamic_shifting=False
        )
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config)


def inference_schedule(model, height: int, width: int, num_inference_steps: int):
    """(scheduler, extra ``set_timesteps`` arguments) to sample ``model`` at a latent of
    ``height`` x ``width``: ``evaluation_scheduler``'s choice unless the family draws as its stock
    pipeline does (Flux's resolution-dependent schedule), so that validation and ``lisa sample``
    draw what the pipeline draws."""
    return model.family.inference_schedule(
        model, evaluation_scheduler(model.scheduler), height, width, num_inference_steps
    )


def _each(fn, conditions):
    """``fn`` on a condition batch, or on each of a mapping name -> batch (several conditions)."""
    if isinstance(conditions, dict):
        return {name: fn(c) for name, c in conditions.items()}
    return fn(conditions)


def _first(conditions) -> torch.Tensor:
    return next(iter(conditions.values())) if isinstance(conditions, dict) else conditions


def _condition_batch(rendered: list) -> torch.Tensor | dict:
    """Rendered conditions (H, W, C) uint8 (a video task's (F, H, W, C)), or mappings name ->
    such, as a (N, C, H, W) (or (N, C, F, H, W)) batch in [0, 1], or a mapping name -> batch."""
    if isinstance(rendered[0], dict):
        return {name: _condition_batch([r[name] for r in rendered]) for name in rendered[0]}
    return torch.stack([torch.from_numpy(c).movedim(-1, 0).float() / 255 for c in rendered])


def _grouped_validation_images(cfg, names, resolution: int):
    """``--validation_image`` for several conditions: taken ``len(names)`` at a time, one per
    condition in their order; returns the mapping name -> (N, 3, R, R) and N."""
    from ..data.images import load_image, to_condition_tensor

    images, k = list(cfg.validation_image), len(names)
    if len(images) % k:
        raise ConfigError(
            f"--validation_image gives {len(images)} image(s) for {k} conditions "
            f"({', '.join(names)}); give {k} per validation sample, in that order."
        )
    tensors = [to_condition_tensor(load_image(p), resolution) for p in images]
    batch = {name: torch.stack(tensors[j::k]) for j, name in enumerate(names)}
    return batch, len(images) // k


class Validator:
    def __init__(
        self,
        conditions: torch.Tensor,
        contexts: Context,
        negative: Context | None,
        scheduler,
        vae,
        latent_shape: tuple[int, ...],
        family=None,
        samples_per_condition: int = 1,
        steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int = 0,
        task=None,
        task_samples=None,
        feature_distance=None,
        encode_condition=None,
        schedule: dict | None = None,
    ):
        self.conditions = conditions
        self.contexts = contexts
        self.negative = negative
        self.scheduler = scheduler
        self.schedule = schedule
        self.vae = vae
        # Its hooks decode the samples (None: an image VAE's scale and shift).
        self.family = family
        self.latent_shape = latent_shape
        self.samples_per_condition = samples_per_condition
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.task = task
        self.task_samples = task_samples
        self.feature_distance = feature_distance
        # Conditions stay images here (for the grids); this maps them to what the side network
        # takes (VAE latents for SD3/Flux ControlNets).
        self.encode_condition = encode_condition or (lambda condition: condition)
        self._side_conditions: torch.Tensor | None = None  # encoded on first use, then kept

    @classmethod
    def from_config(cls, cfg, model, dataset, encoders, sample_size: int) -> "Validator":
        resolution = sample_size * model.vae_scale_factor
        scheduler, schedule = inference_schedule(
            model, sample_size, sample_size, cfg.validation_inference_steps
        )
        common = dict(
            encode_condition=encoders.encode_condition,
            scheduler=scheduler,
            schedule=schedule,
            vae=model.vae,
            family=model.family,
            steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
            seed=cfg.seed or 0,
        )
        if model.family.takes_video and cfg.validation_image:
            raise ConfigError(
                "--validation_image is for image models; video models validate on a task's "
                "held-out clips (--task pose_video) with its metrics, or pass "
                "--validation_steps 0."
            )
        if cfg.validation_image:
            from ..data.images import load_image, to_condition_tensor

            common["latent_shape"] = model.sample_shape(resolution, resolution)
            images, prompts = cfg.validation_image, cfg.validation_prompt or [""]
            names = getattr(dataset, "condition_names", ())
            if len(names) > 1:
                conds, n = _grouped_validation_images(cfg, names, resolution)
                if len(prompts) not in (1, n):
                    raise ConfigError(
                        f"--validation_prompt gives {len(prompts)} prompts for {n} validation "
                        "samples; give one, or one per sample."
                    )
                prompts = prompts * n if len(prompts) == 1 else prompts
                ctx = encoders.prompt_context(prompts)
                neg = None
                if cfg.validation_guidance_scale > 1:
                    neg = encoders.prompt_context([""] * n)
                return cls(
                    conds, ctx, neg, samples_per_condition=cfg.num_validation_images, **common
                )
            n = max(len(images), len(prompts))
            images = images * n if len(images) == 1 else images
            prompts = prompts * n if len(prompts) == 1 else prompts
            conds = torch.stack([to_condition_tensor(load_image(p), resolution) for p in images])
            ctx = encoders.prompt_context(prompts)
            neg = encoders.prompt_context([""] * n) if cfg.validation_guidance_scale > 1 else None
            return cls(conds, ctx, neg, samples_per_condition=cfg.num_validation_images, **common)
        task = dataset.task
        held_out = held_out_task_samples(task, cfg.validation_conditions, cfg.seed or 0)
        # Channels first: (C, H, W), or (C, F, H, W) for a video task, whose noise then has
        # frames too, as many as the family's VAE makes of the clip's.
        conds = _condition_batch([s.condition for s in held_out])
        first = _first(conds)
        frames = first.shape[2] if first.ndim == 5 else None
        common["latent_shape"] = model.sample_shape(resolution, resolution, frames)
        ctx = encoders.null_context(len(held_out))
        feature_distance = None
        if cfg.validation_feature_distance:
            from .feature_distance import TaskFeatureDistance

            # One fixed yardstick for every run and seed, so their numbers compare; a video
            # task's is the task-feature video Fréchet distance, on clips of its frame count.
            feature_distance = TaskFeatureDistance(task)
        return cls(
            conds,
            ctx,
            None,
            task=task,
            task_samples=held_out,
            feature_distance=feature_distance,
            **common,
        )

    @torch.no_grad()
    def generate(self, branch) -> torch.Tensor:
        from .sampling import decode, init_noise_sigma, sample

        device = next(branch.side_network.parameters()).device
        if self._side_conditions is None:
            on_device = _each(lambda c: c.to(device), self.conditions)
            self._side_conditions = self.encode_condition(on_device)
        outputs = []
        for k in range(self.samples_per_condition):
            g = torch.Generator(device="cpu").manual_seed(self.seed + k)
            n = _first(self.conditions).shape[0]
            latents = torch.randn((n, *self.latent_shape), generator=g).to(device)
            x0 = sample(
                branch,
                _each(lambda c: c.to(device), self._side_conditions),
                self.contexts.to(device),
                self.scheduler,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                negative_context=None if self.negative is None else self.negative.to(device),
                latents=latents * init_noise_sigma(self.scheduler),
                schedule=self.schedule,
            )
            outputs.append(decode(self.vae, x0, self.family).float().cpu())
        return torch.stack(outputs, dim=1)  # (N, K, 3, H, W)

    def run(self, branch, step: int, out_dir: Path) -> dict[str, float]:
        was_training = branch.training
        branch.eval()
        images = self.generate(branch)
        branch.train(was_training)
        if images.ndim == 6:  # videos (N, K, 3, F, H, W): an animation and its frame sheet
            return self._write_videos(images, step, out_dir)
        rows = []
        # One column per condition (several conditions: each, in order).
        conditions = self.conditions
        conditions = list(conditions.values()) if isinstance(conditions, dict) else [conditions]
        cond_u8 = [to_uint8(c, signed=False) for c in conditions]
        for i in range(images.shape[0]):
            row = [c[i] for c in cond_u8] + list(to_uint8(images[i]))
            if self.task_samples is not None:
                row.append(self.task_samples[i].image)
            rows.append(row)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_grid(rows).save(out_dir / f"step-{step}.png")
        if self.task is None:
            return {}
        return score_task_samples(self.task, images[:, 0], self.task_samples, self.feature_distance)

    def _write_videos(self, videos: torch.Tensor, step: int, out_dir: Path) -> dict[str, float]:
        """``step-<step>.gif`` (condition | samples | ground truth, animated) and
        ``step-<step>_frames.png``; the task's scores of the first sample per condition."""
        from .video import video_to_uint8, write_animation

        conditions = video_to_uint8(self.conditions, signed=False)
        rows = []
        for i in range(videos.shape[0]):
            row = [conditions[i], *video_to_uint8(videos[i])]
            if self.task_samples is not None:
                row.append(self.task_samples[i].image)
            rows.append(row)
        write_animation(rows, out_dir / f"step-{step}.gif", out_dir / f"step-{step}_frames.png")
        if self.task is None:
            return {}
        return score_task_samples(self.task, videos[:, 0], self.task_samples, self.feature_distance)
