"""Model configurations built in code: the real SD2.1-base and SDXL UNet shapes (for parameter
counts and benchmarks with random weights) and the tiny UNets the embedded default trains."""

from __future__ import annotations

SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)

SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def tiny_unet(
    sample_size: int = 32,
    in_channels: int = 3,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    cross_attention_dim: int = 32,
    layers_per_block: int = 2,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
    sdxl_like: bool = False,
    attention_at_full_resolution: bool = True,
) -> dict:
    """A small UNet2DConditionModel config with the SD layout: cross-attention in every block
    but the last, one downsampler between blocks.

    With ``attention_at_full_resolution=False`` the first block has no attention (SDXL's choice):
    at pixel resolution, self-attention over every pixel dominates the cost of a small UNet
    (far slower at 32 x 32) and the lower levels see the whole image anyway.
    """
    n = len(block_out_channels)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    if not attention_at_full_resolution:
        down[0] = "DownBlock2D"
    up = ["UpBlock2D" if d == "DownBlock2D" else "CrossAttnUpBlock2D" for d in reversed(down)]
    cfg = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
        use_linear_projection=True,
    )
    if sdxl_like:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=cross_attention_dim + 6 * 8,
        )
    return cfg
