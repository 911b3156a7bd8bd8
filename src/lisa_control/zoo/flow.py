"""Flow-matching transformers built in code: the tiny flow DiT that the embedded benchmark trains
as its second architecture (an ``SD3Transformer2DModel`` in pixel space, rectified-flow
objective), tiny Flux transformers for tests, and their ControlNets.

Everything here is random-weight and small (< 10M parameters with the defaults); no hub access.
Text conditioning of the embedded tasks is a constant null context: one zero text token and a zero
pooled vector (:func:`null_text_context`).
"""

from __future__ import annotations

from diffusers import (
    FluxControlNetModel,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
)
from torch import nn

from ..families.flux import (
    controlnet_from_transformer as flux_controlnet_from_transformer,
)
from ..core.errors import ConfigError
from ..families.sd3 import NULL_TEXT_TOKENS, null_text_context  # noqa: F401  (re-exported)
from ..families.sd3 import controlnet_from_transformer as sd3_controlnet_from_transformer



def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- SD3 / flow DiT


def tiny_flow_dit_config(
    sample_size: int = 32,
    in_channels: int = 3,
    patch_size: int = 2,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    context_dim: int = 32,
    pooled_dim: int = 32,
) -> dict:
    """An ``SD3Transformer2DModel`` config for pixel-space flow matching on small images.

    Defaults: 32 x 32 RGB, 2 x 2 patches (256 tokens), 4 joint blocks of width 128: about 2.4M
    parameters. The text path is kept but tiny (``context_dim``-wide tokens, projected to the
    model width); the embedded tasks feed it :func:`null_text_context`.
    """
    if sample_size % patch_size:
        raise ConfigError(
            f"sample_size {sample_size} is not a multiple of patch_size {patch_size}."
        )
    width = num_attention_heads * attention_head_dim
    return dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        joint_attention_dim=context_dim,
        # Text tokens join the image tokens in joint attention, so they must have the same width.
        caption_projection_dim=width,
        pooled_projection_dim=pooled_dim,
        # The sincos position table is cropped to the token grid; no larger table is needed.
        pos_embed_max_size=sample_size // patch_size,
    )


def tiny_sd3_transformer(**config_overrides) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**tiny_flow_dit_config(**config_overrides))


def tiny_sd3_controlnet(
    transformer: SD3Transformer2DModel, num_layers: int | None = None
) -> SD3ControlNetModel:
    """A ControlNet copying the transformer's first ``num_layers`` blocks (default half), built
    with ``SD3ControlNetModel.from_transformer(..., num_extra_conditioning_channels=0)``: the
    condition has the sample's channel count."""
    return sd3_controlnet_from_transformer(transformer, num_layers, extra_conditioning_channels=0)


# ----------------------------------------------------------------------------- Flux


def rope_axes(attention_head_dim: int) -> tuple[int, int, int]:
    """Split a head into Flux's three rotary axes (index, row, column), each of even size: rows
    and columns get about 3/8 each, as Flux.1's (16, 56, 56) of 128."""
    spatial = 2 * (3 * attention_head_dim // 16)
    first = attention_head_dim - 2 * spatial
    if attention_head_dim % 2 or first <= 0 or spatial <= 0:
        raise ConfigError(
            f"attention_head_dim {attention_head_dim} cannot be split into three even rotary "
            "axes; use an even number >= 6."
        )
    return first, spatial, spatial


def tiny_flux_config(
    latent_channels: int = 4,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    context_dim: int = 32,
    pooled_dim: int = 32,
    guidance_embeds: bool = False,
) -> dict:
    """A ``FluxTransformer2DModel`` config; its ``in_channels`` is the packed width
    4 x ``latent_channels``."""
    return dict(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=context_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=rope_axes(attention_head_dim),
    )


def tiny_flux_transformer(**config_overrides) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**tiny_flux_config(**config_overrides))


def tiny_flux_controlnet(
    transformer: FluxTransformer2DModel,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
) -> FluxControlNetModel:
    return flux_controlnet_from_transformer(transformer, num_layers, num_single_layers)
