"""From image files to training tensors: strict decoding, one documented conversion to RGB per
pixel mode, and the resize / crop / scale transforms of diffusers' ``train_controlnet.py``
(written with PIL, numpy and torch; no torchvision).

Conversion rules (``to_rgb``):

==========================  ===============================================================
mode                        becomes RGB by
==========================  ===============================================================
RGB                         nothing
L, 1                        replicating the gray level into R, G and B (``1`` is 0 or 255)
RGBA, LA, PA, RGBa, La      compositing over the role's background: white for training
P with transparency         images, black for conditions (see ``BACKGROUND``)
P without transparency      looking up the palette
I;16, I;16B, I;16L, I;16N   scaling 0..65535 to 0..255 (``round(v / 257)``)
I (32-bit integer)          as I;16 when every value is in 0..65535 (how older Pillow decodes
                            16-bit PNG); otherwise stretching min..max to 0..255
F (32-bit float)            ``round(255 * v)`` when every value is in [0, 1]; otherwise
                            stretching min..max to 0..255; NaN or Inf is refused
CMYK, YCbCr, HSV, RGBX      Pillow's ``convert("RGB")`` (no ICC colour management)
anything else (LAB, ...)    refused with a DataError
==========================  ===============================================================

A constant I or F image that needs stretching becomes black. EXIF orientation is applied, so each
file is used the way image viewers show it. Multi-frame files (GIF, APNG, TIFF) use the first frame.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ..core.errors import ConfigError, DataError

Role = Literal["image", "condition"]

# Transparent pixels must become *some* colour. A photo with a cut-out background is meant to be
# seen on a page, usually white. A control map (edges, scribbles, pose skeletons, segmentation)
# draws its signal on black, so transparent means "no signal" = 0.
BACKGROUND: dict[str, tuple[int, int, int]] = {"image": (255, 255, 255), "condition": (0, 0, 0)}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_GRAY_MODES = {"L", "1"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_PILLOW_CONVERTS = {"CMYK", "YCbCr", "HSV", "RGBX"}


# ----------------------------------------------------------------------------- reading files


def symlink_loop(path: str | os.PathLike) -> bool:
    """Whether following ``path`` (or a folder on its way) leads back to itself."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    except ValueError:  # a NUL character: no such file, and no loop
        return False
    return False


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be opened as an image file (without decoding it), or None.

    Cheap enough to run on every row of a dataset before training starts.
    """
    path = Path(path)
    if symlink_loop(path):
        return (
            "it is a symbolic link loop (following it leads back to itself); point the link at "
            "the image file"
        )
    if path.is_symlink() and not path.exists():
        return (
            f"it is a symlink to {os.readlink(path)}, which does not exist; fix or remove the link"
        )
    if not path.exists():
        return "it does not exist; check the path (and its upper/lower case)"
    if path.is_dir():
        return "it is a directory, not an image file; point to an image file inside it"
    if not os.access(path, os.R_OK):
        return "permission denied; make it readable (chmod a+r)"
    return None


# Geometry a training image may have for a square crop of side R: its shorter side at least
# R / MAX_UPSCALE (so it is never enlarged more than 8x) and its sides at most MAX_ASPECT to 1
# (so the crop keeps at least a quarter of it). Outside these it would train on a blur or on a
# sliver of the picture.
MAX_UPSCALE = 8
MAX_ASPECT = 4


def header_problem(path: str | os.PathLike) -> tuple[str | None, tuple[int, int] | None]:
    """(why ``path``'s header is not an image's, or None; its (width, height) when it is).

    Reads the header only (Pillow's ``open`` decodes no pixels), so a file cut short after its
    header passes here and is refused when it is decoded."""
    try:
        if os.path.getsize(path) == 0:
            return "it is empty (0 bytes); re-download or re-export it", None
        with _strict_decoding(), Image.open(path) as opened:
            return None, opened.size
    except Image.DecompressionBombError as err:
        return (
            f"it is too large for Pillow's decompression-bomb guard ({err}); downscale it",
            None,
        )
    except Image.UnidentifiedImageError:
        return (
            "Pillow does not recognise it as an image (corrupt or unsupported format); "
            "re-export it as PNG or JPEG",
            None,
        )
    except MemoryError:
        raise
    except Exception as err:  # anything else Pillow or the OS raises on the header
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = "truncated" if "truncated" in reason.lower() else "corrupt"
        return f"the file is {hint} ({reason}); re-download or re-export it", None


def size_problem(size: tuple[int, int], resolution: int) -> str | None:
    """Why an image of ``size`` (width, height) makes no training crop of side ``resolution``
    (see ``MAX_UPSCALE`` and ``MAX_ASPECT``), or None."""
    width, height = size
    short, long = min(width, height), max(width, height)
    if short <= 0:
        return f"it is empty ({width}x{height} pixels); remove it"
    if short * MAX_UPSCALE < resolution:
        return (
            f"it is {width}x{height} pixels, too small for --resolution {resolution}: its "
            f"shorter side would be enlarged {resolution / short:.0f}x (at most {MAX_UPSCALE}x is "
            f"accepted, i.e. >= {math.ceil(resolution / MAX_UPSCALE)} px); use a larger image "
            "or a lower --resolution"
        )
    if long > MAX_ASPECT * short:
        return (
            f"it is {width}x{height} pixels, {long / short:.0f}:1, and the square crop would keep "
            f"{100 * short / long:.2g}% of it (at most {MAX_ASPECT}:1 is accepted); crop it "
            "closer to square"
        )
    return None


@contextlib.contextmanager
def _strict_decoding():
    """Refuse truncated files even if some other code enabled Pillow's lenient global switch:
    a half-decoded image is padded with grey and would train silently on garbage."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(source, name: str) -> Image.Image:
    """Open and fully decode ``source`` (a path or a binary file object); any failure of Pillow
    becomes a DataError naming ``name``. Opening is lazy in Pillow, so ``load()`` is forced here,
    inside the guard, instead of at the first pixel access somewhere in a DataLoader worker."""
    try:
        # The with-block closes the file also for multi-frame formats, which Pillow keeps open
        # after load(); a long run would otherwise run out of file handles.
        with _strict_decoding(), Image.open(source) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image is opened:
                image = opened.copy()
    except Image.DecompressionBombError as err:
        raise DataError(
            f"cannot read image {name}: it is too large for Pillow's decompression-bomb guard "
            f"({err}); downscale it before training"
        ) from err
    except FileNotFoundError as err:
        raise DataError(f"cannot read image {name}: it does not exist; check the path") from err
    except PermissionError as err:
        raise DataError(
            f"cannot read image {name}: permission denied; make it readable (chmod a+r)"
        ) from err
    except IsADirectoryError as err:
        raise DataError(
            f"cannot read image {name}: it is a directory, not an image file; point to a file"
        ) from err
    except Image.UnidentifiedImageError as err:
        raise DataError(
            f"cannot read image {name}: Pillow does not recognise it as an image (corrupt or "
            "unsupported format); re-export it as PNG or JPEG"
        ) from err
    except MemoryError:
        raise
    except Exception as err:  # anything Pillow raises while decoding is bad data
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = "truncated" if "truncated" in reason.lower() else "corrupt"
        raise DataError(
            f"cannot read image {name}: the file is {hint} ({reason}); re-download or re-export it"
        ) from err
    return image


def load_image(path: str | os.PathLike, *, role: Role = "condition") -> Image.Image:
    """Read an image file, fully decoded, as an RGB PIL image (see the module's table).

    ``role`` picks the background that transparency is composited on. It defaults to
    ``"condition"`` because outside training (sampling, validation) the library only loads
    condition images. Every failure is a DataError naming the file and the fix.
    """
    problem = file_problem(path)
    if problem:
        raise DataError(f"cannot read image {path}: {problem}")
    return to_rgb(_decode(path, str(path)), path=str(path), role=role)


def load_image_bytes(data: bytes, *, name: str, role: Role = "condition") -> Image.Image:
    """``load_image`` for encoded bytes held in memory (e.g. a Hugging Face dataset cell)."""
    import io

    return to_rgb(_decode(io.BytesIO(data), name), path=name, role=role)


# ----------------------------------------------------------------------------- pixel modes


def _check_role(role: str) -> None:
    if role not in BACKGROUND:
        raise ConfigError(f"role must be 'image' or 'condition', got {role!r}.")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _gray_to_rgb(levels: np.ndarray) -> Image.Image:
    """float gray levels in 0..255 -> RGB by replication."""
    gray = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _wide_gray_levels(image: Image.Image, path: str) -> np.ndarray:
    """Gray levels 0..255 (float) of a 16-bit, 32-bit integer or float image."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        return values / 257.0
    if not np.isfinite(values).all():
        raise DataError(
            f"image {path} (mode {image.mode}) contains NaN or Inf values; replace them (e.g. "
            "with 0) and save it again"
        )
    if image.mode == "I":
        in_16_bit_range = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        return values / 257.0 if in_16_bit_range else _stretch(values)
    in_unit_range = values.size == 0 or (values.min() >= 0 and values.max() <= 1)
    return values * 255.0 if in_unit_range else _stretch(values)


def to_rgb(image: Image.Image, *, path: str = "<image>", role: Role = "condition") -> Image.Image:
    """Convert a decoded PIL image of any supported mode to RGB (rules in the module's table).

    ``path`` only names the image in error messages.
    """
    _check_role(role)
    if image.width == 0 or image.height == 0:
        raise DataError(f"image {path} is empty ({image.width}x{image.height} pixels); remove it")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite(image, BACKGROUND[role])
    if mode in _GRAY_MODES or mode == "P":
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _gray_to_rgb(_wide_gray_levels(image, path))
    if mode in _PILLOW_CONVERTS:
        return image.convert("RGB")
    raise DataError(
        f"image {path} has pixel mode {mode}, which lisa-control does not convert; save it as "
        "RGB, RGBA or grayscale PNG/JPEG"
    )


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An RGB image as a ``channels``-channel one: 3 keeps RGB, 1 takes the luminance
    (ITU-R 601-2, Pillow's ``convert("L")``), which gives back a gray file's own levels."""
    if channels == 3:
        return image if image.mode == "RGB" else image.convert("RGB")
    if channels == 1:
        return image.convert("L")
    raise ConfigError(
        f"condition_channels must be 1 (gray conditions such as depth or edges) or 3 (colour), "
        f"got {channels!r}; use condition_channels=1 or 3"
    )


# ----------------------------------------------------------------------------- geometry


def check_resolution(resolution, multiple: int = 8) -> int:
    """``resolution`` as an int, or a ConfigError: it must be positive and a multiple of
    ``multiple`` (the VAE's down-sampling times the network's, so latents tile exactly)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"the resolution multiple must be a positive integer, got {multiple!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ConfigError(
            f"--resolution must be a whole number of pixels, got {resolution!r}; e.g. "
            "--resolution 512"
        )
    resolution = int(resolution)
    if resolution <= 0:
        raise ConfigError(f"--resolution must be positive, got {resolution}; e.g. --resolution 512")
    if resolution % multiple:
        lower = max(multiple, resolution - resolution % multiple)
        raise ConfigError(
            f"--resolution {resolution} is not divisible by {multiple}; use a multiple of "
            f"{multiple}, e.g. --resolution {lower} or --resolution {lower + multiple}"
        )
    return resolution


def shorter_side_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resolution``; the longer side is
    truncated like torchvision's ``Resize(int)``, which diffusers' script uses."""
    width, height = size
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def same_aspect(size_a: tuple[int, int], size_b: tuple[int, int], slack: float = 1.0) -> bool:
    """Whether one size is a rescaled copy of the other, each side allowed ``slack`` pixels of
    rounding (tools truncate or round when they resize). Checked both ways round, so it does not
    matter which of the two files was made from the other."""

    def scaled_from(small, large) -> bool:
        (w, h), (big_w, big_h) = small, large
        low = max((w - slack) / big_w, (h - slack) / big_h)
        high = min((w + slack) / big_w, (h + slack) / big_h)
        return low <= high

    return scaled_from(size_a, size_b) or scaled_from(size_b, size_a)


def crop_box(
    size: tuple[int, int], resolution: int, rng: np.random.Generator | None = None
) -> tuple[int, int, int, int]:
    """A ``resolution`` square inside ``size``: centred (rounded like torchvision's CenterCrop),
    or uniformly placed when ``rng`` is given."""
    width, height = size
    if rng is None:
        left = int(round((width - resolution) / 2.0))
        top = int(round((height - resolution) / 2.0))
    else:
        left = int(rng.integers(0, width - resolution + 1))
        top = int(rng.integers(0, height - resolution + 1))
    return left, top, left + resolution, top + resolution


# ----------------------------------------------------------------------------- tensors


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL L or RGB image as a float (C, H, W) tensor in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def pair_to_tensors(
    image: Image.Image,
    condition: Image.Image,
    resolution: int,
    *,
    channels: int = 3,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image and its RGB condition as ``(pixel_values, conditioning_pixel_values)``.

    Both are resized to the *image's* shorter-side size (bilinear) and cut with the *same* crop
    box, so the control stays aligned with the picture pixel for pixel; resizing each on its own
    could differ by a pixel when their sizes differ. ``pixel_values`` is (3, R, R) in [-1, 1]
    (diffusers' ``Normalize([0.5], [0.5])``), ``conditioning_pixel_values`` is
    (``channels``, R, R) in [0, 1], not normalized, as in diffusers. The caller checks
    ``same_aspect`` first. ``rng`` given: random crop; otherwise centre crop.
    """
    target = shorter_side_size(image.size, resolution)
    box = crop_box(target, resolution, rng)
    image = image.resize(target, Image.BILINEAR).crop(box)
    condition = to_channels(condition.resize(target, Image.BILINEAR).crop(box), channels)
    return _as_tensor(image) * 2.0 - 1.0, _as_tensor(condition)


def to_image_tensor(
    image: Image.Image, resolution: int, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """One RGB training image as (3, R, R) in [-1, 1]: shorter side to R, centre crop (a random
    one when ``rng`` is given)."""
    target = shorter_side_size(image.size, resolution)
    square = image.resize(target, Image.BILINEAR).crop(crop_box(target, resolution, rng))
    return _as_tensor(to_channels(square, 3)) * 2.0 - 1.0


def to_condition_tensor(image: Image.Image, resolution: int, channels: int = 3) -> torch.Tensor:
    """One RGB condition image as (channels, R, R) in [0, 1]: shorter side to R, centre crop."""
    target = shorter_side_size(image.size, resolution)
    square = image.resize(target, Image.BILINEAR).crop(crop_box(target, resolution))
    return _as_tensor(to_channels(square, channels))
