"""diffusers ``UNet2DConditionModel`` (main) + ``T2IAdapter`` (side): T2I-Adapters for SD1.x,
SD2.x and SDXL.

The adapter reads only the condition image (no x_t, no timestep, no text): pixel-unshuffle by
``downscale_factor``, a conv, then one stage (``adapter.body[k]``) per UNet resolution. Each
stage's output is added inside the UNet's encoder (``down_intrablock_additional_residuals``): to
the output of the last resnet/attention pair of a cross-attention down block, after a plain down
block (and its downsampler), and to the mid block's output where the shapes match (SDXL). The
prior is the same UNet call without them.

Unlike a ControlNet, a T2I-Adapter has no zero projections: its features enter the UNet as they
are, from a random initialisation. LISA therefore hooks one stage's *output* by module path
(default ``adapter.body.1``, half the condition resolution of the first stage: the level of the
authors' ``down_5`` in a UNet ControlNet) and decodes it with a :class:`ScoreDecoder` sized by
:func:`adapter_feature_shape`.

The condition is an image at ``condition_downscale`` times the sample's resolution (8 for SD
latents: 512 px condition for a 64 x 64 latent; 1 for pixel-space models); that ratio follows from
the adapter's config and the UNet's layout and is checked when the branch is built.
"""

from __future__ import annotations

import re

import torch
from diffusers import T2IAdapter, UNet2DConditionModel

from ..core.branch import Context, ResidualBranch
from ..core.errors import ConfigError, ModelError
from ..core.hooks import NetworkLayout, register_layout, resolve_layer
from ..regularizers.decoders import ScoreDecoder

# ----------------------------------------------------------------------------- shapes


def adapter_stage_shapes(adapter: T2IAdapter) -> list[tuple[int, int]]:
    """(channels, downscale relative to the condition image) of each ``adapter.body[k]`` output,
    computed from the config of the three diffusers layouts."""
    config = adapter.config
    channels, factor = list(config.channels), config.downscale_factor
    if config.adapter_type == "full_adapter":
        return [(c, factor * 2**k) for k, c in enumerate(channels)]
    if config.adapter_type == "full_adapter_xl":
        # Only stage 2 downsamples (SDXL's latent layout: 64, 64, 32, 32 at 1024 px).
        return [(c, factor if k < 2 else 2 * factor) for k, c in enumerate(channels)]
    if config.adapter_type == "light_adapter":
        # One extra stage at the last width, downsampled once more.
        shapes = [(c, factor * 2**k) for k, c in enumerate(channels)]
        return shapes + [(channels[-1], factor * 2 ** len(channels))]
    raise ModelError(f"unknown T2IAdapter adapter_type {config.adapter_type!r}.")


def unet_adapter_slots(unet: UNet2DConditionModel) -> list[tuple[int, int]]:
    """(channels, downscale relative to the sample) of each place the UNet adds an adapter
    feature, in the order it takes them; the last entry is the mid block (used only when the
    shapes match)."""
    slots, scale = [], 1
    for block, channels in zip(unet.down_blocks, unet.config.block_out_channels):
        downsamples = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            slots.append((channels, scale))  # added before the block's downsampler
        else:
            slots.append((channels, 2 * scale if downsamples else scale))  # added after it
        if downsamples:
            scale *= 2
    slots.append((unet.config.block_out_channels[-1], scale))
    return slots


def condition_downscale(unet: UNet2DConditionModel, adapter: T2IAdapter) -> int:
    """Ratio of condition to sample resolution at which ``adapter`` feeds ``unet``; raises
    :class:`ModelError` naming the first stage that does not fit."""
    stages, slots = adapter_stage_shapes(adapter), unet_adapter_slots(unet)
    down_slots, mid_slot = slots[:-1], slots[-1]
    if len(stages) > len(down_slots) + 1:
        raise ModelError(
            f"the adapter has {len(stages)} stages but the UNet takes at most "
            f"{len(down_slots) + 1} features ({len(down_slots)} down blocks and the mid block)."
        )
    ratio = stages[0][1] // down_slots[0][1]
    if ratio < 1 or stages[0][1] % down_slots[0][1]:
        raise ModelError(
            f"the adapter's first stage is at 1/{stages[0][1]} of the condition's resolution, "
            f"which no whole condition/sample ratio maps to the UNet's 1/{down_slots[0][1]}."
        )
    for k, (stage, slot) in enumerate(zip(stages, down_slots + [mid_slot])):
        expected = (slot[0], slot[1] * ratio)
        if stage != expected:
            raise ModelError(
                f"adapter stage {k} gives {stage[0]} channels at 1/{stage[1]} of the condition but "
                f"the UNet expects {expected[0]} channels at 1/{expected[1]} there. Build the "
                "adapter for this UNet (T2IAdapterBranch.from_main) with channels = the UNet's "
                "block_out_channels."
            )
    return ratio


_STAGE_PATH = re.compile(r"adapter\.body\.(\d+)")


