"""Tiny video main networks built in code: AnimateDiff's ``UNetMotionModel`` (a
``UNet2DConditionModel`` with a ``MotionAdapter``'s temporal attention in every block) for tests
and the ``pose_video`` task.

``image_unet_of`` and ``motion_adapter_for`` (from the family) split such a network into the
two parts an AnimateDiff pipeline folder stores; :func:`motion_unet_from_image` joins an image
UNet with new motion modules, as AnimateDiff starts its training. The configs are random-weight
and small (about 0.3M parameters with the defaults); no hub access. Samples are (batch,
channels, frames, height, width), as diffusers' AnimateDiff takes them.
"""

from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from ..families.animatediff import image_unet_of, motion_adapter_for  # noqa: F401
from .unet import tiny_unet


def tiny_unet_motion_config(
    sample_size: int = 32,
    in_channels: int = 3,
    block_out_channels: tuple[int, ...] = (16, 32),
    cross_attention_dim: int = 16,
    layers_per_block: int = 1,
    num_attention_heads: int = 2,
    norm_num_groups: int = 8,
    motion_num_attention_heads: int = 2,
    motion_max_seq_length: int = 16,
    attention_at_full_resolution: bool = False,
) -> dict:
    """A ``UNetMotionModel`` config with the layout of :func:`~lisa_control.zoo.unet.tiny_unet`
    (cross-attention in every block but the last, one downsampler between blocks) and a motion
    module after every resnet. ``motion_max_seq_length`` bounds the number of frames (16 by
    default). Without attention at full resolution the first block is a plain
    ``DownBlockMotion``: spatial self-attention over every pixel of every frame dominates the
    cost at 32 x 32."""
    image = tiny_unet(
        sample_size=sample_size,
        in_channels=in_channels,
        block_out_channels=block_out_channels,
        cross_attention_dim=cross_attention_dim,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_at_full_resolution=attention_at_full_resolution,
    )
    to_motion = {
        "CrossAttnDownBlock2D": "CrossAttnDownBlockMotion",
        "DownBlock2D": "DownBlockMotion",
        "CrossAttnUpBlock2D": "CrossAttnUpBlockMotion",
        "UpBlock2D": "UpBlockMotion",
    }
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(to_motion[b] for b in image["down_block_types"]),
        up_block_types=tuple(to_motion[b] for b in image["up_block_types"]),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        num_attention_heads=num_attention_heads,
        norm_num_groups=norm_num_groups,
        use_linear_projection=True,
        motion_num_attention_heads=motion_num_attention_heads,
        motion_max_seq_length=motion_max_seq_length,
    )


def tiny_unet_motion(seed: int | None = None, **config) -> UNetMotionModel:
    """A random :func:`tiny_unet_motion_config` network (``seed`` fixes its weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    return UNetMotionModel(**tiny_unet_motion_config(**config))


# What diffusers names the temporal layers of a UNetMotionModel (and of a MotionAdapter).
MOTION_MODULES = "motion_modules"


def motion_unet_from_image(
    unet: UNet2DConditionModel,
    motion_num_attention_heads: int = 2,
    motion_max_seq_length: int = 16,
) -> UNetMotionModel:
    """``unet`` with a new motion module after every resnet (mid block included), in fp32.

    The spatial layers keep ``unet``'s weights and each motion module's output projection
    starts at zero, so the network begins as ``unet`` run on every frame alone (the motion
    modules are residual); training then only has to learn how frames relate. This is how
    AnimateDiff starts from an image model.
    """
    config = unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config.block_out_channels),
        motion_layers_per_block=config.layers_per_block,
        motion_num_attention_heads=motion_num_attention_heads,
        motion_norm_num_groups=config.norm_num_groups,
        motion_max_seq_length=motion_max_seq_length,
        use_motion_mid_block=True,
    )
    for name, module in adapter.named_modules():
        if name.endswith("proj_out") and MOTION_MODULES in name:
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return UNetMotionModel.from_unet2d(unet.float(), adapter)


def motion_module_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``network``'s motion modules (none for an image network)."""
    return [p for name, p in network.named_parameters() if MOTION_MODULES in name]
