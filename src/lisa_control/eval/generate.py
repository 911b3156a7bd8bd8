"""Seeded, batched generation with a side network, shared by ``lisa sample`` and ``lisa eval``.

Each condition's initial noise comes from its own CPU generator, seeded by (seed, index) through
:func:`condition_seed`, and its k-th sample takes the k-th draw of that generator. No random
number depends on which other conditions share a batch, so ``batch_size`` does not change the
images beyond the float rounding of batched kernels (about 1e-5 on CPU: at most one level of an
8-bit pixel that sits on a rounding boundary). Condition 0 is seeded with ``seed`` itself, so a
single condition draws what a diffusers pipeline draws with
``generator=torch.Generator().manual_seed(seed)``.

Pairs whose family names a stock pipeline (``Family.stock_pipeline``: ControlNets on latent
Stable Diffusion UNets; AnimateDiff and Wan VACE models with a text encoder) go through
diffusers' own pipeline, given the noise as ``latents``; every other pair (pixel-space models,
SD3 and Flux ControlNets, T2I-Adapters, video models without text) through
:func:`~lisa_control.eval.sampling.sample`, with conditions and prompts encoded as in training
and the noise shaped and decoded by the family's hooks (``sample_shape``, ``decode_images``).
Both use deterministic schedulers (see :func:`~lisa_control.eval.validation.evaluation_scheduler`).

Several side networks (trained apart or together) compose as diffusers' multi-network pipelines
compose them (:mod:`lisa_control.families.composition`): the stock pipeline gets the list of
ControlNets, the project's sampler a ``ComposedBranch``; conditions are then a list, one batch per
network in their order, and each network has a ``conditioning_scale`` and a guidance window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, ModelError

# SplitMix64's increment: seeds of neighbouring conditions are far apart in the 64-bit space,
# and (seed, 0) -> seed.
_GAMMA = 0x9E3779B97F4A7C15
_MASK = 2**64 - 1


def condition_seed(seed: int, index: int) -> int:
    """The generator seed of condition ``index`` under ``seed``: ``seed + index * gamma``
    modulo 2**64 (``seed`` itself for index 0)."""
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}.")
    return (int(seed) + int(index) * _GAMMA) & _MASK


def condition_noise(
    seed: int, index: int, shape: tuple[int, ...], draw: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """Initial noise (1, *shape) of condition ``index``: draw number ``draw`` (0, 1, ...) from
    its own CPU generator, unscaled."""
    generator = torch.Generator("cpu").manual_seed(condition_seed(seed, index))
    for _ in range(draw + 1):
        noise = torch.randn((1, *shape), generator=generator, dtype=dtype)
    return noise


def _load_side_networks(paths, cls, allow_pickle: bool) -> list:
    """Side networks of ``cls.side_network_class`` from folders (or hub ids), refusing a folder
    that holds another kind before loading it."""
    import json

    from ..families.loading import load_side_network

    expected = cls.side_network_class.__name__
    networks = []
    for path in paths:
        config = Path(path) / "config.json"
        if config.is_file():
            try:
                found = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError):
                found = None
            if found and found != expected:
                raise ModelError(
                    f"side network {str(path)!r} is a {found} but --side_network expects "
                    f"{expected}; compose side networks of one kind."
                )
        networks.append(load_side_network(str(path), allow_pickle, cls.side_network_class))
    return networks


def _first(conditions) -> torch.Tensor:
    return conditions if torch.is_tensor(conditions) else conditions[0]


def _rows(conditions, rows):
    return conditions[rows] if torch.is_tensor(conditions) else [c[rows] for c in conditions]


class SideNetworkSampler:
    """A main model with one side network, or several composed, ready to turn conditions into
    images.

    Args:
        model: the frozen :class:`~lisa_control.families.MainModel`.
        side_network: a side network folder (diffusers layout), or a list of them to compose.
        kind: ``controlnet`` or ``t2i_adapter``, as ``--side_network``.
        num_inference_steps: denoising steps (>= 1).
        guidance_scale: ``None`` for the family's default (see ``Family.guidance``).
        conditioning_scale, control_guidance_start, control_guidance_end: one number, or one
            per side network (diffusers' meaning; ``None``: 1, 0 and 1).
    """

    def __init__(
        self,
        model,
        side_network: str | Path,
        kind: str = "controlnet",
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        device=None,
        allow_pickle: bool = False,
        encoders=None,
        conditioning_scale=None,
        control_guidance_start=None,
        control_guidance_end=None,
    ):
        from ..families import branch_class
        from ..families.composition import ComposedBranch
        from .validation import evaluation_scheduler

        if isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
            raise ConfigError(
                f"--num_inference_steps must be >= 1, got {num_inference_steps}; 0 steps would "
                "return the initial noise"
            )
        self.model = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = guidance_scale
        cls = branch_class(model.family, kind)
        several = not isinstance(side_network, (str, Path))
        paths = list(side_network) if several else [side_network]
        self.side_networks = _load_side_networks(paths, cls, allow_pickle)
        self.side_network = self.side_networks[0]
        settings = {
            "conditioning_scale": 1.0 if conditioning_scale is None else conditioning_scale,
            "control_guidance_start": (
                0.0 if control_guidance_start is None else control_guidance_start
            ),
            "control_guidance_end": 1.0 if control_guidance_end is None else control_guidance_end,
        }
        controls = (conditioning_scale, control_guidance_start, control_guidance_end)
        self.composed = several or any(v is not None for v in controls)
        if self.composed:
            # One network with a scale or a window is a composition of one.
            branch = ComposedBranch.from_side_networks(
                cls, model.main_network, self.side_networks, **settings
            )
            settings = {
                "conditioning_scale": branch.conditioning_scale,
                "control_guidance_start": branch.control_guidance_start,
                "control_guidance_end": branch.control_guidance_end,
            }
            if not several:
                settings = {key: value[0] for key, value in settings.items()}
        else:
            branch = cls(model.main_network, self.side_network)
        self.several = several
        self.branch = branch.to(self.device).eval()
        # diffusers' names for the stock pipeline's call; one network without a scale or a
        # window leaves the pipeline's defaults (AnimateDiff's SparseCtrl pipeline has no
        # guidance window).
        self._pipeline_controls = {}
        if self.composed:
            self._pipeline_controls = {
                "controlnet_conditioning_scale": settings["conditioning_scale"],
                "control_guidance_start": settings["control_guidance_start"],
                "control_guidance_end": settings["control_guidance_end"],
            }
        self.pipeline = model.family.stock_pipeline(
            model,
            self.side_networks if several else self.side_network,
            evaluation_scheduler(model.scheduler),
        )
        if self.pipeline is not None:
            self.pipeline = self.pipeline.to(self.device)
            self.pipeline.set_progress_bar_config(disable=True)
        self._encoders = encoders

    @property
    def condition_channels(self) -> int | list[int]:
        """Channels of the condition images: RGB where the side network takes VAE latents; a
        list, one per network, for several side networks."""
        if self.several:
            if self.model.condition_in_latent_space:
                return [3] * len(self.side_networks)
            return list(self.branch.condition_channels)
        if self.model.condition_in_latent_space:
            return 3
        channels = self.branch.condition_channels
        return channels[0] if isinstance(channels, list) else channels

    def check_conditions(self, conditions) -> None:
        """Refuse conditions that do not fit the side networks: one batch per network (a list
        for several), each with its network's channels, all of one size and count."""
        if not self.several:
            if not torch.is_tensor(conditions):
                raise ConfigError("one side network takes one batch of condition images.")
            if conditions.shape[1] != self.condition_channels:
                raise ConfigError(
                    f"the condition images have {conditions.shape[1]} channels but the side "
                    f"network expects {self.condition_channels}."
                )
            return
        count = len(self.side_networks)
        if torch.is_tensor(conditions) or len(conditions) != count:
            given = 1 if torch.is_tensor(conditions) else len(conditions)
            raise ConfigError(
                f"{count} side networks need {count} batches of condition images (one per "
                f"network, in their order), got {given}."
            )
        first = conditions[0]
        for k, (batch, channels) in enumerate(zip(conditions, self.condition_channels)):
            if batch.ndim != 4 or batch.shape[1] != channels:
                raise ConfigError(
                    f"the condition images of side network {k} have shape {tuple(batch.shape)} "
                    f"but it expects (N, {channels}, H, W)."
                )
            if batch.shape[0] != first.shape[0] or batch.shape[-2:] != first.shape[-2:]:
                raise ConfigError(
                    f"the condition images of side network {k} are {tuple(batch.shape)} but those "
                    f"of network 0 {tuple(first.shape)}; give each network as many images, of "
                    "one size."
                )

    @property
    def encoders(self):
        if self._encoders is None:
            from ..families.encoders import FrozenEncoders

            self._encoders = FrozenEncoders(self.model, self.device)
        return self._encoders

    @torch.no_grad()
    def __call__(
        self,
        conditions: torch.Tensor,
        prompts: list[str],
        indices: list[int] | None = None,
        seed: int = 0,
        draw: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images (N, 3, R, R) in [-1, 1] on the CPU, one per condition (N, C, R, R) in [0, 1]
        (several side networks: a list of such, one per network) and prompt (videos
        (N, 3, F, R, R) for video conditions (N, C, F, R, R)); condition i's noise is draw
        ``draw`` of generator (seed, ``indices[i]``) (``indices`` default 0..N-1).
        ``batch_size`` conditions are sampled together."""
        self.check_conditions(conditions)
        n = _first(conditions).shape[0]
        indices = list(range(n)) if indices is None else list(indices)
        if len(prompts) != n or len(indices) != n:
            raise ConfigError(
                f"got {n} conditions, {len(prompts)} prompts and {len(indices)} indices."
            )
        batch_size = n if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {batch_size}.")
        first = _first(conditions)
        # Video conditions (N, C, F, R, R) give the noise frames; how many, the family says
        # (Wan's VAE makes one latent frame of each four).
        frames = first.shape[2] if first.ndim == 5 else None
        shape = self.model.sample_shape(first.shape[-2], first.shape[-1], frames)
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", total=(n + batch_size - 1) // batch_size)
        outputs = []
        for start in starts:
            rows = slice(start, start + batch_size)
            noise = torch.cat([condition_noise(seed, i, shape, draw) for i in indices[rows]])
            outputs.append(self._sample(_rows(conditions, rows), list(prompts[rows]), noise))
        return torch.cat(outputs)

    def _sample(self, conditions, prompts, noise) -> torch.Tensor:
        if self.pipeline is not None:
            cfg_scale, _ = self.model.family.guidance(self.model, self.guidance_scale)
            if torch.is_tensor(conditions):
                image = conditions.to(self.device)
            else:
                image = [c.to(self.device) for c in conditions]
            images = self.pipeline(
                prompts,
                image=image,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=cfg_scale,
                latents=noise.to(self.device),
                output_type="np",
                **self._pipeline_controls,
            ).images
            # (N, H, W, 3) images or (N, F, H, W, 3) videos, channels to dimension 1.
            return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, 1) * 2 - 1
        from .sampling import decode, init_noise_sigma, sample
        from .validation import inference_schedule

        height, width = noise.shape[-2:]
        scheduler, schedule = inference_schedule(
            self.model, height, width, self.num_inference_steps
        )
        cfg_scale, embedded_guidance = self.model.family.guidance(self.model, self.guidance_scale)
        context = self.encoders.prompt_context(prompts)
        if embedded_guidance is not None:
            context.extra["guidance"] = embedded_guidance
        negative = self.encoders.prompt_context([""] * len(prompts)) if cfg_scale > 1 else None
        condition = self.encoders.encode_condition(conditions)
        if self.composed and torch.is_tensor(condition):
            condition = [condition]  # a composition of one network
        x = sample(
            self.branch,
            condition,
            context,
            scheduler,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=cfg_scale,
            negative_context=negative,
            latents=noise.to(self.device) * init_noise_sigma(scheduler),
            schedule=schedule,
        )
        return decode(self.model.vae, x, self.model.family).float().cpu()
