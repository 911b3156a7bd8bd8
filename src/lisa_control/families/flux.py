"""diffusers ``FluxTransformer2DModel`` (main) + ``FluxControlNetModel`` (side): Flux.1
ControlNets in the InstantX layout.

Flux works on *packed* latents: each 2x2 patch of a (B, C, H, W) latent becomes one token of
4C features, ordered (c, dy, dx), so the transformer sees (B, H/2 * W/2, 4C) plus position ids
``img_ids`` (row, column of each token) and ``txt_ids`` (zeros, one per text token). The side
network is a shorter copy of the transformer whose image tokens also receive the packed condition
through a zero-initialised ``controlnet_x_embedder``; after each double block k a zero-initialised
linear map (``controlnet_blocks[k]``, LISA layer ``block_k``) and after each single block j
another (``controlnet_single_blocks[j]``, layer ``single_j``) produce residuals
(``controlnet_block_samples`` / ``controlnet_single_block_samples``) that the transformer adds to
the image tokens of its double and single blocks. The prior is the transformer without them.

This branch packs and unpacks internally: its inputs (x_t, condition) and outputs are image-shaped
(B, C, H, W), so the trainer, the objective and LISA never see tokens. Timesteps are the
objective's 1000 s; the Flux models take s itself (they multiply by 1000 inside), as
``FluxControlNetPipeline`` passes ``t / 1000``.

Objective: rectified flow with a velocity target, exactly as for SD3; see the module docstring of
:mod:`lisa_control.families.sd3` for u_cond - u_prior = -(s / (1 - s)) grad log p(c|x_s).

Condition: like SD3, the InstantX Flux ControlNet takes the VAE-encoded control image, packed. The
condition here is latent-shaped (B, C, H, W) with C = the latent's channels; for pixel-space tiny
models it is an image at sample resolution with the sample's channel count.

Guidance: guidance-distilled transformers (``guidance_embeds=True``, Flux.1-dev) take a guidance
scale. It comes from ``context.extra["guidance"]`` (a number or a (B,) tensor) or else the
branch's ``guidance_scale`` (3.5, the default of diffusers' ``train_controlnet_flux.py``), and is
given to each network whose config has ``guidance_embeds``, as the pipeline does.
"""

from __future__ import annotations

import torch
from torch import nn
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
)

from ..core.errors import ModelError
from ..core.branch import Context, ResidualBranch
from ..core.hooks import NetworkLayout, register_layout
from ..core.objectives import PreconditionedFlowObjective
from ..regularizers.token_decoders import TokenScoreDecoder
from .base import Family, MainModel
from .loading import load_pipeline_parts
from .sd3 import null_text_context
from .transformer_layers import (
    controlnet_block_aliases,
    middle_block_layer,
    refuse_weighting,
    token_feature_dim,
    transformer_stack,
)

# ----------------------------------------------------------------------------- packing


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch is one token, features (c, dy, dx),
    tokens row-major; the layout of ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ModelError(
            f"Flux packs 2x2 patches: the latent's height and width must be even, got {h}x{w}."
        )
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, n, features = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ModelError(f"{n} tokens do not tile a {height}x{width} latent in 2x2 patches.")
    patches = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens of a ``height`` x ``width`` latent:
    (0, row, column), as ``FluxPipeline._prepare_latent_image_ids``."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(dtype or torch.float32)


