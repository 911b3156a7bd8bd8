"""Condition extractors for ``lisa eval`` on user data: each re-extracts a condition from an
image and compares it with the condition the image was generated from.

``edges`` is built in: a Canny detector in numpy (per-channel 3x3 Sobel, L1 magnitude, the
strongest channel per pixel, non-maximum suppression, hysteresis between two thresholds: the
recipe of OpenCV's ``Canny(image, 100, 200)``, which ControlNet's canny conditions are made
with, though not bit-exact with it), scored like the ``edges`` task: precision, recall and F1
of edge pixels with a tolerance of ``tolerance`` pixels
(:func:`lisa_control.data.tasks.edges.edge_scores` at 1 pixel).

``pose``, ``depth`` and ``segmentation`` run ``controlnet_aux`` annotators (OpenPose and MiDaS
from lllyasviel/Annotators, Segment Anything from ybelkada/segment-anything's ``checkpoints``)
when that package and the annotators' weights are installed (``--extractor_weights`` names a
local copy):

* pose: IoU of the drawn skeletons' pixels (anything brighter than black);
* depth: mean absolute difference of the two depth maps, each scaled to [0, 1] by its own range
  (MiDaS depth is relative), lower is better;
* segmentation: each region (colour) of the given map matched with the extracted region that
  overlaps it best; the mean IoU of these matches, so the colours of the two maps need not agree.

All extractors take and return uint8 (N, H, W, 3) arrays; ``compare`` returns per-image arrays.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np

from ..core.errors import ConfigError, ModelError
from ..data.tasks.edges import dilate, edge_scores

# OpenCV's Canny decides a pixel's gradient direction against tan(22.5 deg), in fixed point.
_TAN_22_5 = 0.4142135623730951


class Extractor:
    """Re-extracts conditions from images and compares them with given ones.

    Class attributes:
        name: the ``--extractor`` value.
        metric_name: the headline metric among ``compare``'s keys.
        higher_is_better: the headline metric's direction.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def extract(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def compare(self, extracted: np.ndarray, given: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- edges


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of (N, H, W) float arrays, borders replicated."""
    p = np.pad(channel, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2]
    )
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:]
    )
    return gx, gy


def _shifted(values: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """values[y + dy, x + dx] for every (y, x), zero outside the image."""
    n, h, w = values.shape
    out = np.zeros_like(values)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[:, yd, xd] = values[:, ys, xs]
    return out


def canny(images: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Boolean (N, H, W) Canny edges of uint8 (N, H, W, 3) or (N, H, W) images.

    Gradients are 3x3 Sobel per channel with the L1 magnitude |gx| + |gy|, taken from the
    channel where it is largest; a pixel survives non-maximum suppression if its magnitude is
    above the one before it and not below the one after it along the gradient's direction (0,
    45, 90 or 135 degrees); survivors above ``high`` are edges, and so are survivors above
    ``low`` 8-connected to an edge.
    """
    pixels = np.asarray(images, dtype=np.float64)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.ndim != 4:
        raise ConfigError(f"expected images (N, H, W, C), got shape {pixels.shape}.")
    gx = np.empty(pixels.shape[:3])
    gy = np.empty_like(gx)
    magnitude = np.full_like(gx, -1.0)
    for c in range(pixels.shape[-1]):
        cx, cy = _sobel(pixels[..., c])
        m = np.abs(cx) + np.abs(cy)
        better = m > magnitude
        gx, gy, magnitude = (
            np.where(better, cx, gx),
            np.where(better, cy, gy),
            np.maximum(m, magnitude),
        )
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * _TAN_22_5  # gradient along x: compare left and right
    vertical = ay > ax / _TAN_22_5  # gradient along y: compare up and down
    same_sign = (gx * gy) > 0
    keep = np.zeros_like(magnitude, dtype=bool)
    for mask, (dy, dx) in (
        (horizontal, (0, 1)),
        (vertical, (1, 0)),
        (~horizontal & ~vertical & same_sign, (1, 1)),
        (~horizontal & ~vertical & ~same_sign, (1, -1)),
    ):
        before, after = _shifted(magnitude, -dy, -dx), _shifted(magnitude, dy, dx)
        keep |= mask & (magnitude > before) & (magnitude >= after)
    candidate = keep & (magnitude > low)
    edges = candidate & (magnitude > high)
    while True:
        grown = dilate(edges) & candidate
        if (grown == edges).all():
            return edges
        edges = grown


