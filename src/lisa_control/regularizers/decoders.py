"""Score decoders: light heads that map a side-network feature and the timestep to the main
network's prediction space. LISA trains one beside the side network and drops it afterwards."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.hooks import LayerRef, layout_of
from ..core.objectives import sinusoidal_embedding


class ScoreDecoder(nn.Module):
    """Maps a side-network feature map (C, H, W) and timestep to the prediction space.

    time: sinusoidal(256) -> Linear(256, C) -> SiLU, added to the feature; then per x2 stage a
    conv from the current width c to max(c/2, 64) channels + SiLU + nearest upsample; last a
    zero-initialised 3x3 conv to ``out_channels``.

    Kernel rule (the LISA authors'): the first stage's conv is 1x1 when the hooked feature has
    C >= 512 channels, every other conv is 3x3. When the feature is already at the output size
    (no stage), one 3x3 conv + SiLU to max(C/2, 64) channels stands in for the stages.
    """

    time_embed_dim = 256

    def __init__(self, in_channels: int, out_channels: int, upsample_stages: int):
        super().__init__()
        self.time_proj = nn.Linear(self.time_embed_dim, in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(max(upsample_stages, 1)):
            width = max(channels // 2, 64)
            kernel = 1 if stage == 0 and upsample_stages > 0 and channels >= 512 else 3
            layers += [nn.Conv2d(channels, width, kernel, padding=kernel // 2), nn.SiLU()]
            if upsample_stages > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            channels = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)
        # Zero init: the decoder starts as the zero map, so step one's aux loss is |r|^2 and the
        # side network is not pushed by a random head.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def for_layer(
        cls,
        network: nn.Module,
        ref: LayerRef,
        out_channels: int,
        sample_size: int,
        feature_channels: int | None = None,
        feature_size: int | None = None,
    ) -> ScoreDecoder:
        """A decoder for the feature at ``ref`` of ``network`` when the prediction is
        ``sample_size`` wide; the feature's shape comes from the network's registered layout
        unless ``feature_channels`` and ``feature_size`` are given."""
        if feature_channels is None or feature_size is None:
            shape = layout_of(network).feature_shape
            if shape is None or not ref.reads_input:
                raise ConfigError(
                    f"cannot infer the feature shape at layer {ref.name!r}; pass "
                    "feature_channels= and feature_size= (the hooked tensor's C and H), or build "
                    "LISA with lisa_control.lisa_for_branch(branch)."
                )
            feature_channels, feature_size = shape(network, ref, sample_size)
        stages = sample_size / feature_size
        if stages < 1 or stages != 2 ** round(math.log2(stages)):
            raise ConfigError(
                f"layer {ref.name!r} has spatial size {feature_size}, which does not reach "
                f"sample_size {sample_size} by x2 upsampling; pick another layer."
            )
        return cls(feature_channels, out_channels, round(math.log2(stages)))

    def forward(self, feature: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(timesteps.reshape(-1), self.time_embed_dim)
        emb = F.silu(self.time_proj(emb.to(self.time_proj.weight.dtype)))
        h = feature.to(emb.dtype) + emb[:, :, None, None]
        return self.out(self.body(h))


def controlnet_feature_shape(side_network: nn.Module, ref: LayerRef, sample_size: int):
    """(channels, spatial size) of the input of one zero projection of a UNet ControlNet,
    computed from its config so the decoder's size is known before any forward pass."""
    channels = ref.module.in_channels
    blocks = side_network.down_blocks
    scale = 1
    order = [scale]  # conv_in
    for block in blocks:
        order += [scale] * len(block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            scale *= 2
            order.append(scale)
    if ref.name == "mid":
        return channels, sample_size // scale
    index = int(ref.name.split("_")[1])
    return channels, sample_size // order[index]
