"""The training data pipeline (data/images.py, data/folder.py): bad inputs end in one-line
LisaErrors that name the culprit and the fix, odd pixel modes are converted by the documented
rules, and whatever hypothesis writes into a folder either trains or fails with our own error."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from lisa_control.data.folder import ControlDataset
from lisa_control.data.images import (
    check_resolution,
    load_image,
    same_aspect,
    to_channels,
    to_condition_tensor,
    to_rgb,
)
from lisa_control.core.errors import ConfigError, DataError, LisaError

RESOLUTION = 16
IMAGE_SIZE = (24, 16)  # (width, height): not square, so resizing and cropping both matter


# ----------------------------------------------------------------------------- folder helpers


def _noise(size, channels=3, seed=0) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def write_metadata(folder: Path, rows) -> None:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))


def make_folder(folder: Path, n: int = 1, size=IMAGE_SIZE) -> Path:
    """n RGB pairs img{k}.png / cond{k}.png with captions 'item k'."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        Image.fromarray(_noise(size, seed=k)).save(folder / f"img{k}.png")
        Image.fromarray(_noise(size, seed=100 + k)).save(folder / f"cond{k}.png")
        rows.append(
            {"image": f"img{k}.png", "conditioning_image": f"cond{k}.png", "text": f"item {k}"}
        )
    write_metadata(folder, rows)
    return folder


