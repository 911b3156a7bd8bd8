"""Tasks over real images that ship in OS packages, for users who want more than procedural
shapes without downloading a dataset:

- Fashion-MNIST, from the Debian package ``dataset-fashion-mnist``
  (files in ``/usr/share/datasets/fashion-mnist``; or set ``LISA_FASHION_MNIST_DIR``);
- Google's emoji, 64x64 PNGs from the npm package ``emoji-datasource-google``
  (found in ``./node_modules``, ``~/node_modules`` or npm's global folder; or set
  ``LISA_EMOJI_DIR``).

Each task takes its condition and its metric from the procedural task of the same kind (edges,
segmentation, super-resolution). The files are looked for when a task is created, and a missing
package is a :class:`~lisa_control.core.errors.DataError` that says how to install it.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import ConfigError, DataError
from .tasks.base import ProceduralTask, TaskSample
from .tasks.edges import EdgeFidelity, edge_condition
from .tasks.segmentation import SegmentationFidelity
from .tasks.registry import register_task
from .tasks.super_resolution import SuperResolutionFidelity, low_resolution_condition

FASHION_MNIST_ENV = "LISA_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = (
    "T-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

EMOJI_ENV = "LISA_EMOJI_DIR"
EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_IMAGES = Path("img/google/64")  # inside the npm package
GREEN_SCREEN = (0, 255, 0)  # no Google emoji pixel comes within 70 levels of it
# a pixel half emoji, half screen lies about this far from the green, the same cut as the
# condition's alpha > 127
GREEN_SCREEN_TOLERANCE = 120.0


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); reinstall the dataset.") from e
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes; reinstall the dataset.")
    ndim = data[3]
    start = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) < start or len(data) - start != int(np.prod(shape)):
        raise DataError(f"{path} is truncated; reinstall the dataset.")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def _chosen_dir(data_dir, env: str, default):
    """(folder, how it was chosen) from the argument, else the environment, else ``default``."""
    if data_dir:
        return Path(data_dir), " (given as data_dir)"
    if os.environ.get(env):
        return Path(os.environ[env]), f" (from ${env})"
    return default, ""


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, split: str = "train"):
    """(images file, labels file) of a Fashion-MNIST split, from ``data_dir``, else
    ``$LISA_FASHION_MNIST_DIR``, else the Debian package's folder."""
    if split not in FASHION_MNIST_SPLITS:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    prefix = FASHION_MNIST_SPLITS[split]
    directory, origin = _chosen_dir(data_dir, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR)
    images = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DataError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {directory}{origin}. Install the "
            f"Debian package: `sudo apt-get install dataset-fashion-mnist` (it puts them in "
            f"{FASHION_MNIST_DEFAULT_DIR}), or set {FASHION_MNIST_ENV} to a folder that holds them."
        )
    return images, labels


