"""Corruptions for restoration benchmarks, in the spirit of ImageNet-C, sized for small renders.

``corrupt(images, name, severity, seed)`` maps a batch (B, 3, H, W) in [-1, 1] to a corrupted
batch of the same shape, dtype and range. Severities run 1..5; each corruption's randomness is
drawn from numpy's generator seeded with (seed, index of the image in the batch, corruption), so
an image's corruption depends only on the seed and its position, and one seed draws the same
random numbers at every severity: a higher severity strengthens the same noise, mask or pixel
choice, so the distance to the clean image grows with the severity.

The blur's width is given for 32 x 32 images and scales with the image size; pixelation and fog
are relative to the image size already. Only torch, numpy and PIL are used.

=================  ==================================================================
name               what it does (pixel values v in [0, 1])
=================  ==================================================================
gaussian_noise     v + N(0, c^2), c = 0.08, 0.12, 0.18, 0.26, 0.38
blur               Gaussian blur, std (0.4, 0.6, 0.8, 1.1, 1.5) x H/32 pixels
jpeg               JPEG round trip at quality 25, 18, 15, 10, 7
pixelate           box-downsample to 0.6, 0.5, 0.4, 0.3, 0.25 of the size, nearest upsample
contrast           mean + (v - mean) c, c = 0.4, 0.3, 0.2, 0.1, 0.05
fog                (v + c1 plasma) max(v) / (max(v) + c1), plasma a fractal noise field in
                   [0, 1] with roughness c2; (c1, c2) = (1.5, 2), (2, 2), (2.5, 1.7),
                   (2.5, 1.5), (3, 1.4) as ImageNet-C
masking            one square of a random colour covering 10, 20, 30, 40, 50% of the image,
                   centred at a random point, shifted inside the image where it would cross
                   the border
salt_and_pepper    a share 0.03, 0.06, 0.09, 0.17, 0.27 of the pixels set to black or white
=================  ==================================================================
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_noise(v, rng, k):
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[k]
    return v + c * rng.standard_normal(v.shape)


def _gaussian_kernel(std: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * std)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / std) ** 2)
    return kernel / kernel.sum()


def _blur(v, rng, k):
    std = (0.4, 0.6, 0.8, 1.1, 1.5)[k] * v.shape[0] / 32
    kernel = torch.from_numpy(_gaussian_kernel(std))
    pad = len(kernel) // 2
    x = torch.from_numpy(v).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0].permute(1, 2, 0).numpy()


def _to_pil(v) -> Image.Image:
    return Image.fromarray((np.clip(v, 0, 1) * 255).round().astype(np.uint8))


def _jpeg(v, rng, k):
    quality = (25, 18, 15, 10, 7)[k]
    buffer = io.BytesIO()
    _to_pil(v).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), np.float64) / 255


def _pixelate(v, rng, k):
    height, width = v.shape[:2]
    factor = 1 / (0.6, 0.5, 0.4, 0.3, 0.25)[k]
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    image = _to_pil(v).resize(small, Image.BOX).resize((width, height), Image.NEAREST)
    return np.asarray(image, np.float64) / 255


def _contrast(v, rng, k):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[k]
    mean = v.mean()
    return (v - mean) * c + mean


def plasma(height: int, width: int, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """A fractal noise field in [0, 1]: octaves of bilinearly upsampled uniform noise on grids of
    2, 4, 8, ... cells, octave o weighted roughness^-o (ImageNet-C's ``wibbledecay``)."""
    size = max(height, width)
    field = torch.zeros(1, 1, size, size, dtype=torch.float64)
    cells, weight = 2, 1.0
    while cells <= size:
        octave = torch.from_numpy(rng.uniform(-1, 1, (1, 1, cells + 1, cells + 1)))
        field += weight * F.interpolate(octave, size=(size, size), mode="bilinear",
                                        align_corners=True)  # fmt: skip
        cells, weight = cells * 2, weight / roughness
    field = field[0, 0, :height, :width].numpy()
    return (field - field.min()) / max(field.max() - field.min(), 1e-12)


def _fog(v, rng, k):
    strength, roughness = ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))[k]
    peak = v.max()
    fog = plasma(v.shape[0], v.shape[1], roughness, rng)[..., None]
    return (v + strength * fog) * peak / (peak + strength)


def _masking(v, rng, k):
    share = (0.1, 0.2, 0.3, 0.4, 0.5)[k]
    height, width = v.shape[:2]
    colour = rng.uniform(0, 1, 3)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    side_y, side_x = np.sqrt(share) * height, np.sqrt(share) * width
    top, left = int(round(cy - side_y / 2)), int(round(cx - side_x / 2))
    # Shift the square inside the image so that it covers the stated share.
    top = min(max(top, 0), height - int(round(side_y)))
    left = min(max(left, 0), width - int(round(side_x)))
    out = v.copy()
    out[top : top + int(round(side_y)), left : left + int(round(side_x))] = colour
    return out


def _salt_and_pepper(v, rng, k):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[k]
    hit = rng.uniform(0, 1, v.shape[:2]) < amount
    salt = rng.uniform(0, 1, v.shape[:2]) < 0.5
    out = v.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


CORRUPTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "contrast": _contrast,
    "fog": _fog,
    "masking": _masking,
    "salt_and_pepper": _salt_and_pepper,
}


def available_corruptions() -> list[str]:
    return list(CORRUPTIONS)


def check_corruption(name: str, severity: int = 3) -> None:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of 1, 2, 3, 4, 5, got {severity!r}.")


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """``images`` (B, 3, H, W) in [-1, 1] with corruption ``name`` at ``severity`` (1..5)."""
    check_corruption(name, severity)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    if seed < 0:
        raise ConfigError(f"the corruption seed must be >= 0, got {seed}.")
    function, stream = CORRUPTIONS[name], zlib.crc32(name.encode())
    pixels = ((images.detach().double().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    out = []
    for index, v in enumerate(pixels):
        rng = np.random.default_rng([int(seed), index, stream])
        out.append(np.clip(function(v, rng, severity - 1), 0.0, 1.0))
    result = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) * 2 - 1
    return result.to(device=images.device, dtype=images.dtype).contiguous()
