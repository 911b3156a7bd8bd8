"""``ControlDataset``: (image, condition, caption) training triples from a local folder with a
``metadata.jsonl`` or from a Hugging Face dataset, validated so that every problem a user can
cause is a one-line LisaError that names the problem and the fix.

What is cheap (the metadata file, column names, caption types, that files exist, each image
file's header and size) is checked when the dataset is built, before the first training step,
and every problem found is reported at once. What is expensive (decoding images) is checked when
an item is read, and ``validate()`` reads every item to collect all problems at once.

A local folder looks like diffusers' fill50k::

    data/metadata.jsonl   {"image": "images/0.png", "conditioning_image": "conditions/0.png",
                           "text": "a red circle on a cyan background"}
    data/images/0.png
    data/conditions/0.png

with relative paths resolved against the folder. Anything else is handed to the optional
``datasets`` package: a hub name such as ``fusing/fill50k``, a folder written by
``Dataset.save_to_disk``, or a folder of parquet / arrow files. A dataset that needs neither
conditions nor captions (``conditioning_image_column=None, caption_column=None``, what ``lisa
pretrain`` reads) may also be a plain folder of image files, without ``metadata.jsonl``.

Random choices are drawn from generators seeded by the dataset seed, the key and the purpose, so
they are the same in any DataLoader worker and in a resumed run. Caption choices (an empty prompt,
which of several captions) are drawn per visit, from (seed, epoch, index): the trainer reads
``dataset[(epoch, index)]`` (see ``sampler.ResumableBatchOrder.batch_keys``) and a plain
``dataset[index]`` reads epoch 0. The random crop is drawn from (seed, index) alone, so an item's
pixels are the same at every visit and a latent cache stays exact.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import ConfigError, DataError
from .images import (
    check_resolution,
    file_problem,
    header_problem,
    load_image,
    load_image_bytes,
    pair_to_tensors,
    same_aspect,
    size_problem,
    symlink_loop,
    to_image_tensor,
    to_rgb,
)
from .sampler import split_key

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXAMPLE_LINE = (
    '{"image": "images/0.png", "conditioning_image": "conditions/0.png", "text": "a red car"}'
)
MAX_LISTED_PROBLEMS = 10
PROGRESS_ROWS = 1000  # check_rows shows a progress bar above this many rows

# One random stream per purpose: turning random crops on must not change which prompts are empty.
_EMPTY_PROMPT_STREAM, _CAPTION_CHOICE_STREAM, _CROP_STREAM = 0, 1, 2

# A hub dataset id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _listing(problems: list[str]) -> str:
    """Problems numbered on one line, at most MAX_LISTED_PROBLEMS of them."""
    shown = " ".join(f"({k}) {p}" for k, p in enumerate(problems[:MAX_LISTED_PROBLEMS], 1))
    hidden = len(problems) - MAX_LISTED_PROBLEMS
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def _describe_value(value) -> str:
    if value is None:
        return "null"
    return f"{json.dumps(value, default=str)[:60]} ({type(value).__name__})"


def caption_problem(value) -> str | None:
    """Why ``value`` cannot be a caption, or None. Text, or a non-empty list of texts, is fine."""
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return None
    if value is None:
        return 'is null; write "" for an empty caption or give the text'
    return (
        f"holds {_describe_value(value)}, not text; write the caption as a string (or a list of "
        'strings), e.g. "a red car"'
    )


# ----------------------------------------------------------------------------- row sources


class _MetadataRows:
    """The rows of ``<folder>/metadata.jsonl``, parsed when built."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / METADATA_FILE
        self.rows: list[dict] = []
        self.line_numbers: list[int] = []
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                "UTF-8 with one JSON object per line"
            ) from err
        except OSError as err:
            raise DataError(
                f"cannot read {self.path} ({err.strerror}); make it a readable file"
            ) from err
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue  # blank lines, e.g. a trailing one, carry no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"line {number} of {self.path} is not valid JSON ({err.msg} at column "
                    f"{err.colno}); write one JSON object per line, e.g. {EXAMPLE_LINE}"
                ) from err
            if not isinstance(row, dict):
                raise DataError(
                    f"line {number} of {self.path} is a JSON {type(row).__name__}, not an object; "
                    f"write one JSON object per line, e.g. {EXAMPLE_LINE}"
                )
            self.rows.append(row)
            self.line_numbers.append(number)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def empty_fix(self) -> str:
        return f"add one JSON line per training example, e.g. {EXAMPLE_LINE}"

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def where(self, row: int) -> str:
        return f"line {self.line_numbers[row]} of {self.path}"

    def record(self, row: int) -> dict:
        return self.rows[row]

    def resolve(self, value: str) -> Path:
        return self.folder / value

    def check_rows(
        self,
        rows,
        image_columns: list[str],
        caption_column: str | None,
        resolution: int | None = None,
    ) -> None:
        """Every chosen row has its columns, text captions and existing image files whose
        headers are images' (of a size ``size_problem`` accepts for ``resolution``, when
        given); all problems are collected into one DataError. A progress bar shows on folders
        of more than ``PROGRESS_ROWS`` rows."""
        from tqdm.auto import tqdm

        problems = []
        headers: dict[Path, str | None] = {}  # a file several rows share is read once
        bar = tqdm(rows, desc="checking image files", unit="row", leave=False,
                   disable=len(rows) <= PROGRESS_ROWS)  # fmt: skip
        for row in bar:
            record, where = self.rows[row], self._short_where(row)
            for column in [*image_columns, caption_column]:
                if column is not None and column not in record:
                    problems.append(f"{where} has no '{column}' key; add it")
            if caption_column in record:
                problem = caption_problem(record[caption_column])
                if problem:
                    problems.append(f"{where}, column '{caption_column}' {problem}")
            for column in image_columns:
                if column not in record:
                    continue
                value = record[column]
                if not isinstance(value, str) or not value.strip():
                    problems.append(
                        f"{where}, column '{column}' holds {_describe_value(value)}, not a file "
                        "path; write the image's path relative to the folder"
                    )
                    continue
                path = self.resolve(value)
                if path not in headers:
                    headers[path] = _image_file_problem(path, resolution)
                if headers[path]:
                    problems.append(f"{where}, column '{column}': {path}: {headers[path]}")
        if problems:
            raise DataError(f"{self.name} has {len(problems)} problem(s): {_listing(problems)}")

    def _short_where(self, row: int) -> str:
        return f"line {self.line_numbers[row]}"

    def image(self, value, *, role: str) -> Image.Image:
        return load_image(self.resolve(value), role=role)


