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

from ...core.errors import ConfigError
from ..sampler import split_key

# Seed of the renders that the default realism statistic compares against; any fixed value works.
REFERENCE_SEED = 20_240_601
# An image kind (see image_kinds) counts as typical of a task if this share of its renders has it.
TYPICAL_SHARE = 0.02


@dataclass
class TaskSample:
    image: np.ndarray  # uint8 (H, W, 3); a video task's (F, H, W, 3)
    # uint8 (H, W, C), a video task's (F, H, W, C); a task with several conditions: name -> one
    condition: np.ndarray | dict[str, np.ndarray]
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


def _contrast(pixels: np.ndarray) -> np.ndarray:
    """(B, H-1, W-1) larger RGB distance of each pixel to its right and lower neighbour."""
    here = pixels[:, :-1, :-1]
    right = np.linalg.norm(pixels[:, :-1, 1:] - here, axis=-1)
    down = np.linalg.norm(pixels[:, 1:, :-1] - here, axis=-1)
    return np.maximum(right, down)


def pixel_histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised joint histogram (256 bins) over all pixels of images (B, H, W, 3) on the
    0..255 scale: colour (4 levels per channel) x local contrast (4 levels)."""
    contrast_bin = np.digitize(_contrast(pixels), [6.0, 24.0, 72.0])
    colour_bin = np.minimum(pixels[:, :-1, :-1] // 64, 3).astype(np.int64)
    index = ((colour_bin[..., 0] * 4 + colour_bin[..., 1]) * 4 + colour_bin[..., 2]) * 4
    counts = np.bincount((index + contrast_bin).ravel(), minlength=256).astype(np.float64)
    return counts / counts.sum()


def image_kinds(pixels: np.ndarray) -> np.ndarray:
    """(B,) coarse kind (0..15) of each image: mean brightness (4 levels) x share of pixels with
    visible local contrast (4 levels). It tells a blank image from a real one whose pixels look
    the same, e.g. Fashion-MNIST's black background."""
    brightness_bin = np.digitize(pixels.mean(axis=(1, 2, 3)), [64.0, 128.0, 192.0])
    busy_bin = np.digitize((_contrast(pixels) > 24.0).mean(axis=(1, 2)), [0.03, 0.1, 0.25])
    return brightness_bin * 4 + busy_bin


def histogram_overlap(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.minimum(p, q).sum())


class ProceduralTask:
    """Base class of the control tasks; subclasses set the class variables and implement
    :meth:`render` and :meth:`fidelity`."""

    name: ClassVar[str]
    condition_channels: ClassVar[int] = 3
    metric_name: ClassVar[str]
    realism_reference_size: ClassVar[int] = 256

    def __init__(self, resolution: int = 32):
        self.resolution = check_resolution(resolution)
        self._reference: tuple[np.ndarray, np.ndarray] | None = None  # built by realism()

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
        """How much ``images`` look like this task's images, in [0, 1]:

            realism = sum_b min(p_b, q_b) * mean_i [r_k(i) >= TYPICAL_SHARE]

        where p and q are the pixel histograms (:func:`pixel_histogram`) of the batch and of
        this task's own reference renders, k(i) is image i's kind (:func:`image_kinds`) and r_k
        the share of reference renders of kind k. A batch of real renders scores near 1 (a bit
        less for small batches); blank and noise images score near 0.
        """
        if self._reference is None:
            reference = np.stack(
                [self.sample(REFERENCE_SEED, i).image for i in range(self.realism_reference_size)]
            ).astype(np.float32)
            kinds = np.bincount(image_kinds(reference), minlength=16) / len(reference)
            self._reference = (pixel_histogram(reference), kinds >= TYPICAL_SHARE)
        pixels = to_pixels(images)
        reference_pixels, typical_kinds = self._reference
        pixel_overlap = histogram_overlap(pixel_histogram(pixels), reference_pixels)
        return pixel_overlap * float(typical_kinds[image_kinds(pixels)].mean())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution})"


def condition_tensor(condition: np.ndarray) -> torch.Tensor:
    """A rendered condition uint8 as the side network takes it, channels first in [0, 1]:
    (H, W, C) -> (C, H, W), a video task's (F, H, W, C) -> (C, F, H, W)."""
    return (torch.from_numpy(condition.astype(np.float32)).movedim(-1, 0) / 255).contiguous()


class TaskDataset(Dataset):
    """``size`` samples of ``task``, rendered on the fly: item i is ``task.sample(seed, i)``.
    Items are read by index or by ``(epoch, index)``, the trainer's keys; the epoch changes
    nothing, since a render's caption describes its image."""

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

    @property
    def condition_names(self) -> tuple[str, ...]:
        """The conditions a task with several renders (``conditions``), empty for the others."""
        return tuple(getattr(self.task, "conditions", ()))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        _, i = split_key(key)
        s = self.sample(i)
        # Channels first: (H, W, C) -> (C, H, W); video tasks' (F, H, W, C) -> (C, F, H, W).
        image = torch.from_numpy(s.image.astype(np.float32)).movedim(-1, 0) / 127.5 - 1
        if isinstance(s.condition, dict):  # several conditions: a mapping name -> tensor
            condition = {name: condition_tensor(c) for name, c in s.condition.items()}
        else:
            condition = condition_tensor(s.condition)
        return {
            "pixel_values": image.contiguous(),
            "conditioning_pixel_values": condition,
            "caption": s.caption,
            "index": int(i % self.size),
        }
