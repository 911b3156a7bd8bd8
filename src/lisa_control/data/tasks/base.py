"""What every control task is: a seeded renderer of (image, condition, caption) samples, a
fidelity metric that scores generated images against the conditions that produced them, and an
unconditional realism statistic. :class:`TaskDataset` serves a task to the trainer in the
conventions of diffusers' ControlNet script (images in [-1, 1], conditions in [0, 1]).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import ConfigError

# Seed of the renders that the default realism statistic compares against; any fixed value works.
REFERENCE_SEED = 20_240_601


@dataclass
class TaskSample:
    image: np.ndarray  # uint8 (H, W, 3)
    condition: np.ndarray  # uint8 (H, W, C)
    caption: str
    meta: dict = field(default_factory=dict)  # what the metric needs beyond the condition


def check_resolution(resolution: int, multiple: int = 8) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool):
        raise ConfigError(f"resolution must be an integer, got {resolution!r}.")
    if not 16 <= resolution <= 512 or resolution % multiple:
        raise ConfigError(
            f"resolution {resolution} is not supported: use a multiple of {multiple} between 16 "
            "and 512 (32 and 64 are the tested sizes)."
        )
    return int(resolution)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Model outputs (B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) on the 0..255 scale."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    pixels = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5)
    return pixels.permute(0, 2, 3, 1).numpy()


def stack_images(samples: list[TaskSample]) -> np.ndarray:
    """The samples' ground-truth images as float32 (B, H, W, 3) on the 0..255 scale."""
    return np.stack([s.image for s in samples]).astype(np.float32)


def check_batch(pixels: np.ndarray, samples: list[TaskSample]) -> None:
    if len(samples) != pixels.shape[0]:
        raise ConfigError(
            f"got {pixels.shape[0]} generated images but {len(samples)} task samples; pass the "
            "samples whose conditions produced the images, in the same order."
        )
    if samples and pixels.shape[1:3] != samples[0].image.shape[:2]:
        raise ConfigError(
            f"generated images are {pixels.shape[1]}x{pixels.shape[2]} but the task renders "
            f"{samples[0].image.shape[0]}x{samples[0].image.shape[1]}; generate at the task's "
            "resolution."
        )


def appearance_histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised joint histogram (256 bins) of per-pixel colour (4 levels per channel) and local
    contrast (4 levels of the larger RGB distance to the right and lower neighbour)."""
    here = pixels[:, :-1, :-1]
    right = np.linalg.norm(pixels[:, :-1, 1:] - here, axis=-1)
    down = np.linalg.norm(pixels[:, 1:, :-1] - here, axis=-1)
    contrast_bin = np.digitize(np.maximum(right, down), [6.0, 24.0, 72.0])
    colour_bin = np.minimum(here // 64, 3).astype(np.int64)
    index = ((colour_bin[..., 0] * 4 + colour_bin[..., 1]) * 4 + colour_bin[..., 2]) * 4
    counts = np.bincount((index + contrast_bin).ravel(), minlength=256).astype(np.float64)
    return counts / counts.sum()


class ProceduralTask:
    """Base class of the control tasks; subclasses set the class variables and implement
    :meth:`render` and :meth:`fidelity`."""

    name: ClassVar[str]
    condition_channels: ClassVar[int] = 3
    metric_name: ClassVar[str]
    realism_reference_size: ClassVar[int] = 256

    def __init__(self, resolution: int = 32):
        self.resolution = check_resolution(resolution)
        self._reference_histogram: np.ndarray | None = None

    def render(self, rng: np.random.Generator) -> TaskSample:
        raise NotImplementedError

    def sample(self, seed: int, index: int) -> TaskSample:
        """The ``index``-th sample of the stream ``seed``: the same pair always gives the same
        sample, and each task draws from its own stream."""
        if seed < 0 or index < 0:
            raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}.")
        stream = zlib.crc32(self.name.encode())
        return self.render(np.random.default_rng([int(seed), int(index), stream]))

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        raise NotImplementedError

    def realism(self, images: torch.Tensor) -> float:
        """Histogram intersection ``sum_b min(p_b, q_b)`` between the appearance histogram (see
        :func:`appearance_histogram`) of ``images`` and that of this task's own reference renders.

        1 means the batch's colours and textures are distributed like the task's images; blank
        and noise images share few bins with them and score near 0.
        """
        if self._reference_histogram is None:
            reference = [
                self.sample(REFERENCE_SEED, i).image for i in range(self.realism_reference_size)
            ]
            self._reference_histogram = appearance_histogram(np.stack(reference).astype(np.float32))
        batch = appearance_histogram(to_pixels(images))
        return float(np.minimum(batch, self._reference_histogram).sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution})"


class TaskDataset(Dataset):
    """``size`` samples of ``task`` rendered on the fly: item i is always ``task.sample(seed, i)``."""

    def __init__(self, task: ProceduralTask, size: int, seed: int = 0):
        if size < 1:
            raise ConfigError(f"a task dataset needs size >= 1, got {size}.")
        if seed < 0:
            raise ConfigError(f"the dataset seed must be >= 0, got {seed}.")
        self.task = task
        self.size = int(size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def sample(self, i: int) -> TaskSample:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a task dataset of {self.size} items")
        return self.task.sample(self.seed, i % self.size)

    def __getitem__(self, i: int) -> dict:
        s = self.sample(i)
        image = torch.from_numpy(s.image.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        condition = torch.from_numpy(s.condition.astype(np.float32)).permute(2, 0, 1) / 255
        return {
            "pixel_values": image.contiguous(),
            "conditioning_pixel_values": condition.contiguous(),
            "caption": s.caption,
            "index": int(i % self.size),
        }