def set_row(folder: Path, **changes) -> None:
    """Change keys of the first metadata row."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0].update(changes)
    write_metadata(folder, rows)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def read_first_item(folder: Path, **kwargs) -> dict:
    """Build the dataset and read item 0, the two moments an error may surface."""
    return ControlDataset(folder, resolution=kwargs.pop("resolution", RESOLUTION), **kwargs)[0]


# ----------------------------------------------------------------------------- bad inputs

# Each breaker damages a fresh one-row folder and returns ControlDataset keyword arguments (or
# the source to pass instead of the folder, under "source").


def _corrupt_bytes(folder):
    (folder / "img0.png").write_bytes(b"this is not a PNG at all" * 10)
    return {}


def _truncated(fmt, name):
    def breaker(folder):
        data = encoded(Image.fromarray(_noise(IMAGE_SIZE)), fmt)
        (folder / name).write_bytes(data[: len(data) // 2])
        set_row(folder, image=name)
        return {}

    return breaker


def _directory_for_file(folder):
    (folder / "img0.png").unlink()
    (folder / "img0.png").mkdir()
    return {}


def _broken_symlink(folder):
    (folder / "img0.png").unlink()
    (folder / "img0.png").symlink_to(folder / "gone.png")
    return {}


def _unreadable(folder):
    (folder / "img0.png").chmod(0)
    return {}


def _missing_file(folder):
    (folder / "cond0.png").unlink()
    return {}


def _aspect_mismatch(folder):
    Image.fromarray(_noise((16, 16))).save(folder / "cond0.png")
    return {}


def _caption(value):
    def breaker(folder):
        set_row(folder, text=value)
        return {}

    return breaker


def _metadata(text):
    def breaker(folder):
        (folder / "metadata.jsonl").write_text(text)
        return {}

    return breaker


def _second_line_lacks_caption(folder):
    make_folder(folder, n=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    del rows[1]["text"]
    write_metadata(folder, rows)
    return {}


def _no_metadata(folder):
    (folder / "metadata.jsonl").unlink()
    return {}


def _nan_float_image(folder):
    values = np.full((IMAGE_SIZE[1], IMAGE_SIZE[0]), np.nan, dtype=np.float32)
    Image.fromarray(values).save(folder / "img0.tif")
    set_row(folder, image="img0.tif")
    return {}


def _hub_name_without_datasets(folder):
    return {"source": "someone/some-controlnet-dataset", "_hide_datasets": True}


def _kwargs(**kwargs):
    return lambda folder: kwargs


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

BAD_INPUTS = [
    # (id, breaker, error type, words the one-line message must contain: culprit and fix)
    ("corrupt-image-bytes", _corrupt_bytes, DataError, ["img0.png", "line 1", "re-export"]),
    ("truncated-png", _truncated("PNG", "cut.png"), DataError, ["cut.png", "truncated", "re-"]),
    ("truncated-jpeg", _truncated("JPEG", "cut.jpg"), DataError, ["cut.jpg", "truncated", "re-"]),
    (
        "directory-instead-of-file",
        _directory_for_file,
        DataError,
        ["img0.png", "directory", "point to an image file"],
    ),
    ("broken-symlink", _broken_symlink, DataError, ["img0.png", "gone.png", "fix or remove"]),
    pytest.param(
        "unreadable-file",
        _unreadable,
        DataError,
        ["img0.png", "chmod"],
        marks=pytest.mark.skipif(IS_ROOT, reason="root reads files chmod 000"),
        id="unreadable-file",
    ),
    (
        "missing-condition-file",
        _missing_file,
        DataError,
        ["cond0.png", "does not exist", "check the path"],
    ),
    (
        "aspect-mismatch",
        _aspect_mismatch,
        DataError,
        ["img0.png", "cond0.png", "24x16", "16x16", "aspect ratio", "make the condition"],
    ),
    (
        "missing-caption-column",
        _kwargs(caption_column="prompt"),
        DataError,
        ["'prompt'", "image, conditioning_image, text", "--caption_column text"],
    ),
    (
        "missing-condition-column",
        _kwargs(conditioning_image_column="conditioning_imgae"),
        DataError,
        ["'conditioning_imgae'", "--conditioning_image_column conditioning_image"],
    ),
    ("row-lacks-caption", _second_line_lacks_caption, DataError, ["line 2", "'text'", "add it"]),
    ("empty-dataset", _metadata(""), DataError, ["metadata.jsonl", "no rows", "add one JSON"]),
    ("caption-int", _caption(5), DataError, ["line 1", "'text'", "(int)", "as a string"]),
    ("caption-none", _caption(None), DataError, ["line 1", "'text'", "null", 'write ""']),
    ("caption-dict", _caption({"en": "a car"}), DataError, ["'text'", "(dict)", "as a string"]),
    ("caption-empty-list", _caption([]), DataError, ["'text'", "as a string"]),
    (
        "image-path-not-text",
        lambda f: set_row(f, image=7) or {},
        DataError,
        ["line 1", "'image'", "not a file path", "relative to the folder"],
    ),
    (
        "malformed-metadata-line",
        _metadata(
            '{"image": "img0.png", "conditioning_image": "cond0.png", "text": "a"}\n{"image": '
        ),
        DataError,
        ["line 2", "metadata.jsonl", "not valid JSON", "one JSON object per line"],
    ),
    (
        "metadata-line-not-object",
        _metadata('["img0.png", "cond0.png", "a"]\n'),
        DataError,
        ["line 1", "not an object", '"conditioning_image"'],
    ),
    (
        "metadata-not-utf8",
        lambda f: (f / "metadata.jsonl").write_bytes(b"\xff\xfe\x00{") and {},
        DataError,
        ["metadata.jsonl", "UTF-8"],
    ),
    (
        "no-metadata-file",
        _no_metadata,
        DataError,
        ["metadata.jsonl", "one JSON object per line", '"conditioning_image": "conditions/0.png"'],
    ),
    (
        "folder-missing",
        lambda f: {"source": f / "nope"},
        DataError,
        ["nope", "does not exist", "--train_data_dir"],
    ),
    (
        "source-is-a-file",
        lambda f: {"source": f / "metadata.jsonl"},
        DataError,
        ["metadata.jsonl", "is a file", "pass the folder"],
    ),
    ("float-image-with-nan", _nan_float_image, DataError, ["img0.tif", "NaN", "replace them"]),
    (
        "hub-name-without-datasets",
        _hub_name_without_datasets,
        DataError,
        ["someone/some-controlnet-dataset", "pip install datasets"],
    ),
    (
        "condition-channels-2",
        _kwargs(condition_channels=2),
        ConfigError,
        ["condition_channels", "got 2", "1 or 3"],
    ),
    (
        "resolution-not-divisible",
        _kwargs(resolution=12),
        ConfigError,
        ["--resolution 12", "divisible by 8", "--resolution 16"],
    ),
    (
        "resolution-not-divisible-by-factor",
        _kwargs(resolution=24, resolution_multiple=16),
        ConfigError,
        ["--resolution 24", "divisible by 16", "--resolution 32"],
    ),
    ("resolution-zero", _kwargs(resolution=0), ConfigError, ["--resolution", "positive"]),
    ("resolution-not-integer", _kwargs(resolution=15.5), ConfigError, ["15.5", "whole number"]),
    (
        "proportion-empty-prompts-above-one",
        _kwargs(proportion_empty_prompts=1.5),
        ConfigError,
        ["--proportion_empty_prompts", "1.5", "[0, 1]"],
    ),
    ("max-samples-zero", _kwargs(max_samples=0), ConfigError, ["--max_train_samples", "positive"]),
]


def _case_id(case):
    return getattr(case, "id", None) or case[0]


@pytest.mark.parametrize(
    "case_id,breaker,error_type,words", BAD_INPUTS, ids=[_case_id(c) for c in BAD_INPUTS]
)
def test_bad_input_is_our_error_naming_culprit_and_fix(
    tmp_path, monkeypatch, case_id, breaker, error_type, words
):
    folder = make_folder(tmp_path / "data")
    kwargs = breaker(folder) or {}
    source = kwargs.pop("source", folder)
    if kwargs.pop("_hide_datasets", False):
        monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LisaError) as caught:
        ControlDataset(source, resolution=kwargs.pop("resolution", RESOLUTION), **kwargs)[0]
    message = str(caught.value)
    assert isinstance(caught.value, error_type), (type(caught.value), message)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)


# ----------------------------------------------------------------------------- conversions


def _gray(values, size=IMAGE_SIZE):
    return np.full((size[1], size[0]), values)


def _palette_with_transparency():
    image = Image.fromarray(_gray(200).astype(np.uint8)).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))  # every pixel uses this entry
    return image, {"transparency": image.getpixel((0, 0))}


def _rgba_transparent():
    return Image.fromarray(np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 4), np.uint8)), {}


def _la_transparent():
    return Image.fromarray(np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 2), np.uint8)), {}


def _cmyk_white():
    return Image.new("CMYK", IMAGE_SIZE, (0, 0, 0, 0)), {}


WHITE, BLACK = 1.0, -1.0  # in pixel_values' [-1, 1]

CONVERSIONS = [
    # (id, image factory -> (PIL image, save params), format, pixel_values expected everywhere,
    #  conditioning_pixel_values expected when the same file is the condition)
    ("rgba-transparent", _rgba_transparent, "PNG", WHITE, 0.0),
    ("la-transparent", _la_transparent, "PNG", WHITE, 0.0),
    ("palette-transparent", _palette_with_transparency, "PNG", WHITE, 0.0),
    ("palette-opaque", lambda: (Image.new("P", IMAGE_SIZE, 0), {}), "PNG", BLACK, 0.0),
    ("grayscale-l", lambda: (Image.fromarray(_gray(255).astype(np.uint8)), {}), "PNG", WHITE, 1),
    ("bilevel-1", lambda: (Image.new("1", IMAGE_SIZE, 1), {}), "PNG", WHITE, 1.0),
    (
        "sixteen-bit-i16",
        lambda: (Image.fromarray(_gray(65535).astype(np.uint16)), {}),
        "PNG",
        WHITE,
        1.0,
    ),
    (
        "sixteen-bit-i16-midgray",
        lambda: (Image.fromarray(_gray(257 * 51).astype(np.uint16)), {}),
        "TIFF",
        51 / 127.5 - 1,
        51 / 255,
    ),
    (
        "thirty-two-bit-i",
        lambda: (Image.fromarray(_gray(65535).astype(np.int32)), {}),
        "TIFF",
        WHITE,
        1.0,
    ),
    (
        "float-f-unit-range",
        lambda: (Image.fromarray(_gray(1.0).astype(np.float32)), {}),
        "TIFF",
        WHITE,
        1.0,
    ),
    (
        "float-f-constant-out-of-range",
        lambda: (Image.fromarray(_gray(7.5).astype(np.float32)), {}),
        "TIFF",
        BLACK,
        0.0,
    ),
    ("cmyk-jpeg", _cmyk_white, "JPEG", WHITE, 1.0),
    ("cmyk-tiff", _cmyk_white, "TIFF", WHITE, 1.0),
]


@pytest.mark.parametrize(
    "factory,fmt,image_value,condition_value",
    [c[1:] for c in CONVERSIONS],
    ids=[c[0] for c in CONVERSIONS],
)
def test_odd_pixel_modes_are_converted(tmp_path, factory, fmt, image_value, condition_value):
    folder = make_folder(tmp_path / "data")
    image, params = factory()
    name = f"odd.{fmt.lower()}"
    (folder / name).write_bytes(encoded(image, fmt, **params))
    set_row(folder, image=name, conditioning_image=name)
    for channels in (3, 1):
        item = read_first_item(folder, condition_channels=channels)
        pixels, condition = item["pixel_values"], item["conditioning_pixel_values"]
        assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
        assert condition.shape == (channels, RESOLUTION, RESOLUTION)
        # JPEG's colour conversion may be off by a level or two.
        torch.testing.assert_close(pixels, torch.full_like(pixels, image_value), atol=0.02, rtol=0)
        torch.testing.assert_close(
            condition, torch.full_like(condition, condition_value), atol=0.01, rtol=0
        )


def test_stretched_modes_span_the_full_range():
    ramp = np.linspace(-3.0, 40.0, 24 * 16, dtype=np.float32).reshape(16, 24)
    for image in (Image.fromarray(ramp), Image.fromarray((ramp * 1e6).astype(np.int32))):
        levels = np.asarray(to_rgb(image, role="image"))
        assert levels.min() == 0 and levels.max() == 255, image.mode
        assert (levels[..., 0] == levels[..., 2]).all()


def test_gray_condition_keeps_its_levels_with_one_channel():
    gray = _noise(IMAGE_SIZE, channels=1)[..., 0]
    rgb = to_rgb(Image.fromarray(gray))
    assert np.array_equal(np.asarray(to_channels(rgb, 1)), gray)
    with pytest.raises(ConfigError, match="1 or 3"):
        to_channels(rgb, 4)


def test_truncated_file_is_refused_even_if_pillow_was_told_to_be_lenient(tmp_path, monkeypatch):
    data = encoded(Image.fromarray(_noise((32, 32))), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="truncated"):
        load_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


def test_aspect_rule_allows_a_pixel_of_rounding():
    assert same_aspect((1000, 667), (500, 333))  # a halved copy, rounded down
    assert same_aspect((333, 500), (1000, 1500))  # either way round
    assert not same_aspect((24, 16), (16, 16))
    assert not same_aspect((96, 64), (64, 64))


def test_resolution_check_and_condition_tensor():
    assert check_resolution(512) == 512
    assert check_resolution(48, multiple=16) == 48
    condition = to_condition_tensor(Image.fromarray(_noise((40, 20))), 16)
    assert condition.shape == (3, 16, 16) and 0 <= condition.min() <= condition.max() <= 1


def test_condition_stays_aligned_with_its_image_under_any_crop(tmp_path):
    """A condition saved at half size is resized and cropped exactly like its image."""
    folder = make_folder(tmp_path / "data")
    x, y = np.meshgrid(np.linspace(0, 255, 96), np.linspace(0, 255, 40))
    smooth = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)  # 96x40: wide, random x-crop
    Image.fromarray(smooth).save(folder / "img0.png")
    Image.fromarray(smooth).resize((48, 20), Image.BILINEAR).save(folder / "cond0.png")
    crops = set()
    for seed in range(4):
        for random_crop in (False, True):
            item = read_first_item(folder, random_crop=random_crop, seed=seed)
            as_condition = (item["pixel_values"] + 1) / 2
            assert (item["conditioning_pixel_values"] - as_condition).abs().max() < 0.05
            crops.add(round(float(as_condition[0, 0, 0]), 3))  # red = x: the crop's left edge
    assert len(crops) > 2  # random crops do move


# ----------------------------------------------------------------------------- captions, subsets


def test_empty_prompts_and_caption_lists_are_seeded_per_index(tmp_path):
    folder = make_folder(tmp_path / "data", n=1)
    row = json.loads((folder / "metadata.jsonl").read_text())
    rows = [dict(row, text=[f"a{k}", f"b{k}", f"c{k}"]) for k in range(40)]
    write_metadata(folder, rows)

    def captions(**kwargs):
        dataset = ControlDataset(folder, resolution=RESOLUTION, **kwargs)
        return [dataset[i]["caption"] for i in range(len(dataset))]

    half = captions(proportion_empty_prompts=0.5, seed=3)
    assert half == captions(proportion_empty_prompts=0.5, seed=3)  # reproducible (resume)
    assert half != captions(proportion_empty_prompts=0.5, seed=4)
    assert 5 < half.count("") < 35
    assert all(c in ("", f"a{k}", f"b{k}", f"c{k}") for k, c in enumerate(half))
    assert len({c[0] for c in half if c}) > 1  # list captions: not always the first
    assert captions(proportion_empty_prompts=1.0) == [""] * 40
    assert "" not in captions(proportion_empty_prompts=0.0)
    assert captions(caption_column=None) == [""] * 40


def test_max_samples_takes_a_seeded_subset_and_validate_lists_every_problem(tmp_path):
    folder = make_folder(tmp_path / "data", n=6)
    subset = ControlDataset(folder, resolution=RESOLUTION, max_samples=3, seed=1)
    assert len(subset) == 3
    assert [subset[i]["index"] for i in range(3)] == [0, 1, 2]
    assert subset.validate() == 3
    for name in ("img2.png", "img4.png"):  # cut after the header, which is checked at build
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    dataset = ControlDataset(folder, resolution=RESOLUTION)  # decoding is lazy: builds fine
    assert dataset.validate(max_items=2) == 2
    with pytest.raises(DataError) as caught:
        dataset.validate()
    message = str(caught.value)
    assert message.startswith("2 of 6 checked items cannot be used")
    assert "img2.png" in message and "img4.png" in message and len(message.splitlines()) == 1


# ----------------------------------------------------------------------------- property test

MODES = ["L", "LA", "RGB", "RGBA", "P", "I;16", "I", "F", "CMYK", "1"]
FORMATS = {
    "1": ["PNG", "TIFF", "BMP"],
    "L": ["PNG", "JPEG", "TIFF", "BMP"],
    "LA": ["PNG", "TIFF"],
    "RGB": ["PNG", "JPEG", "TIFF", "BMP"],
    "RGBA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "CMYK": ["JPEG", "TIFF"],
}


def _random_image(mode: str, size, rng: np.random.Generator) -> Image.Image:
    width, height = size
    shape = (height, width)
    if mode == "1":
        return Image.fromarray(rng.random(shape) < 0.5)
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        channels = len(mode)
        data = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
        if mode == "CMYK":
            return Image.frombytes("CMYK", size, data.tobytes())
        return Image.fromarray(data[..., 0] if channels == 1 else data)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).quantize(8)
        if rng.random() < 0.5:
            image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, shape, dtype=np.int32))
    scale = float(rng.choice([1.0, 1e-3, 1e6]))
    return Image.fromarray((rng.standard_normal(shape) * scale).astype(np.float32))


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(MODES))
    return mode, draw(st.sampled_from(FORMATS[mode]))


sizes = st.tuples(st.integers(1, 96), st.integers(1, 96))
captions = st.one_of(
    st.text(max_size=20),
    st.just(""),
    st.lists(st.text(max_size=5), max_size=3),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    image_file=image_files(),
    condition_file=image_files(),
    image_size=sizes,
    condition_size=st.one_of(st.just("same"), st.just("half"), sizes),
    caption=captions,
    damage=st.sampled_from(["none"] * 4 + ["truncate", "garbage"]),
    resolution=st.sampled_from([8, 16]),
    condition_channels=st.sampled_from([1, 3]),
    random_crop=st.booleans(),
    proportion_empty_prompts=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_folder_yields_valid_tensors_or_our_error(
    image_file,
    condition_file,
    image_size,
    condition_size,
    caption,
    damage,
    resolution,
    condition_channels,
    random_crop,
    proportion_empty_prompts,
    seed,
):
    rng = np.random.default_rng(seed)
    if condition_size == "same":
        condition_size = image_size
    elif condition_size == "half":
        condition_size = (max(1, image_size[0] // 2), max(1, image_size[1] // 2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = []
        for role, (mode, fmt), size in (
            ("image", image_file, image_size),
            ("condition", condition_file, condition_size),
        ):
            image = _random_image(mode, size, rng)
            params = {"transparency": 0} if "transparency" in image.info else {}
            data = encoded(image, fmt, **params)
            if role == "image" and damage == "truncate":
                data = data[: max(1, len(data) // 2)]
            elif role == "image" and damage == "garbage":
                data = bytes(rng.integers(0, 256, len(data), dtype=np.uint8))
            names.append(f"{role}.{fmt.lower()}")
            (folder / names[-1]).write_bytes(data)
        write_metadata(
            folder, [{"image": names[0], "conditioning_image": names[1], "text": caption}]
        )
        try:
            dataset = ControlDataset(
                folder,
                resolution=resolution,
                condition_channels=condition_channels,
                random_crop=random_crop,
                proportion_empty_prompts=proportion_empty_prompts,
                seed=seed,
            )
            item = dataset[0]
        except LisaError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            return
    pixels, condition = item["pixel_values"], item["conditioning_pixel_values"]
    assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
    assert condition.shape == (condition_channels, resolution, resolution)
    assert torch.isfinite(pixels).all() and torch.isfinite(condition).all()
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    assert 0.0 <= condition.min() and condition.max() <= 1.0
    assert isinstance(item["caption"], str) and item["index"] == 0


# ----------------------------------------------------------------------------- happy path


def test_folder_of_four_loads_and_feeds_a_two_worker_dataloader(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for k, (size, mode) in enumerate(
        [((24, 16), "RGB"), ((48, 32), "RGBA"), ((16, 16), "L"), ((20, 40), "RGB")]
    ):
        image = Image.fromarray(_noise(size, seed=k)).convert(mode)
        image.save(folder / f"photo{k}.png")
        Image.fromarray(_noise(size, seed=10 + k)).convert("L").save(folder / f"edges{k}.png")
        rows.append(
            {"image": f"photo{k}.png", "conditioning_image": f"edges{k}.png", "text": f"c{k}"}
        )
    write_metadata(folder, rows)
    dataset = ControlDataset(folder, resolution=RESOLUTION, condition_channels=1)
    assert len(dataset) == 4 and dataset.condition_channels == 1
    assert dataset.validate() == 4

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 2
    pixels = torch.cat([b["pixel_values"] for b in batches])
    conditions = torch.cat([b["conditioning_pixel_values"] for b in batches])
    assert pixels.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert conditions.shape == (4, 1, RESOLUTION, RESOLUTION)
    assert [c for b in batches for c in b["caption"]] == ["c0", "c1", "c2", "c3"]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2, 3]
    # Workers read exactly what the main process reads.
    torch.testing.assert_close(pixels[1], dataset[1]["pixel_values"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- Hugging Face


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_folder(tmp_path / "files", n=3)
    rows = [json.loads(x) for x in (tmp_path / "files" / "metadata.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_dict(
        {
            "photo": [str(tmp_path / "files" / r["image"]) for r in rows],
            "control": [str(tmp_path / "files" / r["conditioning_image"]) for r in rows],
            "prompt": [r["text"] for r in rows],
        }
    ).cast_column("photo", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(DataError, match="no split 'validation'; its splits are: train"):
        ControlDataset(tmp_path / "saved", split="validation", resolution=RESOLUTION)

    with pytest.raises(DataError, match="--caption_column"):
        ControlDataset(
            tmp_path / "saved",
            resolution=RESOLUTION,
            image_column="photo",
            conditioning_image_column="control",
        )
    dataset = ControlDataset(
        tmp_path / "saved",
        resolution=RESOLUTION,
        image_column="photo",
        conditioning_image_column="control",
        caption_column="prompt",
    )
    item = dataset[2]
    assert item["caption"] == "item 2" and item["pixel_values"].shape == (3, RESOLUTION, RESOLUTION)
    reference = ControlDataset(tmp_path / "files", resolution=RESOLUTION)[2]
    torch.testing.assert_close(item["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
