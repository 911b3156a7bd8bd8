"""Images out of tensors: uint8 arrays and labelled grids, for validation, sampling and reports."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, signed: bool = True) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] (or [0, 1] with signed=False) -> (B, H, W, 3) uint8."""
    x = images.detach().float().cpu()
    if signed:
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> Image.Image:
    """Tile rows of equally sized HxWx3 uint8 images with a dark gutter."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 32, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = img
    return Image.fromarray(grid)
