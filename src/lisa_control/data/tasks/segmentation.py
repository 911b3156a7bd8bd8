"""Segmentation: shapes of four classes on a grey background; the condition is the class map in
a fixed palette (ADE20K style, one colour per class).

Every class paints with its own texture in shades between two colours of its own hue, and the
shades of different classes never come near each other. So each pixel's colour alone tells its
class: the metric labels a generated image by the nearest class colour (:func:`classify`) and
scores the labels' mIoU against the condition's class map. Classifying single pixels, not local
averages, keeps thin parts and boundaries right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import painting
from .registry import register_task
from .base import ProceduralTask, TaskSample, check_batch, to_pixels

UNKNOWN = -1  # label of a pixel that looks like no class; it is wrong for every class


@dataclass(frozen=True)
class SegmentClass:
    name: str  # adjective for captions
    dark: tuple[int, int, int]
    light: tuple[int, int, int]
    texture: str
    label_colour: tuple[int, int, int]  # the class's colour in the condition

    @property
    def prototype(self) -> np.ndarray:
        return (np.asarray(self.dark, dtype=np.float32) + self.light) / 2


CLASSES = (
    SegmentClass("grey", (95, 95, 95), (165, 165, 165), "blotches", (0, 0, 0)),
    SegmentClass("red striped", (165, 25, 30), (235, 75, 65), "stripes", (0, 200, 255)),
    SegmentClass("green dotted", (30, 140, 45), (90, 210, 95), "dots", (255, 0, 160)),
    SegmentClass("blue checked", (25, 45, 160), (80, 110, 235), "checks", (255, 160, 0)),
    SegmentClass("yellow shaded", (200, 170, 20), (250, 225, 80), "gradient", (140, 90, 255)),
)
PROTOTYPES = np.stack([c.prototype for c in CLASSES])
PALETTE = np.array([c.label_colour for c in CLASSES], dtype=np.uint8)
SHADE_JITTER = 12.0  # per-sample shift of a class's two shades, per channel
# Farther than any texture colour lies from its own prototype (<= 47 + 21 levels), well short of
# half the distance between prototypes.
REJECT_DISTANCE = 80.0


def classify(pixels: np.ndarray) -> np.ndarray:
    """Class labels (..., H, W) of colours (..., H, W, 3): the nearest class prototype, or
    :data:`UNKNOWN` where even that is more than :data:`REJECT_DISTANCE` away."""
    distance = np.linalg.norm(pixels[..., None, :] - PROTOTYPES, axis=-1)
    labels = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= REJECT_DISTANCE, labels, UNKNOWN)


def mean_iou(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image mIoU of label maps (B, H, W): the mean, over the classes present in either map,
    of |P_c & T_c| / |P_c | T_c|. Labels outside 0..num_classes-1 match no class."""
    ious = []
    for c in range(num_classes):
        p, t = predicted == c, target == c
        ious.append(((p & t).sum((-2, -1)), (p | t).sum((-2, -1))))
    intersection = np.stack([i for i, _ in ious], axis=-1).astype(np.float64)
    union = np.stack([u for _, u in ious], axis=-1).astype(np.float64)
    present = union > 0
    per_class = np.where(present, intersection / np.maximum(union, 1), 0.0)
    return per_class.sum(-1) / np.maximum(present.sum(-1), 1)


class SegmentationFidelity:
    """The mIoU metric, for any task whose samples carry their class map in ``meta["labels"]``
    and that can label a generated image with :meth:`classify`."""

    metric_name = "miou"
    num_classes: int

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        pixels = to_pixels(generated)
        check_batch(pixels, samples)
        target = np.stack([s.meta["labels"] for s in samples])
        predicted = self.classify(pixels)
        return {
            "miou": float(mean_iou(predicted, target, self.num_classes).mean()),
            "pixel_accuracy": float((predicted == target).mean()),
        }


@register_task
class SegmentationTask(SegmentationFidelity, ProceduralTask):
    name = "segmentation"
    metric_name = "miou"
    num_classes = len(CLASSES)

    def render(self, rng: np.random.Generator) -> TaskSample:
        r = self.resolution
        image = self._paint(rng, CLASSES[0])
        labels = np.zeros((r, r), dtype=np.int64)
        words = []
        count = int(rng.integers(2, 5))
        for c in rng.permutation(np.arange(1, len(CLASSES)))[:count]:
            kind, mask = painting.random_shape(rng, r, 0.15 * r, 0.3 * r)
            image = np.where(mask[..., None], self._paint(rng, CLASSES[c]), image)
            labels[mask] = c
            words.append(painting.a(f"{CLASSES[c].name} {kind}"))
        caption = f"{painting.enumerate_words(words)} on grey"
        condition = PALETTE[labels]
        return TaskSample(painting.to_uint8(image), condition, caption, {"labels": labels})

    def _paint(self, rng: np.random.Generator, cls: SegmentClass) -> np.ndarray:
        """The whole canvas in ``cls``'s texture; shapes cut their part out of it."""
        r = self.resolution
        if cls.texture == "blotches":
            pattern = painting.smooth_noise(rng, r, int(rng.integers(3, 7)))
        elif cls.texture == "stripes":
            pattern = painting.stripes(rng, r, rng.uniform(0.15, 0.25) * r, hard=True)
        elif cls.texture == "dots":
            period = max(4, int(round(rng.uniform(0.12, 0.18) * r)))
            pattern = painting.dots(rng, r, period, 0.3 * period)
        elif cls.texture == "checks":
            pattern = painting.checks(rng, r, max(2, int(round(rng.uniform(0.08, 0.12) * r))))
        else:
            pattern = painting.gradient(rng, r)
        dark = painting.jitter(rng, cls.dark, SHADE_JITTER)
        light = painting.jitter(rng, cls.light, SHADE_JITTER)
        return painting.fill(pattern, dark, light)

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        return classify(pixels)
