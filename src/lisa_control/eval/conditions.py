"""Condition images for ``lisa sample`` and ``lisa eval``: single files, every image in a folder,
or the rows of a ``metadata.jsonl`` (its conditioning-image column, with the caption column as the
prompt), each with the name its sample is saved under.

Files are decoded with :func:`lisa_control.data.images.load_image` (transparency composited on
black, grayscale replicated, 16-bit and float images scaled) and cut to a square with
:func:`~lisa_control.data.images.to_condition_tensor` (shorter side to the resolution, centre
crop), so odd sizes and modes are handled as in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import DataError
from ..data.folder import METADATA_FILE, caption_problem
from ..data.images import file_problem, load_image, to_condition_tensor

# Suffixes (lower case) that a folder of conditions is scanned for; anything else in the folder
# (metadata, notes, thumbnails databases) is skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Names the output folder of ``lisa sample`` uses for itself; a condition with such a stem is
# saved under a suffixed name.
RESERVED_NAMES = ("grid",)


@dataclass
class ConditionFile:
    """One condition: its image file, the prompt its source gives (``None``: none given) and the
    unique stem its samples are saved under."""

    path: Path
    prompt: str | None = None
    name: str = ""


def folder_images(folder: Path) -> list[Path]:
    """Every image file directly in ``folder`` (by suffix, any case; hidden files skipped),
    sorted by name."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(
            f"folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}); pass a folder "
            "of condition images, image files, or a metadata.jsonl"
        )
    return sorted(files, key=lambda p: p.name)


def _first_caption(value) -> str:
    return value if isinstance(value, str) else value[0]


def metadata_conditions(
    path: Path,
    conditioning_image_column: str = "conditioning_image",
    caption_column: str | None = "text",
) -> list[ConditionFile]:
    """The conditions of a ``metadata.jsonl``: each row's ``conditioning_image_column`` (a path
    relative to the file's folder) with its ``caption_column`` as the prompt (the first one
    where a row lists several). A caption column that no row has means no prompts; one that
    only some rows have is an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); make it a UTF-8 text file") from err
    rows: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"line {number} of {path} is not valid JSON ({err.msg}); write one JSON object "
                "per line"
            ) from err
        if not isinstance(row, dict):
            raise DataError(f"line {number} of {path} is not a JSON object; write one per line")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path} has no rows; add one JSON line per condition")
    columns = {key for _, row in rows for key in row}
    if conditioning_image_column not in columns:
        raise DataError(
            f"{path} has no column {conditioning_image_column!r} for the condition images; its "
            f"columns are: {', '.join(sorted(columns))}; pass --conditioning_image_column NAME"
        )
    with_captions = caption_column is not None and caption_column in columns
    problems, found = [], []
    for number, row in rows:
        value = row.get(conditioning_image_column)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"line {number} has no path in column {conditioning_image_column!r}")
            continue
        image = path.parent / value
        problem = file_problem(image)
        if problem:
            problems.append(f"line {number}: {image}: {problem}")
            continue
        prompt = None
        if with_captions:
            if caption_column not in row:
                problems.append(f"line {number} has no {caption_column!r} key; add it")
                continue
            problem = caption_problem(row[caption_column])
            if problem:
                problems.append(f"line {number}, column {caption_column!r} {problem}")
                continue
            prompt = _first_caption(row[caption_column])
        found.append(ConditionFile(image, prompt))
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise DataError(f"{path} has {len(problems)} problem(s): {shown}")
    return found


def read_conditions(
    sources: list[str | os.PathLike],
    conditioning_image_column: str = "conditioning_image",
    caption_column: str | None = "text",
) -> list[ConditionFile]:
    """Expand ``--image`` values in order: an image file is itself; a ``metadata.jsonl`` (or a
    folder holding one) gives its rows; any other folder gives every image in it, sorted. The
    conditions get unique names (see :func:`unique_names`)."""
    found: list[ConditionFile] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            if (path / METADATA_FILE).is_file():
                found += metadata_conditions(
                    path / METADATA_FILE, conditioning_image_column, caption_column
                )
            else:
                found += [ConditionFile(p) for p in folder_images(path)]
        elif path.suffix.lower() == ".jsonl" and path.is_file():
            found += metadata_conditions(path, conditioning_image_column, caption_column)
        else:
            problem = file_problem(path)
            if problem:
                raise DataError(f"--image {path}: {problem}")
            found.append(ConditionFile(path))
    for condition, name in zip(found, unique_names([c.path.stem for c in found])):
        condition.name = name
    return found


def unique_names(stems: list[str], reserved=RESERVED_NAMES) -> list[str]:
    """``stems`` made unique in order: a repeated (or reserved) stem gets ``-1``, ``-2``, ...
    until it is new, so no sample overwrites another or the grid."""
    taken = {name.lower() for name in reserved}
    names = []
    for stem in stems:
        name, k = stem, 0
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name.lower())
        names.append(name)
    return names


def load_condition_tensors(
    conditions: list[ConditionFile], resolution: int, channels: int = 3
) -> torch.Tensor:
    """(N, channels, R, R) in [0, 1]: each file decoded as a condition, shorter side scaled to
    ``resolution`` and centre-cropped."""
    return torch.stack(
        [to_condition_tensor(load_image(c.path), resolution, channels) for c in conditions]
    )