def adapter_feature_shape(
    adapter: T2IAdapter, layer: str, sample_size: int, downscale: int
) -> tuple[int, int]:
    """(channels, spatial size) of the output of stage ``layer`` (``adapter.body.k``) when the
    sample is ``sample_size`` pixels/latents wide and the condition ``downscale`` times larger:
    the ``feature_channels`` / ``feature_size`` LISA needs for a module-path layer."""
    match = _STAGE_PATH.fullmatch(layer)
    stages = adapter_stage_shapes(adapter)
    if match is None or int(match.group(1)) >= len(stages):
        raise ConfigError(
            f"cannot size a LISA decoder for layer {layer!r}: name a stage "
            f"adapter.body.0 ... adapter.body.{len(stages) - 1}, or pass feature_channels= and "
            "feature_size=."
        )
    channels, stage_scale = stages[int(match.group(1))]
    return channels, sample_size * downscale // stage_scale


def default_adapter_layer(adapter: T2IAdapter) -> str:
    """``adapter.body.1`` where it exists (see the module docstring), else ``adapter.body.0``."""
    return "adapter.body.1" if len(adapter.adapter.body) > 1 else "adapter.body.0"


# ----------------------------------------------------------------------------- branch


class T2IAdapterBranch(ResidualBranch):
    """Frozen ``UNet2DConditionModel`` + trainable ``T2IAdapter``."""

    side_network_class = T2IAdapter
    condition_at_pixel_level = True

    main_network: UNet2DConditionModel
    side_network: T2IAdapter

    def __init__(self, main_network: UNet2DConditionModel, side_network: T2IAdapter):
        if not isinstance(side_network, T2IAdapter):
            raise ModelError(
                f"the side network must be a T2IAdapter, got {type(side_network).__name__}."
            )
        self._condition_downscale = condition_downscale(main_network, side_network)
        super().__init__(main_network, side_network)

    @classmethod
    def from_main(
        cls,
        unet: UNet2DConditionModel,
        adapter: T2IAdapter | None = None,
        conditioning_channels: int = 3,
        condition_downscale: int = 8,
        num_res_blocks: int = 2,
    ) -> T2IAdapterBranch:
        """Wrap ``unet``; with no ``adapter``, make a randomly initialised ``full_adapter`` with
        one stage per UNet down block (T2I-Adapter's SD1.x layout)."""
        if adapter is None:
            adapter = T2IAdapter(
                in_channels=conditioning_channels,
                channels=list(unet.config.block_out_channels),
                num_res_blocks=num_res_blocks,
                downscale_factor=condition_downscale,
                adapter_type="full_adapter",
            )
        return cls(unet, adapter)

    @property
    def condition_channels(self) -> int:
        return self.side_network.config.in_channels

    @property
    def condition_downscale(self) -> int:
        """Condition resolution / sample resolution."""
        return self._condition_downscale

    def check_condition(self, x_t: torch.Tensor, condition: torch.Tensor) -> None:
        expected = tuple(s * self.condition_downscale for s in x_t.shape[-2:])
        if condition.ndim != 4 or condition.shape[1] != self.condition_channels:
            raise ModelError(
                f"the condition must have shape (B, {self.condition_channels}, H, W), got "
                f"{tuple(condition.shape)}."
            )
        if tuple(condition.shape[-2:]) != expected:
            raise ModelError(
                f"the condition is {tuple(condition.shape[-2:])} but this adapter needs "
                f"{expected}: {self.condition_downscale}x the sample's resolution."
            )

    def side_residuals(self, condition, conditioning_scale=1.0) -> list[torch.Tensor]:
        side = self.side_network
        features = side(condition.to(side.dtype))
        return [feature * conditioning_scale for feature in features]

    def main_prediction(self, x_t, timesteps, context: Context, residuals=None) -> torch.Tensor:
        main = self.main_network
        ctx = context.to(dtype=main.dtype)
        return main(
            x_t.to(main.dtype),
            timesteps,
            encoder_hidden_states=ctx.encoder_hidden_states,
            added_cond_kwargs=ctx.added_cond_kwargs,
            # A fresh list: the UNet pops from it.
            down_intrablock_additional_residuals=(
                None if residuals is None else [r.to(main.dtype) for r in residuals]
            ),
            return_dict=False,
        )[0]

    # -- residuals: what ResidualBranch.forward and composition add to the main network

    def residuals(self, x_t, timesteps, context: Context, condition, scale=1.0):
        """The adapter's features times ``scale`` (they depend on the condition alone)."""
        self.check_condition(x_t, condition)
        return self.side_residuals(condition, scale)

    def default_lisa_layer(self) -> str:
        return default_adapter_layer(self.side_network)

    def lisa_decoder(
        self, layer: str, sample_size: int | None = None, feature_channels=None, feature_size=None
    ) -> ScoreDecoder:
        """A :class:`ScoreDecoder` from an adapter stage's output to the UNet's prediction."""
        sample_size = sample_size or self.main_network.config.sample_size
        if feature_channels is None or feature_size is None:
            feature_channels, feature_size = adapter_feature_shape(
                self.side_network, layer, sample_size, self.condition_downscale
            )
        return ScoreDecoder.for_layer(
            self.side_network,
            resolve_layer(self.side_network, layer),
            out_channels=self.main_network.config.out_channels,
            sample_size=sample_size,
            feature_channels=feature_channels,
            feature_size=feature_size,
        )


register_layout(T2IAdapter, NetworkLayout(default_layer=default_adapter_layer))