class _ImageFileRows(_MetadataRows):
    """A folder of image files without ``metadata.jsonl`` (its sub-folders included, hidden
    files left out), one row ``{"image": relative path}`` per file, in sorted order."""

    def __init__(self, folder: Path, image_column: str = "image"):
        self.folder = folder
        self.path = folder
        files = sorted(
            p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )  # fmt: skip
        self.rows = [{image_column: str(p.relative_to(folder))} for p in files]
        self.line_numbers = list(range(1, len(files) + 1))

    @property
    def name(self) -> str:
        return f"folder {self.folder}"

    @property
    def empty_fix(self) -> str:
        return (
            f"it holds no image files ({', '.join(IMAGE_SUFFIXES)}); pass the folder that holds "
            "the training images"
        )

    def where(self, row: int) -> str:
        return f"{self._short_where(row)} in {self.folder}"

    def _short_where(self, row: int) -> str:
        return f"file {next(iter(self.rows[row].values()))}"


def _image_file_problem(path: Path, resolution: int | None) -> str | None:
    """Why the file at ``path`` is no usable training image, from its header alone, or None."""
    problem = file_problem(path)
    if problem:
        return problem
    problem, size = header_problem(path)
    if problem or resolution is None:
        return problem
    return size_problem(size, resolution)


