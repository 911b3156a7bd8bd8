"""LISA for transformer side networks: a token decoder, the feature shapes of SD3 / Flux
ControlNets, and :func:`lisa_for_branch`, which builds a sized LISA regularizer for any branch.

A transformer ControlNet's zero projection ``controlnet_blocks[k]`` reads the image tokens
h in R^{B x N x D} after its block k (N = (H/p) (W/p) tokens of p x p patches). The decoder maps
them back to the prediction space (B, C, H, W): a per-token linear head to p^2 C values, then the
inverse of the patch embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError, ModelError
from ..core.objectives import sinusoidal_embedding
from .lisa import LikelihoodScoreAlignment


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, h w, p p C) tokens, row-major, features ordered (dy, dx, c) -> (B, C, h p, w p):
    the layout of ``SD3Transformer2DModel``'s output projection."""
    b, n, features = patches.shape
    h, w = grid
    p = patch_size
    channels = features // (p * p)
    patches = patches.reshape(b, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", patches).reshape(b, channels, h * p, w * p)


class TokenScoreDecoder(nn.Module):
    """Maps side-network tokens (B, N, D) and the timestep to the prediction space (B, C, H, W).

    With e = MLP(sinusoidal(t)) -> (shift, scale) in R^D x R^D (adaLN, as DiT conditions on t):

        y = unpatchify( W_out [ LayerNorm(h) (1 + scale) + shift ] + b_out )

    W_out, b_out map D -> p^2 C and start at zero (``out``, zero-initialised), so the decoder is
    the zero map at first: step one's aux loss is |r|^2 and no random head pushes the side network.

    ``grid_size``: tokens per side (int) or (rows, columns) of the training resolution, e.g.
    sample_size / patch_size; ``None`` infers a square grid from N at each call.
    """

    time_embed_dim = 256

    def __init__(
        self,
        hidden_dim: int,
        out_channels: int,
        patch_size: int,
        grid_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        self.grid_size = None if grid_size is None else tuple(grid_size)
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_embed_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, 2 * hidden_dim),
        )
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        # Named ``out`` like ScoreDecoder's last layer: LISA watches it to catch an optimizer that
        # was not given the decoder's parameters.
        self.out = nn.Linear(hidden_dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def grid(self, num_tokens: int) -> tuple[int, int]:
        if self.grid_size is not None:
            if self.grid_size[0] * self.grid_size[1] != num_tokens:
                raise ModelError(
                    f"the decoder was sized for a {self.grid_size[0]}x{self.grid_size[1]} token "
                    f"grid but got {num_tokens} tokens; size it for the training resolution "
                    "(sample_size=) or pass grid_size=None for square images of any size."
                )
            return self.grid_size
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ModelError(
                f"{num_tokens} tokens are not a square grid; give the decoder "
                "grid_size=(rows, cols)."
            )
        return side, side

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(timesteps.reshape(-1), self.time_embed_dim)
        shift, scale = self.time_mlp(emb.to(self.out.weight.dtype)).chunk(2, dim=-1)
        h = self.norm(tokens.to(self.out.weight.dtype))
        h = h * (1 + scale[:, None]) + shift[:, None]
        return unpatchify(self.out(h), self.grid(tokens.shape[1]), self.patch_size)


# ----------------------------------------------------------------------------- feature shapes


def transformer_block_counts(side_network: nn.Module) -> tuple[int, int]:
    """(number of ``controlnet_blocks``, number of ``controlnet_single_blocks``)."""
    blocks = getattr(side_network, "controlnet_blocks", None) or []
    singles = getattr(side_network, "controlnet_single_blocks", None) or []
    return len(blocks), len(singles)


def middle_block_layer(side_network: nn.Module) -> str:
    """The default LISA layer of a transformer ControlNet: the input of the middle zero projection
    ``block_{n // 2}`` of its n (double) blocks, and ``block_0`` when n is 1 or 2: with two
    blocks ``n // 2`` would be the last block, whose output only feeds its projection, not a
    middle layer. Flux ControlNets without double blocks use the middle single block likewise."""
    blocks, singles = transformer_block_counts(side_network)
    if blocks:
        return "block_0" if blocks <= 2 else f"block_{blocks // 2}"
    if singles:
        return "single_0" if singles <= 2 else f"single_{singles // 2}"
    raise ModelError(f"{type(side_network).__name__} has no controlnet_blocks to hook.")


def token_feature_dim(side_network: nn.Module, layer: str) -> int:
    """Width D of the tokens entering zero projection ``layer`` (``block_k`` / ``single_k``)."""
    blocks, singles = transformer_block_counts(side_network)
    valid = [f"block_{k}" for k in range(blocks)] + [f"single_{k}" for k in range(singles)]
    if layer not in valid:
        raise ConfigError(
            f"LISA on a transformer side network reads the tokens entering a zero projection; "
            f"layer {layer!r} is not one. Valid names: {', '.join(valid)}."
        )
    kind, index = layer.split("_")
    container = (
        side_network.controlnet_blocks if kind == "block" else side_network.controlnet_single_blocks
    )
    return container[int(index)].in_features


# ----------------------------------------------------------------------------- LISA per family


def lisa_for_branch(
    branch: nn.Module,
    layer: str | None = None,
    weight: float = 0.2,
    sample_size: int | None = None,
    **kwargs,
) -> LikelihoodScoreAlignment:
    """A :class:`LikelihoodScoreAlignment` for ``branch`` with its decoder sized from the configs.

    ``sample_size``: the training resolution of the (latent) sample; default the main network's
    ``sample_size`` (SD3, UNets), or for Flux, which has none, a square grid inferred per batch.
    Other keyword arguments go to :class:`LikelihoodScoreAlignment` (``distance``,
    ``timestep_range``, ...).

    * SD3 / Flux: ``layer`` is ``block_k`` or ``single_k`` (default :func:`middle_block_layer`);
      a :class:`TokenScoreDecoder` with the side network's width, the patch size (SD3's
      ``patch_size``; 2 for Flux's packing) and the main network's output channels.
    * T2I-Adapter: ``layer`` is ``adapter.body.k`` (default ``adapter.body.1``); a ScoreDecoder
      sized by :func:`~lisa_control.families.t2i_adapter.adapter_feature_shape`.
    * UNet ControlNet: the standard LISA defaults (``down_5``), sized from the UNet's config.
    """
    from ..families.flux import FluxControlNetBranch
    from ..families.sd3 import SD3ControlNetBranch
    from ..families.t2i_adapter import (
        T2IAdapterBranch,
        adapter_feature_shape,
        default_adapter_layer,
    )
    from ..families.unet import UNetControlNetBranch

    side, main = branch.side_network, branch.main_network
    if isinstance(branch, (SD3ControlNetBranch, FluxControlNetBranch)):
        layer = layer or middle_block_layer(side)
        hidden_dim = token_feature_dim(side, layer)
        if isinstance(branch, SD3ControlNetBranch):
            patch_size = main.config.patch_size
            out_channels = main.out_channels
            sample_size = sample_size or main.config.sample_size
        else:
            patch_size = 2  # the 2x2 packing
            out_channels = main.out_channels // 4  # packed width -> latent channels
        decoder = TokenScoreDecoder(
            hidden_dim,
            out_channels,
            patch_size,
            grid_size=None if sample_size is None else sample_size // patch_size,
        )
        return LikelihoodScoreAlignment(side, layer=layer, weight=weight, decoder=decoder, **kwargs)
    if isinstance(branch, T2IAdapterBranch):
        layer = layer or default_adapter_layer(side)
        sample_size = sample_size or main.config.sample_size
        if "feature_channels" not in kwargs or "feature_size" not in kwargs:
            channels, size = adapter_feature_shape(
                side, layer, sample_size, branch.condition_downscale
            )
            kwargs.setdefault("feature_channels", channels)
            kwargs.setdefault("feature_size", size)
        return LikelihoodScoreAlignment(
            side,
            layer=layer,
            out_channels=main.config.out_channels,
            sample_size=sample_size,
            weight=weight,
            **kwargs,
        )
    if isinstance(branch, UNetControlNetBranch):
        return LikelihoodScoreAlignment(
            side,
            layer=layer,
            out_channels=main.config.out_channels,
            sample_size=sample_size or main.config.sample_size,
            weight=weight,
            **kwargs,
        )
    raise ConfigError(
        f"no LISA recipe for {type(branch).__name__}; build LikelihoodScoreAlignment(side_network, "
        "layer=..., decoder=...) yourself."
    )