def text_ids(sequence_length: int, device=None, dtype=None) -> torch.Tensor:
    """(L, 3) zeros: Flux gives every text token the same (null) position."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- side network


def pipeline_schedule(scheduler, height: int, width: int, num_inference_steps: int) -> dict:
    """``set_timesteps`` arguments that give FluxPipeline's schedule for a latent of
    ``height`` x ``width``: sigmas evenly spaced from 1 to 1/n, shifted by

        mu = base_shift + (max_shift - base_shift) (L - L_base) / (L_max - L_base),

    linear in the number of image tokens L = (height/2)(width/2). A scheduler with a static
    shift (Flux.1-schnell's) takes the sigmas alone."""
    import numpy as np

    schedule = {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)}
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        tokens = (height // 2) * (width // 2)
        base_len = config.get("base_image_seq_len", 256)
        max_len = config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        schedule["mu"] = base_shift + (max_shift - base_shift) * (tokens - base_len) / (
            max_len - base_len
        )
    return schedule


def controlnet_from_transformer(
    transformer: FluxTransformer2DModel,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
) -> FluxControlNetModel:
    """A ControlNet whose blocks are copies of the transformer's first blocks.

    diffusers' ``from_transformer`` defaults to Flux.1's head size (24 heads of 128) whatever the
    transformer, so the transformer's own sizes are passed. Defaults: half of the double blocks
    (at least one) and half of the single blocks; diffusers' fixed 4 + 10 are sized for Flux.1's
    19 + 38 and would not fit a small transformer.
    """
    config = transformer.config
    if num_layers is None:
        num_layers = max(1, config.num_layers // 2)
    if num_single_layers is None:
        num_single_layers = config.num_single_layers // 2
    if not 0 <= num_layers <= config.num_layers or not (
        0 <= num_single_layers <= config.num_single_layers
    ):
        raise ModelError(
            f"the ControlNet can copy at most {config.num_layers} double and "
            f"{config.num_single_layers} single blocks, got {num_layers} and {num_single_layers}."
        )
    if num_layers + num_single_layers == 0:
        raise ModelError("the ControlNet needs at least one block.")
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )


_MATCHING_KEYS = (
    "in_channels",
    "joint_attention_dim",
    "pooled_projection_dim",
    "attention_head_dim",
    "num_attention_heads",
)


def check_side_fits_main(transformer: FluxTransformer2DModel, controlnet: FluxControlNetModel):
    """Refuse a ControlNet that does not fit this transformer, naming the first mismatch."""
    if not isinstance(controlnet, FluxControlNetModel):
        raise ModelError(
            f"the side network must be a FluxControlNetModel, got {type(controlnet).__name__}."
        )
    if controlnet.input_hint_block is not None or controlnet.union:
        raise ModelError(
            "only InstantX-layout Flux ControlNets are supported (a packed latent condition, no "
            "input_hint_block, no union modes); build one with FluxControlNetBranch.from_main."
        )
    for key in _MATCHING_KEYS:
        main_value, side_value = transformer.config.get(key), controlnet.config.get(key)
        if main_value != side_value:
            raise ModelError(
                f"the side network does not fit the main network: {key} is {side_value!r} in the "
                f"ControlNet but {main_value!r} in the transformer. Build the side network from "
                "this transformer (FluxControlNetBranch.from_main)."
            )


class FluxControlNetBranch(ResidualBranch):
    """Frozen ``FluxTransformer2DModel`` + trainable ``FluxControlNetModel``, image-shaped I/O.

    ``context.encoder_hidden_states``: T5 tokens (B, L, joint_attention_dim);
    ``context.extra["pooled_projections"]``: CLIP pooled text (B, pooled_projection_dim);
    optional ``extra["guidance"]``, ``extra["txt_ids"]`` (L, 3), ``extra["img_ids"]`` (N, 3).
    """

    side_network_class = FluxControlNetModel
    # Position ids are per sequence, not per sample: a prior on some rows keeps them whole.
    unbatched_context = ("txt_ids", "img_ids")

    main_network: FluxTransformer2DModel
    side_network: FluxControlNetModel

    def __init__(
        self,
        main_network: FluxTransformer2DModel,
        side_network: FluxControlNetModel,
        guidance_scale: float = 3.5,
    ):
        check_side_fits_main(main_network, side_network)
        super().__init__(main_network, side_network)
        self.guidance_scale = guidance_scale

    @classmethod
    def from_main(
        cls,
        transformer: FluxTransformer2DModel,
        controlnet: FluxControlNetModel | None = None,
        num_layers: int | None = None,
        num_single_layers: int | None = None,
        guidance_scale: float = 3.5,
    ) -> FluxControlNetBranch:
        if controlnet is None:
            controlnet = controlnet_from_transformer(transformer, num_layers, num_single_layers)
        return cls(transformer, controlnet, guidance_scale=guidance_scale)

    @property
    def latent_channels(self) -> int:
        """Channels of the image-shaped sample and condition (a quarter of the token width)."""
        return self.main_network.config.in_channels // 4

    @property
    def condition_channels(self) -> int:
        return self.latent_channels

    def check_inputs(self, x_t: torch.Tensor, condition: torch.Tensor) -> None:
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ModelError(
                f"the sample must have shape (B, {self.latent_channels}, H, W) (the unpacked "
                f"latent), got {tuple(x_t.shape)}."
            )
        if condition.shape != x_t.shape:
            raise ModelError(
                f"the condition must have the latent's shape {tuple(x_t.shape)}, got "
                f"{tuple(condition.shape)}; Flux ControlNets take the VAE-encoded control image, "
                "or for pixel-space models an image with the sample's channel count."
            )

    def _guidance(self, context: Context, batch: int, device) -> torch.Tensor:
        guidance = context.extra.get("guidance", self.guidance_scale)
        if guidance is None:
            raise ModelError(
                "this transformer is guidance-distilled (guidance_embeds=True): set "
                "guidance_scale or put extra['guidance'] in the Context."
            )
        guidance = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        return guidance.expand(batch) if guidance.ndim == 0 else guidance

    def _model_kwargs(self, network, x_t, timesteps, context: Context) -> dict:
        """Everything but the image tokens, in ``network``'s dtype, as the pipeline builds it."""
        ctx = context.to(dtype=network.dtype)
        pooled = ctx.extra.get("pooled_projections")
        if pooled is None:
            raise ModelError(
                "Flux needs pooled text embeddings: put them in "
                "Context(extra={'pooled_projections': tensor of shape (B, pooled_projection_dim)})."
            )
        height, width = x_t.shape[-2:]
        device, dtype = x_t.device, network.dtype
        txt = ctx.extra.get("txt_ids")
        img = ctx.extra.get("img_ids")
        guidance = None
        if network.config.guidance_embeds:
            guidance = self._guidance(ctx, x_t.shape[0], device).to(dtype)
        return dict(
            encoder_hidden_states=ctx.encoder_hidden_states,
            pooled_projections=pooled,
            # The objective's timesteps are 1000 s; Flux models take s.
            timestep=(timesteps.float() / 1000).to(dtype),
            guidance=guidance,
            txt_ids=text_ids(ctx.encoder_hidden_states.shape[1], device, dtype)
            if txt is None
            else txt,
            img_ids=latent_image_ids(height, width, device, dtype) if img is None else img,
        )

    def side_residuals(self, x_t, timesteps, context: Context, condition, conditioning_scale=1.0):
        side = self.side_network
        return side(
            hidden_states=pack_latents(x_t).to(side.dtype),
            controlnet_cond=pack_latents(condition).to(side.dtype),
            conditioning_scale=conditioning_scale,
            return_dict=False,
            **self._model_kwargs(side, x_t, timesteps, context),
        )

    def main_prediction(self, x_t, timesteps, context: Context, residuals=None) -> torch.Tensor:
        main = self.main_network
        blocks, singles = residuals or (None, None)
        tokens = main(
            hidden_states=pack_latents(x_t).to(main.dtype),
            controlnet_block_samples=None if blocks is None else [r.to(main.dtype) for r in blocks],
            controlnet_single_block_samples=(
                None if singles is None else [r.to(main.dtype) for r in singles]
            ),
            controlnet_blocks_repeat=False,  # InstantX layout, as the pipeline sets it
            return_dict=False,
            **self._model_kwargs(main, x_t, timesteps, context),
        )[0]
        return unpack_latents(tokens, *x_t.shape[-2:])

    # -- residuals: what ResidualBranch.forward and composition add to the main network

    def residuals(self, x_t, timesteps, context: Context, condition, scale=1.0):
        """(double-block residuals, single-block residuals) of the ControlNet, times ``scale``."""
        self.check_inputs(x_t, condition)
        return self.side_residuals(x_t, timesteps, context, condition, scale)

    def default_lisa_layer(self) -> str:
        return middle_block_layer(self.side_network)

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> nn.Module:
        """A :class:`TokenScoreDecoder` from packed 2x2 tokens to the latent velocity; without
        ``sample_size`` (Flux has none) a square grid is inferred per batch."""
        return TokenScoreDecoder(
            token_feature_dim(self.side_network, layer),
            self.main_network.out_channels // 4,  # packed width -> latent channels
            2,
            grid_size=None if sample_size is None else sample_size // 2,
        )


_FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
register_layout(
    FluxTransformer2DModel,
    NetworkLayout(blocks=transformer_stack(*_FLUX_BLOCKS), heavy_blocks=_FLUX_BLOCKS),
)
register_layout(
    FluxControlNetModel,
    NetworkLayout(
        projection_lists={"block": "controlnet_blocks", "single": "controlnet_single_blocks"},
        default_layer=middle_block_layer,
        blocks=controlnet_block_aliases,
        heavy_blocks=_FLUX_BLOCKS,
    ),
)


class FluxFamily(Family):
    """Flux.1 pipelines: packed latents, CLIP + T5 prompts, guidance embedded in the network."""

    name = "flux"
    network_class = FluxTransformer2DModel
    network_folder = "transformer"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    pipeline_prefixes = ("Flux",)
    side_networks = {"controlnet": FluxControlNetBranch}
    condition_in_latent_space = True
    packed_channels = 4
    default_objective = "flow"
    latent_flow_recipe = True

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        from diffusers import FluxPipeline

        from .encoders import PipelinePrompts

        pipe = load_pipeline_parts(FluxPipeline, name, revision, variant, allow_pickle)
        # Flux's transformer has no sample_size; its pipeline's default is 128 latent pixels.
        latent_size = getattr(pipe.transformer.config, "sample_size", None)
        latent_size = latent_size or getattr(pipe, "default_sample_size", 128)
        return MainModel(
            main_network=pipe.transformer,
            scheduler=pipe.scheduler,
            family=self,
            vae=pipe.vae,
            resolution=latent_size * pipe.vae_scale_factor,
            source=name,
            objective="flow",
            prompt_encoder=PipelinePrompts(pipe, self.encode_prompts),
        )

    def encode_prompts(self, pipeline, captions: list[str], device) -> Context:
        """CLIP's pooled vector and T5's tokens with their position ids, as FluxPipeline."""
        embeds, pooled, text_ids = pipeline.encode_prompt(
            prompt=list(captions), prompt_2=None, device=device, num_images_per_prompt=1
        )
        extra = {"pooled_projections": pooled, "txt_ids": text_ids}
        return Context(encoder_hidden_states=embeds, extra=extra)

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        return null_text_context(network.config, batch, device, dtype)

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        """The velocity of an image-shaped latent (B, C, H, W): packed into 2x2 tokens with
        FluxPipeline's position ids, timesteps as s = t / 1000, the distilled guidance
        (``context.extra["guidance"]``, default 3.5) where the transformer embeds it."""
        height, width = x_t.shape[-2:]
        device, dtype = x_t.device, network.dtype
        ctx = context.to(dtype=dtype)
        tokens = ctx.encoder_hidden_states
        kwargs = dict(
            encoder_hidden_states=tokens,
            pooled_projections=ctx.extra["pooled_projections"],
            timestep=(timesteps.float() / 1000).to(dtype),
            txt_ids=ctx.extra.get("txt_ids", text_ids(tokens.shape[1], device, dtype)),
            img_ids=latent_image_ids(height, width, device, dtype),
        )
        if network.config.get("guidance_embeds", False):
            guidance = float(ctx.extra.get("guidance", 3.5))
            kwargs["guidance"] = torch.full((x_t.shape[0],), guidance, device=device).to(dtype)
        out = network(hidden_states=pack_latents(x_t).to(dtype), return_dict=False, **kwargs)[0]
        return unpack_latents(out, height, width)

    def training_objective(
        self, model: MainModel, name: str, timestep_sampler=None, weighting=None
    ):
        """diffusers' train_controlnet_flux.py: the scheduler's static shift and a plain velocity
        loss (Flux's scheduler shifts dynamically only at inference)."""
        if self.uses_own_flow_recipe(model, name):
            refuse_weighting(weighting)
            return PreconditionedFlowObjective(
                shift=model.scheduler.config.shift,
                num_timesteps=model.scheduler.config.num_train_timesteps,
                precondition_outputs=False,
            )
        return super().training_objective(model, name, timestep_sampler, weighting)

    def inference_schedule(self, model: MainModel, scheduler, height: int, width: int, steps):
        """Latent Flux models sample with FluxPipeline's resolution-dependent schedule."""
        if model.is_pixel_space:
            return scheduler, None
        import copy

        scheduler = copy.deepcopy(model.scheduler)
        return scheduler, pipeline_schedule(scheduler, height, width, steps)

    def guidance(self, model: MainModel, guidance_scale: float | None):
        """Flux.1-dev's distilled guidance, embedded in the transformer; no classifier-free pass."""
        return 1.0, 3.5 if guidance_scale is None else guidance_scale