class _HubRows:
    """A split of a Hugging Face dataset, through the optional ``datasets`` package."""

    def __init__(
        self,
        source: str,
        *,
        from_disk: bool,
        config_name: str | None,
        split: str,
        cache_dir: str | None,
    ):
        try:
            import datasets
        except ImportError as err:
            raise DataError(
                f"{source!r} is not a local folder with {METADATA_FILE}, and reading it as a "
                "Hugging Face dataset needs the optional package: pip install datasets"
            ) from err
        self.source, self.split = source, split
        local = Path(source)
        self.base = local if local.is_dir() else None  # string paths in cells are relative to it
        try:
            if from_disk:
                loaded = datasets.load_from_disk(source)
            else:
                loaded = datasets.load_dataset(source, config_name, cache_dir=cache_dir)
        except Exception as err:  # every loader failure is about the user's data
            reason = (str(err).splitlines() or [""])[0][:200]
            what = "" if self.base else "is not a local folder, and "
            raise DataError(
                f"dataset {source!r} {what}cannot be loaded ({type(err).__name__}: {reason}); "
                "check the name or path and --dataset_config_name, and that the dataset is "
                "cached or the hub is reachable (HF_HUB_OFFLINE=1 needs a cached copy)"
            ) from err
        if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if split not in loaded:
                raise DataError(
                    f"dataset {source!r} has no split {split!r}; its splits are: "
                    f"{', '.join(loaded)}; pick one of them"
                )
            loaded = loaded[split]
        if not isinstance(loaded, datasets.Dataset):
            raise DataError(
                f"dataset {source!r} loads as a {type(loaded).__name__}; lisa-control needs "
                "random access, so load it without streaming"
            )
        self.dataset = loaded

    @property
    def name(self) -> str:
        return f"dataset {self.source!r} (split {self.split!r})"

    @property
    def empty_fix(self) -> str:
        return "pick a split or dataset that holds training examples"

    def __len__(self) -> int:
        return len(self.dataset)

    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def where(self, row: int) -> str:
        return f"row {row} of {self.name}"

    def record(self, row: int) -> dict:
        return self.dataset[row]

    def check_rows(
        self,
        rows,
        image_columns: list[str],
        caption_column: str | None,
        resolution: int | None = None,
    ) -> None:
        """Keep image cells encoded, so our strict decoder reads them, not ``datasets``' lenient
        one. Cells are checked when read: scanning a large arrow table here would be slow."""
        import datasets

        for column in image_columns:
            if isinstance(self.dataset.features.get(column), datasets.Image):
                self.dataset = self.dataset.cast_column(column, datasets.Image(decode=False))

    def image(self, value, *, role: str) -> Image.Image:
        if isinstance(value, Image.Image):
            return to_rgb(value, path="(decoded by datasets)", role=role)
        if isinstance(value, dict) and value.get("bytes"):
            name = value.get("path") or "(bytes stored in the dataset)"
            return load_image_bytes(value["bytes"], name=name, role=role)
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, str) and value:
            path = Path(value)
            if self.base is not None and not path.is_absolute():
                path = self.base / path
            return load_image(path, role=role)
        raise DataError(
            f"the cell holds {_describe_value(value)}, not an image; the column must hold images "
            "or image file paths"
        )


def _saved_with_save_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _has_table_files(folder: Path) -> bool:
    patterns = ("*.parquet", "*.arrow", "*/*.parquet", "*/*.arrow")
    return any(next(folder.glob(p), None) for p in patterns)


def _open_source(source, *, config_name, split, cache_dir, image_files_column=None):
    """The row source for ``source``: a metadata folder, or a dataset ``datasets`` can load;
    with ``image_files_column`` (a dataset of images alone), also a plain folder of image
    files, whose rows name their file in that column."""
    path = Path(source).expanduser()
    hub = dict(config_name=config_name, split=split, cache_dir=cache_dir)
    if path.is_dir():
        if (path / METADATA_FILE).is_file():
            return _MetadataRows(path)
        if _saved_with_save_to_disk(path):
            return _HubRows(str(path), from_disk=True, **hub)
        if _has_table_files(path):
            return _HubRows(str(path), from_disk=False, **hub)
        if image_files_column is not None:
            return _ImageFileRows(path, image_files_column)
        nested = sorted(path.glob(f"*/{METADATA_FILE}"))
        found = f" (found one in {nested[0].parent}; pass that folder)" if nested else ""
        raise DataError(
            f"folder {path} has no {METADATA_FILE}{found}; add one with one JSON object per line "
            f"naming an image, its condition and its caption, e.g. {EXAMPLE_LINE} (paths "
            "relative to the folder)"
        )
    if path.exists():
        raise DataError(
            f"data source {path} is a file; pass the folder that holds {METADATA_FILE} "
            "(--train_data_dir) or a dataset name (--dataset_name)"
        )
    if symlink_loop(path):
        raise DataError(
            f"data folder {path} is a symbolic link loop (following it leads back to itself); "
            "point --train_data_dir at the real folder"
        )
    if _HUB_NAME.match(str(source)):
        return _HubRows(str(source), from_disk=False, **hub)
    raise DataError(
        f"data folder {path} does not exist; check --train_data_dir, or pass a Hugging Face "
        "dataset name with --dataset_name"
    )


# ----------------------------------------------------------------------------- the dataset