def tolerant_edge_scores(
    predicted: np.ndarray, target: np.ndarray, tolerance: int = 1
) -> dict[str, np.ndarray]:
    """Per-image precision, recall and F1 of boolean (N, H, W) edge maps, an edge counting as
    found within ``tolerance`` pixels (Chebyshev distance): at 1 pixel the ``edges`` task's
    :func:`~lisa_control.data.tasks.edges.edge_scores` itself."""
    if tolerance == 1:
        return edge_scores(predicted, target)
    if tolerance < 0:
        raise ConfigError(f"--edge_tolerance must be >= 0, got {tolerance}.")
    grown_target, grown_predicted = target.copy(), predicted.copy()
    for _ in range(tolerance):
        grown_target, grown_predicted = dilate(grown_target), dilate(grown_predicted)
    axes = (-2, -1)
    n_pred, n_true = predicted.sum(axes), target.sum(axes)
    precision = np.where(
        n_pred > 0, (predicted & grown_target).sum(axes) / np.maximum(n_pred, 1), n_true == 0
    )
    recall = np.where(
        n_true > 0, (target & grown_predicted).sum(axes) / np.maximum(n_true, 1), n_pred == 0
    )
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return {"precision": precision.astype(float), "recall": recall.astype(float), "f1": f1}


def _luminance(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 3:
        return images
    return images[..., 0] * 0.299 + images[..., 1] * 0.587 + images[..., 2] * 0.114


class EdgeExtractor(Extractor):
    """Canny edges; given conditions count as edges where brighter than mid-grey."""

    name = "edges"
    metric_name = "edge_f1"

    def __init__(self, low: float = 100.0, high: float = 200.0, tolerance: int = 1):
        if not 0 <= low <= high:
            raise ConfigError(
                f"edge thresholds must satisfy 0 <= low <= high, got low={low}, high={high}."
            )
        if tolerance < 0:
            raise ConfigError(f"--edge_tolerance must be >= 0, got {tolerance}.")
        self.low, self.high, self.tolerance = float(low), float(high), int(tolerance)

    def extract(self, images: np.ndarray) -> np.ndarray:
        edges = canny(images, self.low, self.high)
        return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)

    def compare(self, extracted: np.ndarray, given: np.ndarray) -> dict[str, np.ndarray]:
        scores = tolerant_edge_scores(
            _luminance(extracted) > 127, _luminance(given) > 127, self.tolerance
        )
        return {f"edge_{k}": v for k, v in scores.items()}

    def settings(self) -> dict:
        return {"low_threshold": self.low, "high_threshold": self.high, "tolerance": self.tolerance}


# ----------------------------------------------------------------------------- controlnet_aux


