"""diffusers ``SD3Transformer2DModel`` (main) + ``SD3ControlNetModel`` (side): Stable Diffusion 3
and 3.5 ControlNets in the ``from_transformer`` layout, and the tiny flow DiT of the embedded
benchmark.

The side network is a shorter copy of the transformer (``from_transformer``) whose image tokens
also receive the patch-embedded condition through a zero-initialised ``pos_embed_input``. After
each of its blocks a zero-initialised linear map (``controlnet_blocks[k]``, LISA layer
``block_k``) produces one residual, which the transformer adds to the image tokens of its own
blocks (block i of L gets residual ``int(i / (L / n))``; the last, context-pre-only block gets
none). The prior is the same transformer call without ``block_controlnet_hidden_states``.

Objective and likelihood score
------------------------------
SD3 is a rectified-flow model with s in [0, 1] and timestep = 1000 s:

    x_s = (1 - s) x0 + s eps,      the network predicts the velocity u = E[eps - x0 | x_s].

Given x_s and u, the noise estimate is eps-hat = x_s + (1 - s) u (substitute u = eps - x0), and
since x_s | x0 ~ N((1 - s) x0, s^2 I), Tweedie's formula gives the score

    grad log p(x_s) = -eps-hat / s = -(x_s + (1 - s) u) / s,
    so  u = -(x_s + s grad log p(x_s)) / (1 - s).

The offset -x_s / (1 - s) does not depend on the condition, so with Bayes' rule
grad log p(x_s | c) = grad log p(x_s) + grad log p(c | x_s):

    u_cond - u_prior = -(s / (1 - s)) grad log p(c | x_s).

That velocity residual is what LISA's decoder regresses (target r = u_target - u_prior).

SD3's "x0-preconditioned" training (diffusers' ``train_controlnet_sd3.py`` with
``--precondition_outputs``) reads the same network output u as x0-hat = x_s - s u and regresses
x0 with a per-sigma weight. Because x0-hat - x0 = s (u_target - u), it is the velocity loss
reweighted by s^2; the network still outputs a velocity, so LISA's target stays the velocity
residual above. :class:`PreconditionedFlowObjective` implements that recipe, including the
timestep laws of diffusers' ``compute_density_for_timestep_sampling``.

Condition
---------
SD3 ControlNets take a *latent*: ``StableDiffusion3ControlNetPipeline`` VAE-encodes the control
image and passes that latent as ``controlnet_cond``. Here the condition is therefore a tensor of
the latent's shape, with ``in_channels + extra_conditioning_channels`` channels at the sample's
resolution. For pixel-space tiny models (the embedded benchmark) the "latent" is the image itself,
so the condition is just an image at sample resolution with as many channels as the sample.

Pooled text
-----------
The transformer always gets ``context.extra["pooled_projections"]``. When the side network's
config says ``force_zeros_for_pooled_projection`` (the default, also for ``from_transformer``
copies) the stock ``StableDiffusion3ControlNetPipeline`` feeds the ControlNet zeros instead, so
training does the same: a side network trained here behaves identically in that pipeline.
(diffusers' ``train_controlnet_sd3.py`` passes the real pooled text in training, which the
pipeline then never shows the ControlNet.)
"""

from __future__ import annotations

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.configuration_utils import FrozenDict
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from ..errors import ConfigError, ModelError
from ..objectives import NoisedBatch, RectifiedFlowObjective
from .base import Context, DualBranch, Prediction

# ----------------------------------------------------------------------------- objective

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