@lru_cache(maxsize=4)
def load_fashion_mnist(images_file: Path, labels_file: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{images_file} and {labels_file} do not match; reinstall the dataset.")
    return images, labels


class FashionMnistImages:
    """Fashion-MNIST's 28x28 grey images, padded to 32x32 (on black, as they are drawn) and
    scaled to the task's resolution, as RGB."""

    def __init__(self, data_dir=None, split: str = "train"):
        self.files = find_fashion_mnist(data_dir, split)
        self.images, self.labels = load_fashion_mnist(*self.files)

    # DataLoader workers get the file names and read the arrays themselves, not a 47 MB pickle.
    def __getstate__(self) -> dict:
        return {"files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.files = state["files"]
        self.images, self.labels = load_fashion_mnist(*self.files)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        grey = Image.fromarray(self.images[index])
        inner = round(28 * resolution / 32)
        if inner != 28:
            grey = grey.resize((inner, inner), Image.BICUBIC)
        canvas = Image.new("L", (resolution, resolution))
        corner = (resolution - inner) // 2
        canvas.paste(grey, (corner, corner))
        rgb = np.repeat(np.asarray(canvas)[..., None], 3, axis=-1)
        name = FASHION_MNIST_CLASSES[self.labels[index]]
        return rgb, None, f"a grey photo of a {name} on black"


# ----------------------------------------------------------------------------- emoji


def _emoji_image_dir(candidate: Path) -> Path | None:
    """The PNG folder of the npm package if ``candidate`` is that folder, the package, or a
    folder with the package in its node_modules."""
    for images in (
        candidate,
        candidate / EMOJI_IMAGES,
        candidate / "node_modules" / EMOJI_PACKAGE / EMOJI_IMAGES,
    ):
        if images.is_dir() and any(images.glob("*.png")):
            return images
    return None


def emoji_search_path() -> list[Path]:
    """Where ``npm install emoji-datasource-google`` puts the package, locally or globally."""
    package = Path("node_modules") / EMOJI_PACKAGE
    return [
        Path.cwd() / package,
        Path.home() / package,
        Path("/usr/local/lib") / package,
        Path("/usr/lib") / package,
    ]


def find_emoji(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of 64x64 emoji PNGs, from ``data_dir``, else ``$LISA_EMOJI_DIR``, else the npm
    package's usual install locations."""
    given, origin = _chosen_dir(data_dir, EMOJI_ENV, None)
    candidates = [given] if given else emoji_search_path()
    for candidate in candidates:
        found = _emoji_image_dir(candidate)
        if found is not None:
            return found
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"emoji images not found (looked in {looked}{origin}). Install the npm package: run "
        f"`npm install {EMOJI_PACKAGE}` in the folder you start training from (it creates "
        f"./node_modules/{EMOJI_PACKAGE}), or `npm install -g {EMOJI_PACKAGE}`; or install it "
        f"anywhere and set {EMOJI_ENV}=<that folder>/node_modules/{EMOJI_PACKAGE}."
    )


@lru_cache(maxsize=4)
def emoji_catalogue(image_dir: Path) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """The PNG files in name order and each one's emoji name ('' where the package's emoji.json
    is not beside the images)."""
    files = tuple(sorted(image_dir.glob("*.png")))
    names: dict[str, str] = {}
    index = image_dir.parent.parent.parent / "emoji.json"
    if index.is_file():
        for entry in json.loads(index.read_text(encoding="utf-8")):
            name = str(entry.get("name") or entry.get("short_name") or "").lower()
            names[entry["image"]] = name
            for variation in (entry.get("skin_variations") or {}).values():
                names[variation["image"]] = name
    return files, tuple(names.get(f.name, "") for f in files)


class EmojiImages:
    """Google's emoji composited on a plain ``background`` and scaled to the task's resolution,
    with their alpha masks."""

    def __init__(self, data_dir=None, background=(255, 255, 255)):
        self.files, self.names = emoji_catalogue(find_emoji(data_dir))
        self.background = tuple(background)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray, str]:
        try:
            rgba = Image.open(self.files[index]).convert("RGBA")
        except OSError as e:
            raise DataError(
                f"cannot read {self.files[index]} ({e}); reinstall {EMOJI_PACKAGE}."
            ) from e
        # composite before scaling, so that the background, not black, bleeds into the border
        canvas = Image.new("RGBA", rgba.size, self.background + (255,))
        rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
        alpha = rgba.getchannel("A")
        if rgba.size != (resolution, resolution):
            rgb = rgb.resize((resolution, resolution), Image.BOX)
            alpha = alpha.resize((resolution, resolution), Image.BOX)
        name = self.names[index]
        return np.array(rgb), np.array(alpha), f"an emoji of {name}" if name else "an emoji"


# ----------------------------------------------------------------------------- tasks


class PackagedImageTask(ProceduralTask):
    """A task over a fixed image collection. ``sample(seed, i)`` is image ``order[i mod N]`` of
    a seeded shuffle of the collection, so a dataset of N items visits every image once;
    subclasses turn an image into a sample with :meth:`make_sample`."""

    def __init__(self, resolution: int, images):
        super().__init__(resolution)
        self.images = images
        self._order_seed: int | None = None
        self._order: np.ndarray | None = None

    def make_sample(self, image: np.ndarray, alpha: np.ndarray | None, caption: str) -> TaskSample:
        raise NotImplementedError

    def sample_of_image(self, index: int) -> TaskSample:
        image, alpha, caption = self.images.get(int(index), self.resolution)
        sample = self.make_sample(image, alpha, caption)
        sample.meta["source_index"] = int(index)
        return sample

    def render(self, rng: np.random.Generator) -> TaskSample:
        return self.sample_of_image(rng.integers(len(self.images)))

    def sample(self, seed: int, index: int) -> TaskSample:
        if seed < 0 or index < 0:
            raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}.")
        if self._order_seed != seed:
            self._order = np.random.default_rng(seed).permutation(len(self.images))
            self._order_seed = seed
        return self.sample_of_image(self._order[index % len(self.images)])


class FashionMnistTask(PackagedImageTask):
    def __init__(self, resolution: int = 32, data_dir=None, split: str = "train"):
        super().__init__(resolution, FashionMnistImages(data_dir, split))


class EmojiTask(PackagedImageTask):
    background = (255, 255, 255)

    def __init__(self, resolution: int = 32, data_dir=None):
        super().__init__(resolution, EmojiImages(data_dir, self.background))


class EdgeSamples:
    def make_sample(self, image, alpha, caption) -> TaskSample:
        return TaskSample(image, edge_condition(image), caption)


class LowResolutionSamples:
    def make_sample(self, image, alpha, caption) -> TaskSample:
        return TaskSample(image, low_resolution_condition(image), caption)


@register_task
class FashionMnistEdges(EdgeFidelity, EdgeSamples, FashionMnistTask):
    name = "fashion_mnist_edges"
    metric_name = "edge_f1"


@register_task
class FashionMnistSuperResolution(SuperResolutionFidelity, LowResolutionSamples, FashionMnistTask):
    name = "fashion_mnist_super_resolution"
    metric_name = "psnr_condition"


@register_task
class EmojiEdges(EdgeFidelity, EdgeSamples, EmojiTask):
    name = "emoji_edges"
    metric_name = "edge_f1"


@register_task
class EmojiSuperResolution(SuperResolutionFidelity, LowResolutionSamples, EmojiTask):
    name = "emoji_super_resolution"
    metric_name = "psnr_condition"


@register_task
class EmojiSegmentation(SegmentationFidelity, EmojiTask):
    """Emoji on a green screen; the condition is the emoji's alpha mask (white on black) and the
    metric's classifier calls a pixel background where it is close to the screen's green."""

    name = "emoji_segmentation"
    metric_name = "miou"
    num_classes = 2
    background = GREEN_SCREEN

    def make_sample(self, image, alpha, caption) -> TaskSample:
        labels = (alpha > 127).astype(np.int64)
        condition = np.repeat((labels * 255).astype(np.uint8)[..., None], 3, axis=-1)
        return TaskSample(image, condition, f"{caption} on a green screen", {"labels": labels})

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        distance = np.linalg.norm(pixels - np.asarray(GREEN_SCREEN, dtype=np.float32), axis=-1)
        return (distance > GREEN_SCREEN_TOLERANCE).astype(np.int64)
