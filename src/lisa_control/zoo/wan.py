"""Tiny Wan 2.1 VACE parts built in code, for tests: a ``WanVACETransformer3DModel`` whose VACE
part starts at zero, a causal video VAE (``AutoencoderKLWan``), a UMT5 text encoder and the
flow scheduler of Wan's diffusers folders.

The VAE keeps Wan's layout (8x in space, 4x in time: 4k + 1 frames become k + 1 latent frames)
with 4 latent channels, so the transformer's VACE control latents have 2 x 4 + 8 x 8 = 72
channels. Everything is random-weight and small (about 0.1M parameters each); no hub access.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel

from ..families.wan_vace import VACE_MODULES, WanVACESideNetwork


def tiny_wan_vace_config(
    latent_channels: int = 4,
    text_dim: int = 16,
    num_layers: int = 4,
    vace_layers: tuple[int, ...] = (0, 1, 3),
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    vae_scale_factor: int = 8,
) -> dict:
    """A ``WanVACETransformer3DModel`` config: 1 x 2 x 2 patches of ``latent_channels``-channel
    latents, ``num_layers`` blocks with a VACE block at each of ``vace_layers`` (three by default,
    so the middle one, LISA's default layer, has a block after it), and control latents of the
    width a VAE with ``latent_channels`` channels and ``vae_scale_factor`` makes."""
    width = num_attention_heads * attention_head_dim
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=2 * width,
        num_layers=num_layers,
        rope_max_seq_len=64,
        vace_layers=list(vace_layers),
        vace_in_channels=2 * latent_channels + vae_scale_factor**2,
    )


def tiny_wan_vace_transformer(seed: int | None = None, **config) -> WanVACETransformer3DModel:
    """A random :func:`tiny_wan_vace_config` transformer whose VACE part is new
    (:meth:`WanVACESideNetwork.new_for`: zero projections), so it predicts as the Wan
    text-to-video transformer it extends until its VACE part is trained."""
    if seed is not None:
        torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(**tiny_wan_vace_config(**config))
    vace_part = WanVACESideNetwork.new_for(transformer)
    for name in VACE_MODULES:
        getattr(transformer, name).load_state_dict(getattr(vace_part, name).state_dict())
    return transformer


def tiny_wan_vae(seed: int | None = None, latent_channels: int = 4) -> AutoencoderKLWan:
    """Wan's causal video VAE at width 8, with its 8x spatial and 4x temporal factors and
    per-channel latent statistics of its own."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * (k % 3 - 1) for k in range(latent_channels)],
        latents_std=[1.0 + 0.25 * (k % 3) for k in range(latent_channels)],
    )


def tiny_umt5(seed: int | None = None, vocab_size: int = 128, hidden_size: int = 16):
    """A one-layer ``UMT5EncoderModel`` with ``hidden_size``-wide states (the transformer's
    ``text_dim``)."""
    from transformers import UMT5Config, UMT5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=hidden_size,
        d_kv=hidden_size // 2,
        d_ff=2 * hidden_size,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return UMT5EncoderModel(config).eval()


def wan_scheduler(flow_shift: float = 3.0) -> UniPCMultistepScheduler:
    """The scheduler of Wan's diffusers folders: UniPC over flow sigmas with a static shift
    (3.0 at 480p)."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
    )
