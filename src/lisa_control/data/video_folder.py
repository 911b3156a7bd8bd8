"""``VideoControlDataset``: (video, conditioning video, caption) training triples from a folder
with a ``metadata.jsonl`` or from a Hugging Face dataset with the same columns, validated so that
every problem a user can cause is a one-line DataError that names it and the fix.

A local folder::

    data/metadata.jsonl   {"video": "clips/0.mp4", "conditioning_video": "poses/0.gif",
                           "text": "a person walking", "fps": 24}
    data/clips/0.mp4
    data/poses/0.gif

A video cell names an ``.mp4`` (or ``.webm``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``) file,
decoded through PyAV (the optional extra ``pip install 'lisa-control[video]'``), an animated
GIF or WebP, decoded through PIL, or a folder of frame images (sorted by name). In a Hugging Face
dataset a cell may also hold the file's bytes (``{"bytes": ...}``) or a list of frame images.

Each item takes ``num_frames`` frames, every ``frame_stride``-th from the first; with
``frame_rate`` and an fps column, the stride is the row's fps over ``frame_rate`` (rounded), so
clips filmed at different rates play at one rate. The video and its condition must have the same
number of frames (a pose or depth video made from the clip has); a clip too short for the frames
asked, a condition of another length or size ratio, an unreadable file, or an fps cell that is
not a positive number (or contradicts the rate an MP4 file records) is refused in one line.

Frames are cut like ``ControlDataset``'s images, with one centre crop for the whole clip: each
frame pair resized to the image's shorter-side size and cropped alike, so the control stays
aligned. Items: ``pixel_values`` (3, F, R, R) in [-1, 1], ``conditioning_pixel_values``
(``condition_channels``, F, R, R) in [0, 1], ``caption`` and ``index``; as ``ControlDataset``,
items are read by index or ``(epoch, index)`` and captions are drawn per visit.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from ..core.errors import ConfigError, DataError
from .folder import (
    METADATA_FILE,
    _check_condition_channels,
    _check_proportion,
    _check_seed,
    _describe_value,
    _file_label,
    _listing,
    _open_source,
    caption_problem,
    validate_items,
)
from .images import check_resolution, load_image, pair_to_tensors, same_aspect, to_rgb
from .sampler import split_key

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
ANIMATED_SUFFIXES = (".gif", ".webp")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXAMPLE_LINE = (
    '{"video": "clips/0.mp4", "conditioning_video": "poses/0.gif", "text": "a person walking"}'
)
PYAV_MISSING = (
    "needs PyAV: pip install 'lisa-control[video]' (or convert it to a GIF or a folder of frames)"
)
# An fps cell may differ from the rate an MP4 records by this fraction (rounding of 29.97 etc.).
FPS_TOLERANCE = 0.01

_EMPTY_PROMPT_STREAM, _CAPTION_CHOICE_STREAM = 0, 1


# ----------------------------------------------------------------------------- decoding


def _pyav():
    try:
        import av
    except ImportError:
        return None
    return av


def _decode_av(source, name: str) -> tuple[list[Image.Image], float | None]:
    av = _pyav()
    if av is None:
        raise DataError(f"reading video {name} {PYAV_MISSING}")
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise DataError(f"{name} holds no video stream; pass a video file")
            stream = container.streams.video[0]
            frames = [frame.to_image() for frame in container.decode(stream)]
            rate = float(stream.average_rate) if stream.average_rate else None
    except DataError:
        raise
    except Exception as err:  # PyAV raises its own FFmpeg error types for bad files
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise DataError(
            f"cannot decode video {name} ({reason}); re-encode it or pass frames"
        ) from err
    return frames, rate


def _decode_animated(source, name: str) -> tuple[list[Image.Image], float | None]:
    try:
        with Image.open(source) as image:
            frames = [frame.convert("RGBA").copy() for frame in ImageSequence.Iterator(image)]
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise DataError(
            f"cannot decode video {name} ({reason}); re-save it or pass frames"
        ) from err
    # GIF frame durations are rounded to 10 ms: no rate worth checking a column against.
    return frames, None


def _frame_folder(folder: Path, role: str) -> list[Image.Image]:
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
         and not p.name.startswith(".")),
        key=lambda p: p.name,
    )  # fmt: skip
    if not files:
        raise DataError(
            f"folder {folder} holds no frame images ({', '.join(FRAME_SUFFIXES)}); a video "
            "folder holds one image per frame, sorted by name"
        )
    return [load_image(p, role=role) for p in files]


def read_video(source, *, role: str = "condition") -> tuple[list[Image.Image], float | None]:
    """(RGB frames, frames per second the file records) of a video file, animated GIF/WebP,
    folder of frames, encoded bytes or list of frames; the rate is the container's for PyAV
    files (MP4, ...), None for the others. ``role`` picks the background that transparency is
    composited on, as for images. Every failure is a DataError."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("the cell holds an empty list of frames; give at least one frame")
        frames = []
        for k, frame in enumerate(source):
            if isinstance(frame, Image.Image):
                frames.append(to_rgb(frame, path=f"frame {k}", role=role))
            elif isinstance(frame, (str, os.PathLike)):
                frames.append(load_image(frame, role=role))
            elif isinstance(frame, dict) and frame.get("bytes"):
                frames.append(_bytes_frame(frame["bytes"], f"frame {k}", role))
            else:
                raise DataError(
                    f"frame {k} of the cell holds {_describe_value(frame)}, not an image"
                )
        return frames, None
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            frames, rate = _decode_animated(io.BytesIO(data), "(bytes)")
        else:
            frames, rate = _decode_av(io.BytesIO(data), "(bytes)")
        return [to_rgb(f, path="(bytes)", role=role) for f in frames], rate
    path = Path(source)
    if path.is_dir():
        return _frame_folder(path, role), None
    if not path.exists():
        raise DataError(f"video {path} does not exist; check the path (relative to the folder)")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        frames, rate = _decode_av(str(path), str(path))
    elif suffix in ANIMATED_SUFFIXES:
        frames, rate = _decode_animated(path, str(path))
    else:
        raise DataError(
            f"{path} is not a video this reader knows (suffix {path.suffix or '(none)'}); use "
            f"{', '.join(VIDEO_SUFFIXES + ANIMATED_SUFFIXES)} or a folder of frames"
        )
    if not frames:
        raise DataError(f"video {path} has no frames")
    return [to_rgb(f, path=str(path), role=role) for f in frames], rate


