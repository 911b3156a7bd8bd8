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
from torch import nn
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
)
from diffusers.configuration_utils import FrozenDict

from ..core.errors import ModelError
from ..core.objectives import PreconditionedFlowObjective
from ..core.branch import Context, ResidualBranch
from ..core.hooks import NetworkLayout, register_layout
from ..regularizers.token_decoders import TokenScoreDecoder
from .base import Family, MainModel
from .loading import load_pipeline_parts
from .transformer_layers import (
    controlnet_block_aliases,
    middle_block_layer,
    refuse_weighting,
    token_feature_dim,
    transformer_stack,
)

# The embedded flow DiT and SD3 without text are conditioned on one zero token.
NULL_TEXT_TOKENS = 1

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


class SD3ControlNetBranch(ResidualBranch):
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

    def main_prediction(self, x_t, timesteps, context: Context, residuals=None) -> torch.Tensor:
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

    # -- residuals: what ResidualBranch.forward and composition add to the main network

    def residuals(self, x_t, timesteps, context: Context, condition, scale=1.0):
        """The ControlNet's block residuals, times ``scale``."""
        self.check_condition(x_t, condition)
        return self.side_residuals(x_t, timesteps, context, condition, scale)

    def default_lisa_layer(self) -> str:
        return middle_block_layer(self.side_network)

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> nn.Module:
        """A :class:`TokenScoreDecoder` from the tokens entering ``block_k`` to the velocity."""
        main = self.main_network
        patch_size = main.config.patch_size
        sample_size = sample_size or main.config.sample_size
        return TokenScoreDecoder(
            token_feature_dim(self.side_network, layer),
            main.out_channels,
            patch_size,
            grid_size=sample_size // patch_size,
        )


def null_text_context(config, batch_size: int, device=None, dtype=torch.float32) -> Context:
    """The constant "no text" context of an SD3 or Flux transformer (``config`` is its
    ``.config``): one zero token of ``joint_attention_dim`` and a zero pooled vector."""
    return Context(
        encoder_hidden_states=torch.zeros(
            batch_size, NULL_TEXT_TOKENS, config["joint_attention_dim"], device=device, dtype=dtype
        ),
        extra={
            "pooled_projections": torch.zeros(
                batch_size, config["pooled_projection_dim"], device=device, dtype=dtype
            )
        },
    )


register_layout(
    SD3Transformer2DModel,
    NetworkLayout(
        blocks=transformer_stack("transformer_blocks"), heavy_blocks=("transformer_blocks",)
    ),
)
register_layout(
    SD3ControlNetModel,
    NetworkLayout(
        projection_lists={"block": "controlnet_blocks"},
        default_layer=middle_block_layer,
        blocks=controlnet_block_aliases,
        heavy_blocks=("transformer_blocks",),
    ),
)


class SD3Family(Family):
    """Stable Diffusion 3 / 3.5 pipelines and the pixel-space flow DiT of ``lisa pretrain``."""

    name = "sd3"
    network_class = SD3Transformer2DModel
    network_folder = "transformer"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    pipeline_prefixes = ("StableDiffusion3",)
    side_networks = {"controlnet": SD3ControlNetBranch}
    condition_in_latent_space = True
    pretrain_architecture = "dit"
    default_objective = "flow"
    latent_flow_recipe = True

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        from diffusers import StableDiffusion3Pipeline

        from .encoders import PipelinePrompts

        pipe = load_pipeline_parts(StableDiffusion3Pipeline, name, revision, variant, allow_pickle)
        return MainModel(
            main_network=pipe.transformer,
            scheduler=pipe.scheduler,
            family=self,
            vae=pipe.vae,
            resolution=pipe.transformer.config.sample_size * pipe.vae_scale_factor,
            source=name,
            objective="flow",
            prompt_encoder=PipelinePrompts(pipe, self.encode_prompts),
        )

    def encode_prompts(self, pipeline, captions: list[str], device) -> Context:
        """SD3's two CLIP encoders (pooled and per token) and optional T5, as the pipeline."""
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return Context(encoder_hidden_states=embeds, extra={"pooled_projections": pooled})

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        return null_text_context(network.config, batch, device, dtype)

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        return network(
            hidden_states=x_t,
            encoder_hidden_states=context.encoder_hidden_states,
            pooled_projections=context.extra["pooled_projections"],
            timestep=timesteps,
            return_dict=False,
        )[0]

    def training_objective(
        self, model: MainModel, name: str, timestep_sampler=None, weighting=None
    ):
        """Latent SD3 trains with diffusers' recipe and the scheduler's shift."""
        if self.uses_own_flow_recipe(model, name):
            refuse_weighting(weighting)
            return PreconditionedFlowObjective.from_scheduler(model.scheduler)
        return super().training_objective(model, name, timestep_sampler, weighting)