class PreconditionedFlowObjective(RectifiedFlowObjective):
    """SD3's training recipe from diffusers' ``train_controlnet_sd3.py``.

    Timesteps: u ~ ``compute_density_for_timestep_sampling(weighting_scheme)`` (logit-normal,
    "mode" or uniform; the loss-weighting schemes sample uniformly), index i = floor(u T), and
    s = sigma_i from the table of ``FlowMatchEulerDiscreteScheduler(shift=shift)``:

        r_i = (T - i) / T,      sigma_i = shift r_i / (1 + (shift - 1) r_i),   timestep = T sigma_i.

    Loss (per sample mean, then batch mean), with w = ``compute_loss_weighting_for_sd3(s)``
    (s^-2 for "sigma_sqrt", 2 / (pi (1 - 2 s + 2 s^2)) for "cosmap", else 1):

        precondition_outputs=True:   w || (x_s - s u) - x0 ||^2  =  w s^2 || u - (eps - x0) ||^2
        precondition_outputs=False:  w || u - (eps - x0) ||^2

    ``batch.target`` stays the velocity eps - x0, the space the network predicts in, so the
    prior residual that LISA regresses and ``score`` are those of :class:`RectifiedFlowObjective`.
    ``shift`` is 1.0 by default (right for small images); SD3-medium's scheduler uses 3.0, see
    :meth:`from_scheduler`.
    """

    def __init__(
        self,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        precondition_outputs: bool = True,
        num_timesteps: int = 1000,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(
                f"unknown weighting_scheme {weighting_scheme!r}; choose one of "
                f"{', '.join(WEIGHTING_SCHEMES)} (as diffusers' train_controlnet_sd3.py)."
            )
        if not shift > 0:
            raise ConfigError(f"shift must be > 0, got {shift!r}.")
        super().__init__(timestep_sampler="uniform", num_timesteps=num_timesteps)
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.shift = float(shift)
        self.precondition_outputs = precondition_outputs

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> PreconditionedFlowObjective:
        """Take ``shift`` and the number of training timesteps from a
        ``FlowMatchEulerDiscreteScheduler`` (e.g. the one shipped with SD3)."""
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ConfigError(
                "schedulers with use_dynamic_shifting (Flux) have no fixed training shift; "
                "pass shift= explicitly."
            )
        return cls(
            shift=scheduler.config.shift,
            num_timesteps=scheduler.config.num_train_timesteps,
            **kwargs,
        )

    def sigma_table(self, device=None) -> torch.Tensor:
        """sigma_i for i = 0..T-1, as ``FlowMatchEulerDiscreteScheduler(shift).sigmas``."""
        T = self.num_timesteps
        r = torch.arange(T, 0, -1, device=device, dtype=torch.float32) / T
        return self.shift * r / (1 + (self.shift - 1) * r)

    def sample(self, x0, generator=None, noise=None, timesteps=None) -> NoisedBatch:
        if timesteps is None:
            u = compute_density_for_timestep_sampling(
                weighting_scheme=self.weighting_scheme,
                batch_size=x0.shape[0],
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                device=x0.device,
                generator=generator,
            )
            # u can reach 1.0 (sigmoid saturation, the "mode" law at u' = 0): clamp the index.
            index = (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
            timesteps = self.sigma_table(x0.device)[index] * self.num_timesteps
        return super().sample(x0, generator=generator, noise=noise, timesteps=timesteps)

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        s = self.sigmas(batch.timesteps, prediction)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=s)
        prediction, target = prediction.float(), batch.target.float()
        if self.precondition_outputs:
            x_t = batch.x_t.float()
            prediction = x_t - s * prediction  # x0-hat
            # x0, up to the rounding of x_t to the network's dtype, which cancels in the
            # difference: the loss is s^2 times the velocity error either way.
            target = x_t - s * target
        per_sample = (weighting * (prediction - target) ** 2).reshape(target.shape[0], -1).mean(1)
        return per_sample.mean()


# ----------------------------------------------------------------------------- side network


def controlnet_from_transformer(
    transformer: SD3Transformer2DModel,
    num_layers: int | None = None,
    extra_conditioning_channels: int = 0,
) -> SD3ControlNetModel:
    """``SD3ControlNetModel.from_transformer`` without its side effect.

    diffusers 0.42 writes ``num_layers`` and ``extra_conditioning_channels`` into the
    *transformer's* config while copying it (FrozenDict does not stop item assignment), so a
    transformer saved afterwards would reload with the ControlNet's depth. The config is restored
    here. ``num_layers`` defaults to half the transformer's blocks (at least 1), the spirit of
    diffusers' default of 12 of SD3-medium's 24.
    """
    saved_config = dict(transformer.config)
    if num_layers is None:
        num_layers = max(1, transformer.config.num_layers // 2)
    if not 1 <= num_layers <= transformer.config.num_layers:
        raise ModelError(
            f"num_layers must be between 1 and the transformer's {transformer.config.num_layers} "
            f"blocks, got {num_layers!r}."
        )
    try:
        controlnet = SD3ControlNetModel.from_transformer(
            transformer,
            num_layers=num_layers,
            num_extra_conditioning_channels=extra_conditioning_channels,
        )
    finally:
        transformer._internal_dict = FrozenDict(saved_config)
    return controlnet


# Config keys that must agree between a transformer and a ControlNet meant to drive it.
_MATCHING_KEYS = ("patch_size", "in_channels", "joint_attention_dim", "pooled_projection_dim")


def check_side_fits_main(transformer: SD3Transformer2DModel, controlnet: SD3ControlNetModel):
    """Refuse a ControlNet that was not built for this transformer, naming the first mismatch."""
    if not isinstance(controlnet, SD3ControlNetModel):
        raise ModelError(
            f"the side network must be an SD3ControlNetModel, got {type(controlnet).__name__}."
        )
    if not controlnet.config.get("use_pos_embed", True) or controlnet.context_embedder is None:
        raise ModelError(
            "SD3.5 ControlNets that borrow the transformer's patch embedding and ignore the text "
            "(use_pos_embed=False, joint_attention_dim=None) are not supported; use a ControlNet "
            "built with SD3ControlNetModel.from_transformer."
        )
    pairs = [
        (key, transformer.config.get(key), controlnet.config.get(key)) for key in _MATCHING_KEYS
    ]
    pairs.append(("hidden size (heads x head dim)", transformer.inner_dim, controlnet.inner_dim))
    for key, main_value, side_value in pairs:
        if main_value != side_value:
            raise ModelError(
                f"the side network does not fit the main network: {key} is {side_value!r} in the "
                f"ControlNet but {main_value!r} in the transformer. Build the side network from "
                "this transformer (SD3ControlNetBranch.from_main)."
            )


class SD3ControlNetBranch(DualBranch):
    """Frozen ``SD3Transformer2DModel`` + trainable ``SD3ControlNetModel``.

    ``context.encoder_hidden_states``: the joint text tokens (B, L, joint_attention_dim);
    ``context.extra["pooled_projections"]``: the pooled text (B, pooled_projection_dim).
    ``condition``: a latent-shaped tensor (see the module docstring). Timesteps are 1000 s.
    """

    side_network_class = SD3ControlNetModel

    main_network: SD3Transformer2DModel
    side_network: SD3ControlNetModel

    def __init__(self, main_network: SD3Transformer2DModel, side_network: SD3ControlNetModel):
        check_side_fits_main(main_network, side_network)
        super().__init__(main_network, side_network)

    @classmethod
    def from_main(
        cls,
        transformer: SD3Transformer2DModel,
        controlnet: SD3ControlNetModel | None = None,
        num_layers: int | None = None,
        extra_conditioning_channels: int = 0,
    ) -> SD3ControlNetBranch:
        """Wrap ``transformer``; with no ``controlnet``, copy its first ``num_layers`` blocks
        into a new one (diffusers' and InstantX's initialisation)."""
        if controlnet is None:
            controlnet = controlnet_from_transformer(
                transformer, num_layers, extra_conditioning_channels
            )
        return cls(transformer, controlnet)

    @property
    def condition_channels(self) -> int:
        config = self.side_network.config
        return config.in_channels + config.extra_conditioning_channels

    @staticmethod
    def pooled_projections(context: Context) -> torch.Tensor:
        pooled = context.extra.get("pooled_projections")
        if pooled is None:
            raise ModelError(
                "SD3 needs pooled text embeddings: put them in "
                "Context(extra={'pooled_projections': tensor of shape (B, pooled_projection_dim)})."
            )
        return pooled

    def check_condition(self, x_t: torch.Tensor, condition: torch.Tensor) -> None:
        if condition.ndim != 4 or condition.shape[1] != self.condition_channels:
            raise ModelError(
                f"the condition must have shape (B, {self.condition_channels}, H, W) (a latent-"
                f"shaped tensor), got {tuple(condition.shape)}; SD3 ControlNets take the VAE-"
                "encoded control image, or for pixel-space models an image with the sample's "
                "channel count."
            )
        if condition.shape[-2:] != x_t.shape[-2:]:
            raise ModelError(
                f"the condition is {tuple(condition.shape[-2:])} but the sample is "
                f"{tuple(x_t.shape[-2:])}; SD3 ControlNets take the condition at the latent's "
                "resolution."
            )

    def side_residuals(self, x_t, timesteps, context: Context, condition, conditioning_scale=1.0):
        side = self.side_network
        ctx = context.to(dtype=side.dtype)
        pooled = self.pooled_projections(ctx)
        if side.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)  # as StableDiffusion3ControlNetPipeline does
        return side(
            hidden_states=x_t.to(side.dtype),
            controlnet_cond=condition.to(side.dtype),
            conditioning_scale=conditioning_scale,
            encoder_hidden_states=ctx.encoder_hidden_states,
            pooled_projections=pooled,
            timestep=timesteps,
            return_dict=False,
        )[0]

    def _main(self, x_t, timesteps, context: Context, residuals=None) -> torch.Tensor:
        main = self.main_network
        ctx = context.to(dtype=main.dtype)
        return main(
            hidden_states=x_t.to(main.dtype),
            encoder_hidden_states=ctx.encoder_hidden_states,
            pooled_projections=self.pooled_projections(ctx),
            timestep=timesteps,
            block_controlnet_hidden_states=(
                None if residuals is None else [r.to(main.dtype) for r in residuals]
            ),
            return_dict=False,
        )[0]

    def forward(
        self, x_t, timesteps, context: Context, condition, with_prior=False, conditioning_scale=1.0
    ) -> Prediction:
        self.check_condition(x_t, condition)
        residuals = self.side_residuals(x_t, timesteps, context, condition, conditioning_scale)
        output = self._main(x_t, timesteps, context, residuals)
        prior = self.prior(x_t, timesteps, context) if with_prior else None
        return Prediction(output=output, prior=prior)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        return self._main(x_t, timesteps, context)
