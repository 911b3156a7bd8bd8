"""The score decoder of transformer side networks, which LISA trains on tokens.

A transformer ControlNet's zero projection ``controlnet_blocks[k]`` reads the image tokens
h in R^{B x N x D} after its block k (N = (H/p) (W/p) tokens of p x p patches). The decoder maps
them back to the prediction space (B, C, H, W): a per-token linear head to p^2 C values, then the
inverse of the patch embedding. Video transformers (Wan) patch (frames, rows, columns) into
pt x ph x pw cells; their decoder maps tokens to (B, C, F, H, W) the same way.
"""

from __future__ import annotations

import math

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


def unpatchify_video(
    patches: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]
) -> torch.Tensor:
    """(B, f h w, pt ph pw C) tokens, frame-major then row-major, features ordered
    (dt, dy, dx, c) -> (B, C, f pt, h ph, w pw): the layout of Wan transformers' output
    projection."""
    b, n, features = patches.shape
    f, h, w = grid
    pt, ph, pw = patch_size
    channels = features // (pt * ph * pw)
    patches = patches.reshape(b, f, h, w, pt, ph, pw, channels)
    video = torch.einsum("nfhwtpqc->ncfthpwq", patches)
    return video.reshape(b, channels, f * pt, h * ph, w * pw)


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
        self.out = nn.Linear(hidden_dim, self.patch_volume(patch_size) * out_channels)
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

    @staticmethod
    def patch_volume(patch_size) -> int:
        """Values per token and output channel."""
        return patch_size * patch_size

    def patches(self, tokens: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """W_out [ LayerNorm(h) (1 + scale) + shift ] + b_out: every token's patch values."""
        emb = sinusoidal_embedding(timesteps.reshape(-1), self.time_embed_dim)
        shift, scale = self.time_mlp(emb.to(self.out.weight.dtype)).chunk(2, dim=-1)
        h = self.norm(tokens.to(self.out.weight.dtype))
        h = h * (1 + scale[:, None]) + shift[:, None]
        return self.out(h)

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        grid = self.grid(tokens.shape[1])
        return unpatchify(self.patches(tokens, timesteps), grid, self.patch_size)


class VideoTokenScoreDecoder(TokenScoreDecoder):
    """A :class:`TokenScoreDecoder` for the tokens of a video transformer: (B, N, D) tokens of
    ``patch_size`` = (pt, ph, pw) cells, frame-major then row-major, decoded to (B, C, F, H, W).

    ``grid_size``: (rows, columns) of tokens per frame at the training resolution; the number of
    token frames is N / (rows x columns), so clips of any length decode.
    """

    def __init__(
        self,
        hidden_dim: int,
        out_channels: int,
        patch_size: tuple[int, int, int],
        grid_size: int | tuple[int, int],
    ):
        super().__init__(hidden_dim, out_channels, tuple(patch_size), grid_size)

    @staticmethod
    def patch_volume(patch_size) -> int:
        return math.prod(patch_size)

    def grid(self, num_tokens: int) -> tuple[int, int, int]:
        rows, cols = self.grid_size
        if num_tokens % (rows * cols):
            raise ModelError(
                f"{num_tokens} tokens are not whole frames of the {rows}x{cols} token grid the "
                "decoder was sized for; size it for the training resolution (sample_size=)."
            )
        return num_tokens // (rows * cols), rows, cols

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        grid = self.grid(tokens.shape[1])
        return unpatchify_video(self.patches(tokens, timesteps), grid, self.patch_size)