def _resize_to(maps: list, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Annotator outputs (PIL or arrays, any size) as uint8 (N, H, W, 3) at ``size`` (w, h)."""
    from PIL import Image

    out = []
    for m in maps:
        image = m if isinstance(m, Image.Image) else Image.fromarray(np.asarray(m, np.uint8))
        image = image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.NEAREST if nearest else Image.BILINEAR)
        out.append(np.asarray(image))
    return np.stack(out)


def pose_iou(extracted: np.ndarray, given: np.ndarray, floor: float = 24.0) -> np.ndarray:
    """Per-image IoU of skeleton pixels: those whose brightest channel exceeds ``floor``.
    Two empty maps score 1."""
    a, b = extracted.max(-1) > floor, given.max(-1) > floor
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, (a & b).sum((-2, -1)) / np.maximum(union, 1), 1.0)


def depth_mae(extracted: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Per-image mean |d_extracted - d_given| with each depth map (luminance) scaled to [0, 1]
    by its own min and max (a constant map becomes 0)."""

    def normalized(maps):
        d = _luminance(maps)
        low = d.min((-2, -1), keepdims=True)
        span = d.max((-2, -1), keepdims=True) - low
        return np.where(span > 0, (d - low) / np.where(span > 0, span, 1), 0.0)

    return np.abs(normalized(extracted) - normalized(given)).mean((-2, -1))


def matched_region_iou(extracted: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Per image: every colour region of ``given`` matched with the colour region of
    ``extracted`` that has the highest IoU with it; the mean of these IoUs."""
    scores = []
    for ext, giv in zip(extracted, given):
        _, g_labels = np.unique(giv.reshape(-1, 3), axis=0, return_inverse=True)
        _, e_labels = np.unique(ext.reshape(-1, 3), axis=0, return_inverse=True)
        g_labels, e_labels = g_labels.ravel(), e_labels.ravel()
        joint = np.zeros((g_labels.max() + 1, e_labels.max() + 1))
        np.add.at(joint, (g_labels, e_labels), 1)
        union = joint.sum(1, keepdims=True) + joint.sum(0, keepdims=True) - joint
        scores.append(float((joint / np.maximum(union, 1)).max(1).mean()))
    return np.array(scores)


class AnnotatorExtractor(Extractor):
    """A ``controlnet_aux`` annotator, loaded with ``from_pretrained(weights, **load_kwargs)``
    (``default_weights`` when no weights are given)."""

    detector_class: ClassVar[str]
    default_weights: ClassVar[str] = "lllyasviel/Annotators"
    load_kwargs: ClassVar[dict] = {}
    nearest: ClassVar[bool] = False
    compare_fn: ClassVar[Callable]

    def __init__(self, weights: str | None = None):
        try:
            import controlnet_aux
        except ImportError:
            raise ModelError(
                f"--extractor {self.name} needs controlnet_aux: pip install controlnet_aux (and "
                "its weights locally)"
            ) from None
        self.weights = weights or self.default_weights
        try:
            detector = getattr(controlnet_aux, self.detector_class)
            self.detector = detector.from_pretrained(self.weights, **self.load_kwargs)
        except Exception as exc:  # every loader failure is about the weights given
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(
                f"cannot load the {self.name} annotator ({self.detector_class}) from "
                f"{self.weights!r}: {reason}; pass --extractor_weights DIR, a local copy of "
                f"{self.default_weights}"
            ) from None

    def extract(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        maps = [self.detector(Image.fromarray(image)) for image in images]
        return _resize_to(maps, (images.shape[2], images.shape[1]), self.nearest)

    def compare(self, extracted: np.ndarray, given: np.ndarray) -> dict[str, np.ndarray]:
        return {self.metric_name: type(self).compare_fn(extracted, given)}

    def settings(self) -> dict:
        return {"weights": str(self.weights), "annotator": self.detector_class}


class PoseExtractor(AnnotatorExtractor):
    name, metric_name, detector_class = "pose", "pose_iou", "OpenposeDetector"
    compare_fn = staticmethod(pose_iou)


class DepthExtractor(AnnotatorExtractor):
    name, metric_name, detector_class = "depth", "depth_mae", "MidasDetector"
    higher_is_better = False
    compare_fn = staticmethod(depth_mae)


class SegmentationExtractor(AnnotatorExtractor):
    name, metric_name, detector_class = "segmentation", "segmentation_miou", "SamDetector"
    default_weights = "ybelkada/segment-anything"
    load_kwargs = {"subfolder": "checkpoints"}
    nearest = True
    compare_fn = staticmethod(matched_region_iou)


EXTRACTORS: dict[str, type[Extractor]] = {
    cls.name: cls for cls in (EdgeExtractor, PoseExtractor, DepthExtractor, SegmentationExtractor)
}


def make_extractor(name: str, weights: str | None = None, **edge_settings) -> Extractor:
    """The extractor ``name``: ``edges`` with ``edge_settings`` (low, high, tolerance), the
    annotator ones from ``weights`` (default: the annotator's own hub repository)."""
    if name not in EXTRACTORS:
        raise ConfigError(f"unknown --extractor {name!r}; choose one of: {', '.join(EXTRACTORS)}.")
    cls = EXTRACTORS[name]
    if issubclass(cls, EdgeExtractor):
        return cls(**edge_settings)
    return cls(weights)
