"""The score decoder of transformer side networks, which LISA trains on tokens.

A transformer ControlNet's zero projection ``controlnet_blocks[k]`` reads the image tokens
h in R^{B x N x D} after its block k (N = (H/p) (W/p) tokens of p x p patches). The decoder maps
them back to the prediction space (B, C, H, W): a per-token linear head to p^2 C values, then the
inverse of the patch embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ModelError
from ..core.objectives import sinusoidal_embedding


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
