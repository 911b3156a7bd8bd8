"""Edges: shapes on a quiet background; the condition is the image's edge map.

The condition and the metric use the same fixed detector (:func:`edge_map`), so a ground-truth
image reproduces its condition exactly. Shape colours are kept at least
:data:`MIN_SHAPE_CONTRAST` apart and textures change by far less than :data:`EDGE_THRESHOLD`
between neighbours, so the detector fires on shape outlines and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch

from . import painting
from .registry import register_task
from .base import ProceduralTask, TaskSample, check_batch, to_pixels

EDGE_THRESHOLD = 48.0  # RGB distance between neighbours that counts as an edge, 0..255 scale
MIN_SHAPE_CONTRAST = 110.0


def edge_map(pixels: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Boolean (..., H, W) edges of (..., H, W, 3) colours on the 0..255 scale.

    Pixel p is an edge where ``max(|I(p) - I(p + right)|, |I(p) - I(p + down)|) > threshold``
    (Euclidean RGB distance), which marks one pixel, not two, along each colour step.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    edges = np.zeros(pixels.shape[:-1], dtype=bool)
    right = np.linalg.norm(pixels[..., :, 1:, :] - pixels[..., :, :-1, :], axis=-1) > threshold
    down = np.linalg.norm(pixels[..., 1:, :, :] - pixels[..., :-1, :, :], axis=-1) > threshold
    edges[..., :, :-1] |= right
    edges[..., :-1, :] |= down
    return edges


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation of boolean (..., H, W) masks: each pixel grows to its 8 neighbours."""
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    h, w = mask.shape[-2:]
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[..., dy : dy + h, dx : dx + w]
    return grown


def edge_scores(predicted: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image precision, recall and F1 of boolean (B, H, W) edge maps with 1 px tolerance.

    precision = |P & dilate(T)| / |P|,  recall = |T & dilate(P)| / |T|,
    F1 = 2 precision recall / (precision + recall).
    An image with no edges in either map scores 1; with edges in only one of them, 0.
    """
    axes = (-2, -1)
    n_pred = predicted.sum(axes)
    n_true = target.sum(axes)
    hit_pred = (predicted & dilate(target)).sum(axes)
    hit_true = (target & dilate(predicted)).sum(axes)
    precision = np.where(n_pred > 0, hit_pred / np.maximum(n_pred, 1), n_true == 0)
    recall = np.where(n_true > 0, hit_true / np.maximum(n_true, 1), n_pred == 0)
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return {"precision": precision.astype(float), "recall": recall.astype(float), "f1": f1}


def edge_condition(image: np.ndarray) -> np.ndarray:
    """White-on-black (H, W, 3) uint8 edge map of a uint8 image."""
    edges = edge_map(image)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


class EdgeFidelity:
    """The edge metric, for any task whose condition is :func:`edge_condition` of its image."""

    metric_name = "edge_f1"

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        pixels = to_pixels(generated)
        check_batch(pixels, samples)
        target = np.stack([s.condition[..., 0] > 127 for s in samples])
        scores = edge_scores(edge_map(pixels), target)
        return {
            "edge_f1": float(scores["f1"].mean()),
            "edge_precision": float(scores["precision"].mean()),
            "edge_recall": float(scores["recall"].mean()),
        }


@register_task
class EdgesTask(EdgeFidelity, ProceduralTask):
    name = "edges"
    metric_name = "edge_f1"

    def render(self, rng: np.random.Generator) -> TaskSample:
        r = self.resolution
        background_name = painting.choose(rng, list(painting.BACKGROUND_COLOURS))
        base = painting.jitter(rng, painting.BACKGROUND_COLOURS[background_name], 8)
        # a gentle ramp or blotches, at most ~30 levels over the canvas
        pattern = (
            painting.gradient(rng, r) if rng.random() < 0.5 else painting.smooth_noise(rng, r, 4)
        )
        image = painting.fill(pattern, base - 15, base + 15)

        names = painting.pick_distinct(
            rng,
            painting.SHAPE_COLOURS,
            int(rng.integers(2, 4)),
            avoid=[base],
            min_distance=MIN_SHAPE_CONTRAST,
        )
        words = []
        for colour_name in names:
            kind, mask = painting.random_shape(rng, r, 0.14 * r, 0.3 * r)
            colour = painting.jitter(rng, painting.SHAPE_COLOURS[colour_name], 8)
            image = np.where(mask[..., None], self._texture(rng, colour), image)
            words.append(painting.a(f"{colour_name} {kind}"))
        image_u8 = painting.to_uint8(image)
        caption = f"{painting.enumerate_words(words)} on {painting.a(background_name)} background"
        return TaskSample(image_u8, edge_condition(image_u8), caption, {"shapes": len(words)})

    def _texture(self, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
        """Flat, ramped or faintly striped colour that never steps by an edge's worth between
        neighbouring pixels."""
        r = self.resolution
        kind = rng.integers(3)
        if kind == 0:
            return np.broadcast_to(colour, (r, r, 3))
        if kind == 1:
            pattern = painting.gradient(rng, r)
            return painting.fill(pattern, colour - 18, colour + 18)
        pattern = painting.stripes(rng, r, period=rng.uniform(0.2, 0.35) * r)
        return painting.fill(pattern, colour - 8, colour + 8)
