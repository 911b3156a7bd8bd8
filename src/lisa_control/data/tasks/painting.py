"""Painting primitives shared by the procedural tasks: named colours, texture patterns and shape
masks, all drawn with numpy and PIL at the sample's resolution.

A *pattern* is an (H, W) float array in [0, 1]; :func:`fill` turns it into colours by mixing two
shades, so a task controls how far a texture's colours stray from its base colour (the edge and
segmentation metrics rely on those bounds).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Base colours for shapes, named for captions. Jittered by a few levels per sample.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 135, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 60),
    "teal": (30, 150, 150),
    "blue": (40, 80, 205),
    "purple": (130, 60, 175),
    "pink": (235, 130, 180),
    "brown": (120, 75, 40),
    "white": (242, 242, 242),
    "black": (25, 25, 25),
}

# Quiet colours for backgrounds.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (215, 200, 170),
    "pale blue": (170, 200, 225),
    "dark grey": (60, 60, 60),
    "cream": (240, 235, 215),
    "sage": (160, 180, 150),
}

SHAPE_KINDS = ("circle", "ellipse", "square", "rectangle", "triangle", "pentagon", "hexagon")
ASPECTS = (0.45, 0.55, 0.65, 0.75)  # of ellipses and rectangles; few, so outlines can be cached


@lru_cache(maxsize=16)
def pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs): float32 (H, W) arrays of pixel-centre coordinates, in pixels."""
    ys, xs = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


@lru_cache(maxsize=64)
def _interpolation_matrix(cells: int, resolution: int) -> np.ndarray:
    """(resolution, cells) weights of linear interpolation from ``cells`` knots spread over the
    canvas, so that upsampling a knot grid is two matrix products."""
    positions = np.linspace(0, cells - 1, resolution)
    left = np.clip(np.floor(positions).astype(int), 0, cells - 2)
    frac = positions - left
    weights = np.zeros((resolution, cells), dtype=np.float32)
    weights[np.arange(resolution), left] = 1 - frac
    weights[np.arange(resolution), left + 1] = frac
    return weights


def smooth_noise(
    rng: np.random.Generator, resolution: int, cells: int, channels: int = 1
) -> np.ndarray:
    """Value noise: a random ``cells`` x ``cells`` grid in [0, 1], bilinearly upsampled.

    Returns (H, W) for one channel, else (H, W, channels).
    """
    knots = rng.random((cells, cells, channels), dtype=np.float32)
    m = _interpolation_matrix(cells, resolution)
    rows = (m @ knots.reshape(cells, -1)).reshape(resolution, cells, channels)
    field = m @ rows  # (H, W, channels): broadcasts over rows
    return field[..., 0] if channels == 1 else field


