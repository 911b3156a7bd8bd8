"""The ``Family`` interface: everything that differs between main-network families.

A family is one file in this folder: a :class:`Family` subclass (loading, contexts, objective,
inference schedule, stock pipeline), the :class:`~lisa_control.core.branch.DualBranch` of each
side network it takes, and the :class:`~lisa_control.core.hooks.NetworkLayout` of its network
classes. Code outside ``families/`` asks a :class:`MainModel` for its ``family`` and calls these
methods; it never tests which family it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.branch import Context, DualBranch
from ..core.errors import ConfigError, ModelError


class Family:
    """One kind of main network (``unet``, ``sd3``, ``flux``, ...), with the side networks it takes.

    Class attributes:
        name: the registry key, written into pixel-model folders (``lisa_model.json``).
        network_class: the diffusers class of the main network.
        network_folder: the sub-folder holding that network in a model folder.
        scheduler_class: the training scheduler of pixel-space models of this family.
        pipeline_prefixes: ``model_index.json`` ``_class_name`` prefixes this family loads.
        side_networks: ``--side_network`` kind -> the branch that pairs it with this family.
        condition_in_latent_space: with a VAE, the side network takes the VAE-encoded control
            image (SD3, Flux) instead of encoding the image itself (UNet ControlNet).
        packed_channels: the main network takes ``packed_channels`` times the sample's channels
            (Flux packs 2x2 patches into tokens).
        pretrain_architecture: the ``lisa pretrain --architecture`` that builds this family.
        takes_video: the main network denoises videos (B, C, F, H, W): the trainer reads video
            folders for it, and sampling writes animations.
    """

    name: ClassVar[str]
    network_class: ClassVar[type[nn.Module]]
    network_folder: ClassVar[str] = "unet"
    scheduler_class: ClassVar[type]
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ()
    side_networks: ClassVar[dict[str, type[DualBranch]]] = {}
    condition_in_latent_space: ClassVar[bool] = False
    packed_channels: ClassVar[int] = 1
    pretrain_architecture: ClassVar[str | None] = None
    default_objective: ClassVar[str] = "epsilon"
    # Latent flow trains with the family's own loss (diffusers' scripts), refusing a weighting.
    latent_flow_recipe: ClassVar[bool] = False
    takes_video: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ loading

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        """A :class:`MainModel` from a diffusers folder or hub id of this family."""
        raise ModelError(f"the {self.name} family loads only `lisa pretrain` folders.")

    def branch(self, side_network: str = "controlnet") -> type[DualBranch]:
        """The branch for a side network of kind ``side_network`` on this family."""
        if side_network not in self.side_networks:
            raise ConfigError(
                f"no {side_network!r} side network for a {self.name!r} main network; this family "
                f"takes --side_network {' or '.join(sorted(self.side_networks)) or '(none)'}."
            )
        return self.side_networks[side_network]

    # ------------------------------------------------------------------ contexts

    def null_context(self, network: nn.Module, batch: int, device=None, dtype=torch.float32):
        """The constant context of a model trained without text."""
        raise NotImplementedError

    def predict(self, network: nn.Module, x_t, timesteps, context: Context) -> torch.Tensor:
        """The main network's own prediction (no side network)."""
        raise NotImplementedError

    def encode_prompts(self, pipeline, captions: list[str], device) -> Context:
        """Prompt contexts through a diffusers pipeline's own ``encode_prompt``, for families
        whose context is more than one text encoder's hidden states."""
        raise NotImplementedError

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of ``pixels`` in [-1, 1] through ``vae``, before its shift and scale (images
        (B, 3, H, W) in one call; video families encode their frames)."""
        return vae.encode(pixels).latent_dist.sample()

    def normalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the main network denoises them: shifted and scaled by the VAE's config
        (SD3 and Flux VAEs shift; SD's have no ``shift_factor``)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_images(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode_images`: pixels, about [-1, 1], of latents the VAE
        decodes (after :meth:`denormalize_latents`); images (B, C, h, w) in one call."""
        return vae.decode(latents, return_dict=False)[0]

    def denormalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize_latents`: the main network's latents as the VAE
        decodes them, unscaled and unshifted by the VAE's config."""
        latents = latents / vae.config.scaling_factor
        # SD's VAEs have no shift_factor, or None.
        shift = getattr(vae.config, "shift_factor", None)
        return latents if shift is None else latents + shift

    def encode_condition(self, vae, condition: torch.Tensor) -> torch.Tensor:
        """The control image in [0, 1] as a ``condition_in_latent_space`` side network takes it:
        the normalized latents of the image mapped to [-1, 1], as the SD3 and Flux ControlNet
        pipelines encode it."""
        return self.normalize_latents(vae, self.encode_images(vae, condition * 2 - 1))

    def latent_condition_channels(self, model: MainModel) -> int:
        """Channels of :meth:`encode_condition`'s output."""
        return model.vae.config.latent_channels

    def vae_scale_factor(self, vae) -> int:
        """Pixels per latent pixel, along each side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def sample_shape(
        self, model: MainModel, height: int, width: int, frames: int | None = None
    ) -> tuple[int, ...]:
        """(C, h, w) of the sample the main network denoises for ``height x width`` images, or
        (C, f, h, w) for clips of ``frames`` frames: the shape of the initial noise. Here the
        VAE scales space alone (an image VAE encodes a clip frame by frame: f = frames)."""
        factor = model.vae_scale_factor
        time = () if frames is None else (frames,)
        return (model.sample_channels, *time, height // factor, width // factor)

    # ------------------------------------------------------------------ objective

    def training_objective(
        self, model: MainModel, name: str, timestep_sampler=None, weighting=None
    ):
        """The objective ``name`` (``epsilon``, ``v_prediction``, ``flow``) over this model, with
        an optional loss ``weighting`` (``core.weighting``)."""
        from ..core.objectives import make_objective

        return make_objective(
            name,
            scheduler=None if name == "flow" else model.scheduler,
            timestep_sampler=timestep_sampler if name != "flow" else None,
            weighting=weighting,
        )

    def default_loss_weighting(self, model: MainModel, name: str) -> str:
        """The weighting (``core.weighting``) a run of objective ``name`` gets when it names
        none: ``x0``, which reached plain ControlNet's fidelity sooner on every task and seed
        of BENCHMARKS.md's loss-weighting runs; ``none`` for latent flow in a family with its
        own recipe (``latent_flow_recipe``), which takes no second weighting."""
        return "none" if self.uses_own_flow_recipe(model, name) else "x0"

    def uses_own_flow_recipe(self, model: MainModel, name: str) -> bool:
        """Whether objective ``name`` on ``model`` is the family's own latent-flow loss
        (``latent_flow_recipe``: diffusers' training scripts), which takes no loss weighting."""
        return self.latent_flow_recipe and name == "flow" and not model.is_pixel_space

    # ------------------------------------------------------------------ inference

    def inference_schedule(self, model: MainModel, scheduler, height: int, width: int, steps):
        """``(scheduler, set_timesteps keyword arguments)`` for sampling ``height x width``
        latents in ``steps`` steps; ``None`` keywords use the scheduler's own spacing."""
        return scheduler, None

    def guidance(self, model: MainModel, guidance_scale: float | None):
        """``(classifier-free guidance scale, guidance embedded in the network or None)`` for a
        user's ``--guidance_scale`` (``None``: the family's default)."""
        if not model.has_text:
            return 1.0, None
        return (7.5 if guidance_scale is None else guidance_scale), None

    def resolution_multiple(self, model: MainModel) -> int:
        """Image sizes must be multiples of this: the main network halves its input three
        times, after the VAE's own down-sampling."""
        return 8 * model.vae_scale_factor

    def stock_pipeline(self, model: MainModel, side_network: nn.Module, scheduler):
        """diffusers' own pipeline for this model and side network, or ``None`` where the
        project's sampler is the reference."""
        return None


@dataclass
class MainModel:
    """The frozen parts of a model, its family, and what the trainer must know about them."""

    main_network: nn.Module
    scheduler: object
    family: Family
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: object | None = None
    resolution: int = 512
    task: str | None = None
    source: str = ""
    objective: str = "epsilon"  # "epsilon", "v_prediction" or "flow"
    # Text conditioning through a pipeline's own encode_prompt (SD3's two CLIPs and T5, Flux's
    # CLIP and T5), for families whose context is more than one text encoder's hidden states.
    prompt_encoder: object | None = None

    @property
    def is_pixel_space(self) -> bool:
        return self.vae is None

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None or self.prompt_encoder is not None

    @property
    def condition_in_latent_space(self) -> bool:
        """Whether the side network takes the VAE latent of the control image."""
        return self.vae is not None and self.family.condition_in_latent_space

    def training_objective(
        self, prediction_type: str | None = None, timestep_sampler=None, weighting=None
    ):
        """The objective the model was trained with, or ``prediction_type``; ``weighting``
        weights its loss by noise level (``core.weighting.make_weighting``)."""
        return self.family.training_objective(
            self, prediction_type or self.objective, timestep_sampler, weighting
        )

    def default_loss_weighting(self, prediction_type: str | None = None) -> str:
        """The loss weighting for ``prediction_type`` (default: the model's) when none is named."""
        return self.family.default_loss_weighting(self, prediction_type or self.objective)

    @property
    def sample_channels(self) -> int:
        """Channels of the image-shaped sample the objective noises."""
        return self.main_network.config.in_channels // self.family.packed_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return self.family.vae_scale_factor(self.vae)

    def sample_shape(self, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """The shape of one sample this model denoises for ``height x width`` images, or clips
        of ``frames`` frames (the family's rule: :meth:`Family.sample_shape`)."""
        return self.family.sample_shape(self, height, width, frames)

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this (the family's rule)."""
        return self.family.resolution_multiple(self)

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """Refuse a size this model cannot take, naming the multiple it needs."""
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {resolution!r}.")
        if resolution % self.resolution_multiple:
            raise ConfigError(
                f"{flag} {resolution} does not fit this model: give a positive multiple of "
                f"{self.resolution_multiple} (the model's down-sampling factor; {resolution} is "
                "not divisible by it)."
            )

    def null_context(self, batch: int, device=None, dtype=torch.float32) -> Context:
        return self.family.null_context(self.main_network, batch, device, dtype)
