"""Super-resolution: textured shapes on a textured background; the condition is the image
averaged over 4x4 blocks and blown back up by repetition, so it has the sample's size.

The primary metric asks whether the generated image explains its condition: PSNR between the
generated image, averaged over the same blocks, and the low-resolution image. PSNR against the
ground truth is reported too, but many sharp images share one blurry condition, so it is not
the objective.
"""

from __future__ import annotations

import numpy as np
import torch

from . import painting
from .registry import register_task
from .base import ProceduralTask, TaskSample, check_batch, stack_images, to_pixels

FACTOR = 4
MAX_PSNR = 100.0  # reported for identical images instead of infinity


def downsample(pixels: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Area average of images (..., H, W, C) over ``factor`` x ``factor`` blocks."""
    *lead, h, w, c = pixels.shape
    blocks = pixels.reshape(*lead, h // factor, factor, w // factor, factor, c)
    return blocks.mean(axis=(-4, -2))


def upsample_nearest(pixels: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    return pixels.repeat(factor, axis=-3).repeat(factor, axis=-2)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of images (B, ..., C) in [0, 1]: ``10 log10(1 / MSE)``."""
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return np.minimum(10 * np.log10(1 / np.maximum(mse, 1e-30)), MAX_PSNR)


def low_resolution_condition(image: np.ndarray) -> np.ndarray:
    """The condition of a uint8 image: its 4x area average, nearest-upsampled, uint8."""
    low = painting.to_uint8(downsample(image.astype(np.float32)))
    return upsample_nearest(low)


class SuperResolutionFidelity:
    """The PSNR metrics, for any task whose condition is :func:`low_resolution_condition` of its
    image."""

    metric_name = "psnr_condition"

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        pixels = to_pixels(generated) / 255
        check_batch(pixels, samples)
        low = np.stack([s.condition[::FACTOR, ::FACTOR] for s in samples]).astype(np.float32)
        truth = stack_images(samples) / 255
        return {
            "psnr_condition": float(psnr(downsample(pixels), low / 255).mean()),
            "psnr_gt": float(psnr(pixels, truth).mean()),
        }


@register_task
class SuperResolutionTask(SuperResolutionFidelity, ProceduralTask):
    name = "super_resolution"
    metric_name = "psnr_condition"

    def render(self, rng: np.random.Generator) -> TaskSample:
        r = self.resolution
        background_name = painting.choose(rng, list(painting.BACKGROUND_COLOURS))
        base = painting.jitter(rng, painting.BACKGROUND_COLOURS[background_name], 12)
        tint = painting.smooth_noise(rng, r, int(rng.integers(2, 5)), channels=3) - 0.5
        image = base + 60 * tint + 40 * (painting.gradient(rng, r)[..., None] - 0.5)

        words = []
        for _ in range(int(rng.integers(3, 7))):
            colour_name = painting.choose(rng, list(painting.SHAPE_COLOURS))
            kind, mask = painting.random_shape(rng, r, 0.1 * r, 0.3 * r)
            colour = painting.jitter(rng, painting.SHAPE_COLOURS[colour_name], 12)
            texture, pattern = self._pattern(rng)
            contrast = rng.uniform(20, 70)
            fill = painting.fill(pattern, colour - contrast / 2, colour + contrast / 2)
            image = np.where(mask[..., None], fill, image)
            words.append(painting.a(f"{colour_name} {texture}{kind}"))
        image_u8 = painting.to_uint8(image)
        caption = f"{painting.enumerate_words(words)} on {painting.a(background_name)} background"
        return TaskSample(image_u8, low_resolution_condition(image_u8), caption)

    def _pattern(self, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        """A random texture and its caption word ('' for plain ones)."""
        r = self.resolution
        kind = rng.integers(5)
        if kind == 0:
            return "", np.full((r, r), 0.5, dtype=np.float32)
        if kind == 1:
            return "", painting.gradient(rng, r)
        if kind == 2:
            period = rng.uniform(0.1, 0.25) * r
            return "striped ", painting.stripes(rng, r, period, hard=rng.random() < 0.5)
        if kind == 3:
            cell = max(2, int(round(rng.uniform(0.06, 0.12) * r)))
            return "checked ", painting.checks(rng, r, cell)
        period = max(3, int(round(rng.uniform(0.1, 0.18) * r)))
        return "dotted ", painting.dots(rng, r, period, 0.3 * period)