def _bytes_frame(data: bytes, name: str, role: str) -> Image.Image:
    from .images import load_image_bytes

    return load_image_bytes(data, name=name, role=role)


def video_problem(value) -> str | None:
    """Why a metadata cell cannot name a video, or None (cheap: no decoding)."""
    if not isinstance(value, str) or not value.strip():
        return (
            f"holds {_describe_value(value)}, not a path; write the video's path (a file or a "
            "folder of frames) relative to the folder"
        )
    return None


def fps_problem(value) -> str | None:
    """Why an fps cell is wrong, or None: it must be a positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"holds {_describe_value(value)}, not a number; write the frame rate, e.g. 24"
    if not math.isfinite(value) or value <= 0:
        return f"holds {value!r}; a frame rate must be a positive number, e.g. 24"
    return None


# ----------------------------------------------------------------------------- the dataset


class VideoControlDataset(torch.utils.data.Dataset):
    """Training clips of the module docstring.

    Args:
        source: a folder holding ``metadata.jsonl``, a folder ``datasets`` can load, or a
            Hugging Face dataset name.
        resolution: side R of the square frames, a multiple of ``resolution_multiple``.
        num_frames: frames per item (F).
        frame_stride: take every ``frame_stride``-th frame (ignored with ``frame_rate``).
        frame_rate: with ``fps_column``, the rate (frames per second) items are sampled at.
        video_column, conditioning_video_column, caption_column, fps_column: column names;
            ``caption_column=None`` trains without captions; an absent ``fps_column`` is fine
            unless ``frame_rate`` needs it.
        condition_channels, proportion_empty_prompts, seed, max_samples, dataset_config_name,
        split, cache_dir: as ``ControlDataset``'s.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        resolution: int = 256,
        num_frames: int = 8,
        frame_stride: int = 1,
        frame_rate: float | None = None,
        video_column: str = "video",
        conditioning_video_column: str = "conditioning_video",
        caption_column: str | None = "text",
        fps_column: str = "fps",
        condition_channels: int = 3,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        max_samples: int | None = None,
        resolution_multiple: int = 8,
        dataset_config_name: str | None = None,
        split: str = "train",
        cache_dir: str | None = None,
    ):
        self.resolution = check_resolution(resolution, resolution_multiple)
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"--{name} must be a whole number >= 1, got {value!r}")
        if frame_rate is not None and fps_problem(frame_rate):
            raise ConfigError(f"--frame_rate must be a positive number, got {frame_rate!r}")
        self.num_frames, self.frame_stride = int(num_frames), int(frame_stride)
        self.frame_rate = frame_rate
        self.condition_channels = _check_condition_channels(condition_channels)
        self.proportion_empty_prompts = _check_proportion(proportion_empty_prompts)
        self.seed = _check_seed(seed)
        self.video_column = video_column
        self.conditioning_video_column = conditioning_video_column
        self.caption_column = caption_column
        self.fps_column = fps_column
        self._source = _open_source(
            source, config_name=dataset_config_name, split=split, cache_dir=cache_dir
        )
        if len(self._source) == 0:
            raise DataError(
                f"{self._source.name} has no rows; add one line per clip, e.g. {EXAMPLE_LINE}"
            )
        self._check_columns()
        self._rows = self._choose_rows(max_samples)
        self._check_rows()

    # -- construction-time checks

    def _check_columns(self) -> None:
        present = self._source.columns()
        wanted = [
            ("video_column", self.video_column, "videos"),
            ("conditioning_video_column", self.conditioning_video_column, "condition videos"),
            ("caption_column", self.caption_column, "captions"),
        ]
        for flag, column, holds in wanted:
            if column is not None and column not in present:
                raise DataError(
                    f"{self._source.name} has no column {column!r} for the {holds}; its columns "
                    f"are: {', '.join(present)}; pass --{flag} naming one of them"
                )
        if self.frame_rate is not None and self.fps_column not in present:
            raise DataError(
                f"--frame_rate needs each clip's frame rate, but {self._source.name} has no "
                f'column {self.fps_column!r}; add it (e.g. "fps": 24) or drop --frame_rate'
            )

    def _choose_rows(self, max_samples) -> list[int]:
        total = len(self._source)
        if max_samples is None or max_samples >= total:
            return list(range(total))
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ConfigError(
                f"--max_train_samples must be a positive whole number, got {max_samples!r}"
            )
        chosen = np.random.default_rng(self.seed).permutation(total)[:max_samples]
        return sorted(int(r) for r in chosen)

    def _check_rows(self) -> None:
        """Metadata folders: every row has its columns, a path per video cell that exists, a text
        caption and a valid fps. (Hugging Face cells are checked when read.)"""
        resolve = getattr(self._source, "resolve", None)
        if resolve is None:
            return
        problems = []
        for row in self._rows:
            record, where = self._source.record(row), self._source.where(row)
            for column in (self.video_column, self.conditioning_video_column):
                if column not in record:
                    problems.append(f"{where} has no '{column}' key; add it")
                    continue
                problem = video_problem(record[column])
                if problem is None and not resolve(record[column]).exists():
                    problem = f"{resolve(record[column])} does not exist"
                if problem:
                    problems.append(f"{where}, column '{column}' {problem}")
            if self.caption_column is not None:
                problem = caption_problem(record.get(self.caption_column))
                if self.caption_column not in record:
                    problems.append(f"{where} has no '{self.caption_column}' key; add it")
                elif problem:
                    problems.append(f"{where}, column '{self.caption_column}' {problem}")
            if self.fps_column in record:
                problem = fps_problem(record[self.fps_column])
                if problem:
                    problems.append(f"{where}, column '{self.fps_column}' {problem}")
            elif self.frame_rate is not None:
                problems.append(
                    f"{where} has no '{self.fps_column}' key, which --frame_rate needs; add it "
                    f'(e.g. "{self.fps_column}": 24) or drop --frame_rate'
                )
        if problems:
            raise DataError(
                f"{self._source.name} has {len(problems)} problem(s): {_listing(problems)}"
            )

    # -- reading items

    def __len__(self) -> int:
        return len(self._rows)

    def _where(self, index: int) -> str:
        return f"item {index} ({self._source.where(self._rows[index])})"

    def _rng(self, index: int, stream: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream, epoch])

    def _caption(self, record: dict, index: int, epoch: int) -> str:
        if self.caption_column is None:
            return ""
        value = record.get(self.caption_column)
        problem = caption_problem(value)
        if problem:
            raise DataError(f"{self._where(index)}, column '{self.caption_column}' {problem}")
        if not isinstance(value, str):
            value = value[int(self._rng(index, _CAPTION_CHOICE_STREAM, epoch).integers(len(value)))]
        if self._rng(index, _EMPTY_PROMPT_STREAM, epoch).random() < self.proportion_empty_prompts:
            return ""
        return value

    def _video(self, record: dict, index: int, column: str, role: str):
        where = f"{self._where(index)}, column '{column}'"
        if column not in record:
            raise DataError(f"{where}: the row has no such column; add it")
        value = record[column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and hasattr(self._source, "resolve"):
            value = self._source.resolve(value)
        elif isinstance(value, str) and getattr(self._source, "base", None) is not None:
            value = self._source.base / value if not Path(value).is_absolute() else value
        try:
            return read_video(value, role=role)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err

    def _stride(self, record: dict, index: int, recorded: float | None) -> int:
        if self.fps_column not in record:
            return self.frame_stride
        fps = record[self.fps_column]
        problem = fps_problem(fps)
        if problem:
            raise DataError(f"{self._where(index)}, column '{self.fps_column}' {problem}")
        if recorded is not None and abs(fps - recorded) > FPS_TOLERANCE * recorded:
            raise DataError(
                f"{self._where(index)}: column '{self.fps_column}' says {fps} fps but the video "
                f"file records {recorded:g} fps; fix the column (or drop it)"
            )
        if self.frame_rate is None:
            return self.frame_stride
        return max(1, round(fps / self.frame_rate))

    def frames(self, index: int) -> tuple[list[Image.Image], list[Image.Image], int]:
        """(video frames, condition frames, stride) of item ``index``, checked, before the crop."""
        record = self._source.record(self._rows[index])
        video, video_rate = self._video(record, index, self.video_column, "image")
        condition, _ = self._video(record, index, self.conditioning_video_column, "condition")
        video_file = _file_label(record, self.video_column)
        condition_file = _file_label(record, self.conditioning_video_column)
        if len(video) != len(condition):
            raise DataError(
                f"{self._where(index)}: the video {video_file} has {len(video)} frames but its "
                f"condition {condition_file} has {len(condition)}; make the condition video from "
                "the clip, frame for frame"
            )
        stride = self._stride(record, index, video_rate)
        needed = (self.num_frames - 1) * stride + 1
        if len(video) < needed:
            raise DataError(
                f"{self._where(index)}: the video {video_file} has {len(video)} frames, too few "
                f"for {self.num_frames} frames {stride} apart ({needed} needed); use a longer "
                "clip or lower --num_frames"
            )
        if not same_aspect(video[0].size, condition[0].size):
            raise DataError(
                f"{self._where(index)}: the video is {video[0].width}x{video[0].height} but its "
                f"condition is {condition[0].width}x{condition[0].height}, another aspect ratio; "
                "make the condition from the clip or crop both alike"
            )
        return video, condition, stride

    def __getitem__(self, key) -> dict:
        epoch, index = split_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        index = index % len(self)
        record = self._source.record(self._rows[index])
        caption = self._caption(record, index, epoch)
        video, condition, stride = self.frames(index)
        pixels, conditions = [], []
        for k in range(self.num_frames):
            image, control = video[k * stride], condition[k * stride]
            if image.size != video[0].size or control.size != condition[0].size:
                raise DataError(
                    f"{self._where(index)}: frame {k * stride} differs in size from the first "
                    "frame; every frame of a clip must have one size"
                )
            p, c = pair_to_tensors(
                image, control, self.resolution, channels=self.condition_channels
            )
            pixels.append(p)
            conditions.append(c)
        return {
            "pixel_values": torch.stack(pixels, dim=1),
            "conditioning_pixel_values": torch.stack(conditions, dim=1),
            "caption": caption,
            "index": index,
        }

    def record(self, index: int) -> dict:
        """The metadata row (or dataset row) of item ``index``, as given."""
        return self._source.record(self._rows[index])

    def validate(self, max_items: int | None = None) -> int:
        """Read the first ``max_items`` items (or all); one DataError lists the problems."""
        return validate_items(self, max_items)


__all__ = ["METADATA_FILE", "VideoControlDataset", "read_video"]