def gradient(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A linear ramp from 0 to 1 across the canvas in a random direction."""
    ys, xs = pixel_grid(resolution)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    low, high = ramp.min(), ramp.max()
    return (ramp - low) / (high - low)


def stripes(
    rng: np.random.Generator, resolution: int, period: float, hard: bool = False
) -> np.ndarray:
    """Parallel stripes at a random angle; sinusoidal unless ``hard``."""
    ys, xs = pixel_grid(resolution)
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
    return (wave > 0).astype(np.float32) if hard else 0.5 + 0.5 * wave


def checks(rng: np.random.Generator, resolution: int, cell: int) -> np.ndarray:
    """An axis-aligned checkerboard with squares of ``cell`` pixels at a random offset."""
    ys, xs = pixel_grid(resolution)
    oy, ox = rng.integers(0, cell, size=2)
    return ((((ys + oy) // cell) + ((xs + ox) // cell)) % 2).astype(np.float32)


def dots(rng: np.random.Generator, resolution: int, period: int, radius: float) -> np.ndarray:
    """A square lattice of round dots (1 inside a dot, 0 between)."""
    ys, xs = pixel_grid(resolution)
    oy, ox = rng.uniform(0, period, size=2)
    dy = (ys + oy) % period - period / 2
    dx = (xs + ox) % period - period / 2
    return (dy * dy + dx * dx <= radius * radius).astype(np.float32)


def fill(pattern: np.ndarray, dark, light) -> np.ndarray:
    """Colours (H, W, 3) float32 that mix ``dark`` (pattern 0) and ``light`` (pattern 1)."""
    dark = np.asarray(dark, dtype=np.float32)
    light = np.asarray(light, dtype=np.float32)
    return dark + pattern[..., None] * (light - dark)


def jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    """``colour`` with each channel moved by up to ``amount`` levels, kept in 0..255."""
    shift = rng.uniform(-amount, amount, size=3)
    return np.clip(np.asarray(colour, dtype=np.float32) + shift, 0, 255)


def pick_distinct(
    rng: np.random.Generator,
    palette: dict[str, tuple[int, int, int]],
    count: int,
    avoid: list[np.ndarray] = (),
    min_distance: float = 110.0,
) -> list[str]:
    """Up to ``count`` palette names in random order whose colours lie at least ``min_distance``
    (Euclidean RGB) from each other and from every colour in ``avoid``."""
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], dtype=np.float32)
    taken = [np.asarray(c, dtype=np.float32) for c in avoid]
    chosen: list[str] = []
    for i in rng.permutation(len(names)):
        if all(((colours[i] - other) ** 2).sum() >= min_distance**2 for other in taken):
            chosen.append(names[i])
            taken.append(colours[i])
            if len(chosen) == count:
                break
    return chosen


@lru_cache(maxsize=None)
def _unit_outline(kind: str, aspect: float) -> np.ndarray:
    """Polygon vertices (N, 2) of a shape of radius 1 around the origin."""
    if kind in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
    if kind in ("square", "rectangle"):
        # 0.8: a square of half-width r looks bigger than a circle of radius r
        return 0.8 * np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]])
    sides = {"triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def shape_outline(kind: str, centre, radius: float, angle: float, aspect: float) -> np.ndarray:
    """Polygon vertices (N, 2) as (x, y) of a shape of the given kind, ``radius`` from its
    centre, turned by ``angle`` radians; ``aspect`` (one of :data:`ASPECTS`) squashes ellipses
    and rectangles."""
    squashed = kind in ("ellipse", "rectangle")
    local = _unit_outline(kind, aspect if squashed else 1.0)
    c, s = np.cos(angle), np.sin(angle)
    turn = np.array([[c, s], [-s, c]])  # rotation, transposed for row vectors
    return np.asarray(centre, dtype=np.float64) + radius * (local @ turn)


def polygon_mask(resolution: int, vertices: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of a filled polygon."""
    canvas = Image.new("L", (resolution, resolution), 0)
    ImageDraw.Draw(canvas).polygon(vertices.ravel().tolist(), fill=255)
    return np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(resolution, resolution) > 0


def choose(rng: np.random.Generator, options):
    """One element of a sequence (faster than ``rng.choice`` on short lists)."""
    return options[int(rng.integers(len(options)))]


def random_shape(
    rng: np.random.Generator, resolution: int, min_radius: float, max_radius: float
) -> tuple[str, np.ndarray]:
    """(kind, mask) of one random shape whose centre lies on the canvas."""
    kind = choose(rng, SHAPE_KINDS)
    radius = rng.uniform(min_radius, max_radius)
    centre = rng.uniform(0.15 * resolution, 0.85 * resolution, size=2)
    outline = shape_outline(kind, centre, radius, rng.uniform(0, np.pi), choose(rng, ASPECTS))
    return kind, polygon_mask(resolution, outline)


def a(noun_phrase: str) -> str:
    """The phrase with its indefinite article: 'a red circle', 'an orange square'."""
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


def enumerate_words(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def to_uint8(colours: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(colours), 0, 255).astype(np.uint8)
