"""Pose: a stick figure in random clothes and pose; the condition is its OpenPose-style skeleton.

Each of the 14 joints wears a small square marker in its own saturated colour (OpenPose's
keypoint colour for that joint). Everything else in the image is kept to a chroma
(max - min channel) of at most :data:`MAX_SCENE_CHROMA`, which puts every scene colour at least
``(255 - MAX_SCENE_CHROMA) / 2`` levels from every marker colour, so the markers can be found by
colour alone. That is what the metric does: PCK@0.2 of the markers found in a generated image.
A generated marker counts if its colour is nearer to its joint's than to any other joint's
colour (they are >= 85 levels apart) and within :data:`MARKER_TOLERANCE` of it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import painting
from .registry import register_task
from .base import ProceduralTask, TaskSample, check_batch, to_pixels

JOINTS = (
    "head", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
)  # fmt: skip
HEAD, NECK = 0, 1
ARMS = {"right": (2, 3, 4), "left": (5, 6, 7)}  # shoulder, elbow, wrist
LEGS = {"right": (8, 9, 10), "left": (11, 12, 13)}  # hip, knee, ankle

# OpenPose's keypoint colours (hues 20 degrees apart); also the markers' colours in the image.
JOINT_COLOURS = np.array(
    [
        [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0],
        [85, 255, 0], [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255],
        [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    ],
    dtype=np.float32,
)  # fmt: skip
# OpenPose's limbs in its drawing order; limb i takes keypoint colour i.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 0),
)  # fmt: skip
LIMB_INTENSITY = 0.6  # OpenPose dims limbs so that the joint dots stand out

MAX_SCENE_CHROMA = 120.0
# Mean colour distance within which a window can be a marker: short of the least distance of a
# scene colour to a marker colour (67.5, see the module docstring), and lenient with generators.
MARKER_TOLERANCE = 60.0
PCK_FRACTION = 0.2
MAX_POSE_TRIES = 20

CLOTHES = {
    "grey": (128, 128, 128), "white": (230, 230, 225), "black": (35, 35, 40),
    "navy": (45, 55, 105), "maroon": (115, 45, 55), "olive": (110, 110, 55),
    "beige": (200, 180, 140), "brown": (115, 80, 55), "teal": (50, 110, 110),
    "denim": (75, 95, 140), "khaki": (170, 160, 110), "rust": (160, 90, 60),
    "plum": (110, 70, 110),
}  # fmt: skip
SKIN = ((240, 205, 170), (225, 175, 130), (190, 140, 100), (140, 95, 65), (95, 65, 45))


def marker_size(resolution: int) -> int:
    """Side of a joint marker in pixels: 2 at 32x32, 3 at 64x64."""
    return max(2, round(3 * resolution / 64))


def limit_chroma(colours: np.ndarray, max_chroma: float = MAX_SCENE_CHROMA) -> np.ndarray:
    """Move colours (..., 3) towards their grey until ``max - min`` channel is <= max_chroma."""
    colours = np.asarray(colours, dtype=np.float32)
    grey = colours.mean(axis=-1, keepdims=True)
    chroma = colours.max(axis=-1, keepdims=True) - colours.min(axis=-1, keepdims=True)
    scale = np.minimum(1.0, max_chroma / np.maximum(chroma, 1e-6))
    return grey + (colours - grey) * scale


def _direction(side: float, degrees: float) -> np.ndarray:
    """Unit vector ``degrees`` away from straight down, turned outwards on ``side`` (-1 right,
    +1 left, in image coordinates with y down)."""
    a = np.radians(degrees)
    return np.array([side * np.sin(a), np.cos(a)])


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """Joint positions (14, 2) as (x, y) of an upright figure of height 1, neck at the origin."""
    joints = np.zeros((14, 2))
    joints[HEAD] = (0.0, -0.16)
    for side_name, side in (("right", -1.0), ("left", 1.0)):
        shoulder, elbow, wrist = ARMS[side_name]
        upper = rng.uniform(-15, 170)  # hanging down .. raised overhead
        joints[shoulder] = (side * 0.15, 0.03)
        joints[elbow] = joints[shoulder] + 0.16 * _direction(side, upper)
        joints[wrist] = joints[elbow] + 0.15 * _direction(side, upper + rng.uniform(-20, 130))
        hip, knee, ankle = LEGS[side_name]
        thigh = rng.uniform(-12, 45)
        joints[hip] = (side * 0.085, 0.36)
        joints[knee] = joints[hip] + 0.23 * _direction(side, thigh)
        joints[ankle] = joints[knee] + 0.23 * _direction(side, thigh + rng.uniform(-35, 25))
    return joints


def random_body_angle(rng: np.random.Generator) -> float:
    """Degrees the whole figure is turned: mostly a lean, sometimes anything (lying, handstand),
    so that where a joint is depends on the pose, not just on the canvas."""
    return rng.uniform(-25, 25) if rng.random() < 0.6 else rng.uniform(-180, 180)


def turn(points: np.ndarray, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    return points @ np.array([[c, s], [-s, c]])


class FigureStyle(NamedTuple):
    colours: dict[str, tuple[int, int, int]]  # shirt, trousers, skin
    limb_width: int
    head_radius: float
    shirt: str  # the clothes' names, for captions
    trousers: str


def figure_style(rng: np.random.Generator, height: float) -> FigureStyle:
    """How a figure ``height`` pixels tall is drawn: clothes and skin from their palettes, chroma
    limited so that the joint markers stay the most saturated colours in the image."""
    head_radius = max(1.5, 0.08 * height)
    limb_width = max(1, int(round(rng.uniform(0.05, 0.09) * height)))
    shirt, trousers = painting.choose(rng, list(CLOTHES)), painting.choose(rng, list(CLOTHES))
    colours = {
        "shirt": painting.jitter(rng, CLOTHES[shirt], 8),
        "trousers": painting.jitter(rng, CLOTHES[trousers], 8),
        "skin": painting.jitter(rng, SKIN[rng.integers(len(SKIN))], 8),
    }
    colours = {k: tuple(int(c) for c in limit_chroma(v).round()) for k, v in colours.items()}
    return FigureStyle(colours, limb_width, head_radius, shirt, trousers)


def markers_apart(joints: np.ndarray, size: int) -> bool:
    """Whether no two markers of ``size`` pixels centred on the joints would overlap."""
    corners = np.rint(joints - (size - 1) / 2)
    gap = np.abs(corners[:, None] - corners[None]).max(axis=-1)
    np.fill_diagonal(gap, size)
    return bool(gap.min() >= size)


def locate_markers(pixels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Find each joint's marker in images (B, H, W, 3) on the 0..255 scale.

    Every ``size`` x ``size`` window (a marker's footprint) gets, per joint colour, the mean over
    its pixels of their distance to that colour, and belongs to the joint whose colour is
    nearest. Joint j's marker is the window of j's with the least distance. Returns those
    windows' centres (B, 14, 2) as (x, y) and distances (B, 14), inf where no window is j's; a
    joint counts as detected where the distance is below :data:`MARKER_TOLERANCE`.

    Averaging distances, not colours, means that only a solid patch of the colour matches:
    scattered look-alike pixels (noise) do not, nor do two neighbouring markers whose mixed
    colour happens to be a third joint's.
    """
    b, h, w, _ = pixels.shape
    oh, ow = h - size + 1, w - size + 1
    per_pixel = np.empty((b, h, w, len(JOINTS)), dtype=np.float32)
    for j, colour in enumerate(JOINT_COLOURS):
        per_pixel[..., j] = np.sqrt(((pixels - colour) ** 2).sum(-1))
    window = np.zeros((b, oh, ow, len(JOINTS)), dtype=np.float32)
    for dy in range(size):
        for dx in range(size):
            window += per_pixel[:, dy : dy + oh, dx : dx + ow]
    window = window.reshape(b, oh * ow, len(JOINTS)) / (size * size)
    nearest = window.argmin(axis=-1)[..., None] == np.arange(len(JOINTS))  # (B, windows, 14)
    window = np.where(nearest, window, np.inf)
    best = window.argmin(axis=1)  # (B, 14)
    distances = np.take_along_axis(window, best[:, None], axis=1)[:, 0]
    centre = (size - 1) / 2
    positions = np.stack([best % ow + centre, best // ow + centre], axis=-1).astype(np.float64)
    return positions, distances


def pck(
    found: np.ndarray, distance: np.ndarray, truth: np.ndarray, fraction: float = PCK_FRACTION
) -> np.ndarray:
    """Per-joint correctness (B, 14): detected and within ``fraction`` x the diagonal of the
    true joints' bounding box of the true position."""
    extent = truth.max(axis=1) - truth.min(axis=1)  # (B, 2)
    tolerance = fraction * np.linalg.norm(extent, axis=-1)  # (B,)
    error = np.linalg.norm(found - truth, axis=-1)
    return (distance < MARKER_TOLERANCE) & (error <= tolerance[:, None])


@register_task
class PoseTask(ProceduralTask):
    name = "pose"
    metric_name = "pck"

    def __init__(self, resolution: int = 32):
        super().__init__(resolution)
        self.marker_size = marker_size(self.resolution)
        # figure height over canvas size; small figures vary more in where their joints are,
        # but at 32x32 one under half the canvas cannot keep its markers apart
        self.height_range = (0.5, 0.9) if self.resolution < 64 else (0.4, 0.85)

    # ----------------------------------------------------------------------------- rendering

    def render(self, rng: np.random.Generator) -> TaskSample:
        r = self.resolution
        m = self.marker_size
        # a pose whose markers overlap would hide a joint from the metric: draw another
        for _ in range(MAX_POSE_TRIES):
            upright = random_pose(rng)
            angle = random_body_angle(rng)
            shape = turn(upright, angle)
            span = (shape.max(0) - shape.min(0)).max()
            # shrink a figure whose markers would not all fit on the canvas
            height = min(rng.uniform(*self.height_range) * r, (r - 1 - 2 * m) / span)
            joints = shape * height
            low, high = joints.min(0) - m, joints.max(0) + m
            joints = joints + rng.uniform(-low, np.maximum(-low, r - 1 - high))  # where they fit
            if markers_apart(joints, m):
                break
        colours, limb_width, head_radius, shirt, trousers = figure_style(rng, height)

        canvas = Image.fromarray(painting.to_uint8(limit_chroma(self._background(rng))))
        self._draw_figure(ImageDraw.Draw(canvas), joints, colours, limb_width, head_radius)
        image = np.array(canvas)
        self._draw_markers(image, joints)

        caption = (
            f"a person in {painting.a(shirt)} shirt and {trousers} trousers"
            f"{self._posture(angle)}{self._gesture(upright)}"
        )
        return TaskSample(image, self._skeleton(joints), caption, {"joints": joints})

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        base_colour = painting.choose(rng, list(painting.BACKGROUND_COLOURS.values()))
        base = painting.jitter(rng, base_colour, 10)
        kind = rng.integers(3)
        if kind == 0:
            tint = painting.smooth_noise(rng, r, int(rng.integers(3, 6)), channels=3)
            return base + 50 * (tint - 0.5)
        if kind == 1:
            pattern = painting.stripes(rng, r, rng.uniform(0.12, 0.3) * r, hard=rng.random() < 0.5)
            return painting.fill(pattern, base - 20, base + 20)
        return painting.fill(painting.gradient(rng, r), base - 35, base + 35)

    def _draw_figure(self, draw, joints, colours, width, head_radius) -> None:
        def limb(a, b, colour, w):
            draw.line([tuple(joints[a]), tuple(joints[b])], fill=colour, width=w)
            for j in (a, b):  # round the joints
                x, y = joints[j]
                half = w / 2
                draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)

        for hip, knee, ankle in LEGS.values():
            limb(hip, knee, colours["trousers"], width + 1)
            limb(knee, ankle, colours["trousers"], width)
        torso = [joints[2], joints[5], joints[11], joints[8]]
        draw.polygon([tuple(p) for p in torso], fill=colours["shirt"])
        draw.line([tuple(joints[8]), tuple(joints[11])], fill=colours["trousers"], width=width)
        for shoulder, elbow, wrist in ARMS.values():
            limb(shoulder, elbow, colours["shirt"], width)
            limb(elbow, wrist, colours["skin"], max(1, width - 1))
        limb(NECK, HEAD, colours["skin"], max(1, width - 1))
        x, y = joints[HEAD]
        draw.ellipse(
            [x - head_radius, y - head_radius, x + head_radius, y + head_radius],
            fill=colours["skin"],
        )

    def _draw_markers(self, image: np.ndarray, joints: np.ndarray) -> None:
        m = self.marker_size
        corners = np.rint(joints - (m - 1) / 2).astype(int).clip(0, self.resolution - m)
        for (x, y), colour in zip(corners, JOINT_COLOURS.astype(np.uint8)):
            image[y : y + m, x : x + m] = colour

    def _skeleton(self, joints: np.ndarray) -> np.ndarray:
        """OpenPose-style condition: dimmed coloured limbs and joint dots on black."""
        r = self.resolution
        canvas = Image.new("RGB", (r, r))
        draw = ImageDraw.Draw(canvas)
        width = max(1, round(r / 32))
        for i, (a, b) in enumerate(LIMBS):
            colour = tuple(int(c) for c in (JOINT_COLOURS[i] * LIMB_INTENSITY).round())
            draw.line([tuple(joints[a]), tuple(joints[b])], fill=colour, width=width)
        radius = max(1.0, r / 32)
        for (x, y), colour in zip(joints, JOINT_COLOURS.astype(int)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(colour))
        return np.array(canvas)

    @staticmethod
    def _posture(angle: float) -> str:
        tilt = abs((angle + 180) % 360 - 180)
        if tilt > 135:
            return " upside down"
        return " lying down" if tilt > 45 else ""

    @staticmethod
    def _gesture(joints: np.ndarray) -> str:
        raised = [side for side, arm in ARMS.items() if joints[arm[2]][1] < joints[NECK][1]]
        if len(raised) == 2:
            return ", raising both arms"
        return f", raising the {raised[0]} arm" if raised else ""

    # ----------------------------------------------------------------------------- metrics

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        """``pck``: fraction of joints whose marker is found within 0.2 x the skeleton's
        bounding-box diagonal of its true position (PCK@0.2); ``detected``: fraction found at all;
        ``joint_error``: mean distance of the found markers from the truth, in diagonals."""
        pixels = to_pixels(generated)
        check_batch(pixels, samples)
        truth = np.stack([s.meta["joints"] for s in samples])
        found, distance = locate_markers(pixels, self.marker_size)
        correct = pck(found, distance, truth)
        detected = distance < MARKER_TOLERANCE
        diagonal = np.linalg.norm(truth.max(1) - truth.min(1), axis=-1)
        relative_error = np.linalg.norm(found - truth, axis=-1) / diagonal[:, None]
        return {
            "pck": float(correct.mean()),
            "detected": float(detected.mean()),
            "joint_error": float(relative_error[detected].mean()) if detected.any() else 1.0,
        }

    def realism(self, images: torch.Tensor) -> float:
        """Mean fraction of the 14 marker colours present as a solid marker-sized patch."""
        _, distance = locate_markers(to_pixels(images), self.marker_size)
        return float((distance < MARKER_TOLERANCE).mean())