class ControlDataset(torch.utils.data.Dataset):
    """Training triples as dicts: ``pixel_values`` (3, R, R) float in [-1, 1],
    ``conditioning_pixel_values`` (``condition_channels``, R, R) float in [0, 1], ``caption``
    (str) and ``index`` (int, the item's position in this dataset). Items are read by index or
    by ``(epoch, index)``; the epoch only changes the caption choices.

    Args:
        source: a folder holding ``metadata.jsonl``, a folder ``datasets`` can load, or a
            Hugging Face dataset name.
        resolution: side R of the square training crop; a positive multiple of
            ``resolution_multiple``.
        image_column, conditioning_image_column, caption_column: column names, diffusers'
            defaults. ``caption_column=None`` trains without captions (all "").
            ``conditioning_image_column=None`` reads images alone: items have no
            ``conditioning_pixel_values``, and with no captions either, ``source`` may be a
            plain folder of image files.
        condition_channels: 3 (RGB) or 1 (luminance) channels of the condition tensor.
        proportion_empty_prompts: probability that an item's caption is replaced by "", drawn
            afresh for every (epoch, index).
        random_crop: a random square (fixed per index and seed) instead of the centre one.
        seed: seeds the choice of rows for ``max_samples`` and the per-item random choices.
        max_samples: keep this many rows, chosen at random with ``seed`` (diffusers' shuffle and
            select), in their original order.
        dataset_config_name, split, cache_dir: passed to ``datasets.load_dataset``.

    Rules: images and conditions are converted to RGB as ``images.py`` documents (transparency on
    white for images, on black for conditions). A condition whose aspect ratio differs from its
    image's by more than a pixel of rounding is refused: resizing it to the image's size would
    stretch the control away from what it describes. So is a file whose shorter side is below
    ``resolution / 8`` or whose sides are more than 4:1 (``images.size_problem``): it would be
    enlarged into a blur, or cropped to a sliver.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        resolution: int = 512,
        image_column: str = "image",
        conditioning_image_column: str = "conditioning_image",
        caption_column: str | None = "text",
        condition_channels: int = 3,
        proportion_empty_prompts: float = 0.0,
        random_crop: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
        resolution_multiple: int = 8,
        dataset_config_name: str | None = None,
        split: str = "train",
        cache_dir: str | None = None,
    ):
        self.resolution = check_resolution(resolution, resolution_multiple)
        self.condition_channels = _check_condition_channels(condition_channels)
        self.proportion_empty_prompts = _check_proportion(proportion_empty_prompts)
        self.seed = _check_seed(seed)
        self.random_crop = bool(random_crop)
        self.image_column = image_column
        self.conditioning_image_column = conditioning_image_column
        self.caption_column = caption_column

        images_alone = conditioning_image_column is None and caption_column is None
        self._source = _open_source(
            source, config_name=dataset_config_name, split=split, cache_dir=cache_dir,
            image_files_column=image_column if images_alone else None,
        )  # fmt: skip
        if len(self._source) == 0:
            raise DataError(f"{self._source.name} has no rows; {self._source.empty_fix}")
        self._check_columns()
        self._rows = self._choose_rows(max_samples)
        self._source.check_rows(
            self._rows, self._image_columns, caption_column, resolution=self.resolution
        )

    # -- construction-time checks

    @property
    def _image_columns(self) -> list[str]:
        columns = [self.image_column, self.conditioning_image_column]
        return [c for c in columns if c is not None]

    def _check_columns(self) -> None:
        present = self._source.columns()
        wanted = [
            ("image_column", self.image_column, "training images"),
            ("conditioning_image_column", self.conditioning_image_column, "condition images"),
            ("caption_column", self.caption_column, "captions"),
        ]
        for flag, column, holds in wanted:
            if column is None or column in present:
                continue
            # A near-miss spelling, else the one column no other flag claims (e.g. "text" when
            # asked for "prompt").
            unclaimed = [c for c in present if c not in {w[1] for w in wanted}]
            close = difflib.get_close_matches(str(column), present, n=1)
            guess = close[0] if close else unclaimed[0] if len(unclaimed) == 1 else None
            suggestion = f"e.g. --{flag} {guess}" if guess else "naming one of them"
            raise DataError(
                f"{self._source.name} has no column {column!r} for the {holds}; its columns "
                f"are: {', '.join(present)}; pass --{flag} {suggestion}"
            )

    def _choose_rows(self, max_samples) -> list[int]:
        total = len(self._source)
        if max_samples is None:
            return list(range(total))
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ConfigError(
                f"--max_train_samples must be a positive whole number, got {max_samples!r}"
            )
        if max_samples >= total:
            return list(range(total))
        chosen = np.random.default_rng(self.seed).permutation(total)[:max_samples]
        return sorted(int(r) for r in chosen)

    # -- reading items

    def __len__(self) -> int:
        return len(self._rows)

    def _rng(self, index: int, stream: int, epoch: int | None = None) -> np.random.Generator:
        """The generator of one purpose: per item, or per visit when ``epoch`` is given."""
        if epoch is None:
            return np.random.default_rng([self.seed, index, stream])
        return np.random.default_rng([self.seed, index, stream, epoch])

    def _where(self, index: int) -> str:
        return f"item {index} ({self._source.where(self._rows[index])})"

    def _caption(self, record: dict, index: int, epoch: int = 0) -> str:
        if self.caption_column is None:
            return ""
        value = record.get(self.caption_column)
        problem = caption_problem(value)
        if problem:
            raise DataError(f"{self._where(index)}, column '{self.caption_column}' {problem}")
        if not isinstance(value, str):
            # Several captions per image: one of them, like diffusers' training branch.
            choice = self._rng(index, _CAPTION_CHOICE_STREAM, epoch).integers(len(value))
            value = value[int(choice)]
        if self._rng(index, _EMPTY_PROMPT_STREAM, epoch).random() < self.proportion_empty_prompts:
            return ""
        return value

    def _image(self, record: dict, index: int, column: str, role: str) -> Image.Image:
        where = f"{self._where(index)}, column '{column}'"
        if column not in record:
            raise DataError(f"{where}: the row has no such column; add it")
        try:
            return self._source.image(record[column], role=role)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = split_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        index = index % len(self)
        record = self._source.record(self._rows[index])
        caption = self._caption(record, index, epoch)
        image = self._image(record, index, self.image_column, "image")
        if self.conditioning_image_column is None:
            problem = size_problem(image.size, self.resolution)
            if problem:
                label = _file_label(record, self.image_column)
                raise DataError(
                    f"{self._where(index)}, column '{self.image_column}': {label}: {problem}"
                )
            crop_rng = self._rng(index, _CROP_STREAM) if self.random_crop else None
            pixel_values = to_image_tensor(image, self.resolution, rng=crop_rng)
            return {"pixel_values": pixel_values, "caption": caption, "index": index}
        condition = self._image(record, index, self.conditioning_image_column, "condition")
        if not same_aspect(image.size, condition.size):
            raise DataError(
                f"{self._where(index)}: the image {_file_label(record, self.image_column)} is "
                f"{image.width}x{image.height} but its condition "
                f"{_file_label(record, self.conditioning_image_column)} is "
                f"{condition.width}x{condition.height}, a different aspect ratio; resizing would "
                "misalign the control, so make the condition from this image or crop both alike"
            )
        for column, picture in ((self.image_column, image),
                                (self.conditioning_image_column, condition)):  # fmt: skip
            problem = size_problem(picture.size, self.resolution)
            if problem:
                raise DataError(
                    f"{self._where(index)}, column '{column}': {_file_label(record, column)}: "
                    f"{problem}"
                )
        crop_rng = self._rng(index, _CROP_STREAM) if self.random_crop else None
        pixel_values, conditioning_pixel_values = pair_to_tensors(
            image, condition, self.resolution, channels=self.condition_channels, rng=crop_rng
        )
        return {
            "pixel_values": pixel_values,
            "conditioning_pixel_values": conditioning_pixel_values,
            "caption": caption,
            "index": index,
        }

    def validate(self, max_items: int | None = None) -> int:
        return validate_items(self, max_items)


def validate_items(dataset, max_items: int | None = None) -> int:
    """Read (decode) the first ``max_items`` items of ``dataset``, or all; raise one DataError
    listing the problems (up to ten) if any item cannot be used. Returns how many were checked."""
    count = len(dataset) if max_items is None else min(len(dataset), max(0, int(max_items)))
    problems = []
    for index in range(count):
        try:
            dataset[index]
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError(
            f"{len(problems)} of {count} checked items cannot be used: {_listing(problems)}"
        )
    return count


def _file_label(record: dict, column: str) -> str:
    """How an error names the file in ``record[column]``: its path when the cell holds one."""
    value = record.get(column)
    if isinstance(value, dict):
        value = value.get("path")
    return repr(value) if isinstance(value, str) and value else f"in column '{column}'"


# ----------------------------------------------------------------------------- argument checks


def _check_condition_channels(channels) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ConfigError(
            f"condition_channels must be 1 (gray conditions such as depth or edges) or 3 "
            f"(colour), got {channels!r}; use condition_channels=1 or 3"
        )
    return int(channels)


def _check_proportion(proportion) -> float:
    try:
        value = float(proportion)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"--proportion_empty_prompts must be a number in [0, 1], got {proportion!r}; e.g. 0.1 "
            "drops one caption in ten"
        )
    return value


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"--seed must be a whole number >= 0, got {seed!r}")
    return int(seed)
