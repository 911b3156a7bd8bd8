"""Videos out of tensors and in from files, for ``lisa sample`` and validation of video models.

Outputs: an animated GIF (PIL) whose every frame is a grid (one row per condition: condition |
samples [| ground truth]), and a frame sheet, a PNG with one line per video of that grid, its
frames side by side. Inputs: condition videos for ``lisa sample`` (video files, animated GIFs,
or a ``metadata.jsonl`` whose condition-video column names files or frame folders), read with
:func:`lisa_control.data.video_folder.read_video` and cut like the training frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import DataError
from .images import image_grid, to_uint8

DEFAULT_FPS = 8


def video_to_uint8(videos: torch.Tensor, signed: bool = True) -> np.ndarray:
    """(N, C, F, H, W) in [-1, 1] (or [0, 1] with signed=False) -> (N, F, H, W, 3) uint8."""
    n, c, f, h, w = videos.shape
    frames = to_uint8(videos.detach().permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w), signed)
    return frames.reshape(n, f, h, w, 3)


def frame_sheet(rows: list[list[np.ndarray]]) -> Image.Image:
    """One line per video (F, H, W, 3) of ``rows`` (a list per condition), frames side by side."""
    return image_grid([list(video) for row in rows for video in row])


def animated_grid(rows: list[list[np.ndarray]]) -> list[Image.Image]:
    """Frame f of the animation: the grid of frame f of every video of ``rows``."""
    count = min(video.shape[0] for row in rows for video in row)
    return [image_grid([[video[f] for video in row] for row in rows]) for f in range(count)]


def save_gif(frames: list[Image.Image], path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """An endlessly looping GIF of ``frames`` at ``fps`` frames per second."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = max(20, round(1000 / fps))
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=duration, loop=0, optimize=False
    )
    return path


def write_animation(
    rows: list[list[np.ndarray]], gif: str | Path, sheet: str | Path, fps: float = DEFAULT_FPS
) -> tuple[Path, Path]:
    """The animated grid of ``rows`` to ``gif`` and its frame sheet to ``sheet``."""
    gif = save_gif(animated_grid(rows), gif, fps)
    sheet = Path(sheet)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    frame_sheet(rows).save(sheet)
    return gif, sheet


# ----------------------------------------------------------------------------- condition videos


@dataclass
class ConditionVideo:
    """One condition video of ``lisa sample``: its frames, prompt (``None``: none given) and the
    stem its samples are saved under."""

    frames: list[Image.Image]
    prompt: str | None
    name: str


def _metadata_file(source: Path) -> Path | None:
    if source.is_file() and source.name == "metadata.jsonl":
        return source
    if source.is_dir() and (source / "metadata.jsonl").is_file():
        return source / "metadata.jsonl"
    return None


def names_videos(sources: list[str], column: str = "conditioning_video") -> bool:
    """Whether ``lisa sample``'s condition sources are videos: a video file, an animated GIF or
    WebP, or a metadata.jsonl whose rows have the condition-video ``column``."""
    from ..data.video_folder import ANIMATED_SUFFIXES, VIDEO_SUFFIXES

    for source in map(Path, sources):
        metadata = _metadata_file(source)
        if metadata is not None:
            for line in metadata.read_text(encoding="utf-8-sig").splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # the image reader reports it
                    if isinstance(row, dict) and column in row:
                        return True
                    break
            continue
        suffix = source.suffix.lower()
        if source.is_file() and suffix in VIDEO_SUFFIXES:
            return True
        if source.is_file() and suffix in ANIMATED_SUFFIXES:
            try:
                with Image.open(source) as image:
                    if getattr(image, "n_frames", 1) > 1:
                        return True
            except (OSError, ValueError):
                continue
    return False


def read_condition_videos(
    sources: list[str], column: str = "conditioning_video", caption_column: str | None = "text"
) -> list[ConditionVideo]:
    """The condition videos named by ``sources``: video files and animated images, or the rows
    of a metadata.jsonl (``column`` names a file or a frame folder, relative to it, and
    ``caption_column`` the prompt). Names are the files' stems, made unique."""
    from ..data.video_folder import read_video
    from .conditions import unique_names

    videos: list[tuple[list[Image.Image], str | None, str]] = []
    for source in map(Path, sources):
        metadata = _metadata_file(source)
        if metadata is None:
            if not source.exists():
                raise DataError(f"condition video {source} does not exist")
            frames, _ = read_video(source)
            videos.append((frames, None, source.stem))
            continue
        for number, line in enumerate(metadata.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            where = f"line {number} of {metadata}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise DataError(f"{where} has no '{column}' path; add the condition video's path")
            try:
                frames, _ = read_video(metadata.parent / row[column])
            except DataError as err:
                raise DataError(f"{where}, column '{column}': {err}") from err
            prompt = row.get(caption_column) if caption_column else None
            if isinstance(prompt, list) and prompt:
                prompt = prompt[0]
            videos.append(
                (frames, prompt if isinstance(prompt, str) else None, Path(row[column]).stem)
            )
    names = unique_names([name for _, _, name in videos])
    return [
        ConditionVideo(frames, prompt, name) for (frames, prompt, _), name in zip(videos, names)
    ]


def condition_video_tensors(
    videos: list[ConditionVideo], resolution: int, channels: int, num_frames: int | None = None
) -> torch.Tensor:
    """(N, channels, F, R, R) in [0, 1]: the first ``num_frames`` frames (default all, the same
    count for every video) of each, each frame cut as a training condition (shorter side to R,
    centre crop)."""
    from ..data.images import to_condition_tensor

    counts = {len(v.frames) for v in videos}
    frames = num_frames or min(counts)
    if num_frames is None and len(counts) > 1:
        raise DataError(
            f"the condition videos have different frame counts ({sorted(counts)}); pass "
            "--num_frames to take the same number from each"
        )
    short = [v.name for v in videos if len(v.frames) < frames]
    if short:
        raise DataError(
            f"condition video {short[0]} has fewer than the {frames} frames asked; lower "
            "--num_frames"
        )
    return torch.stack(
        [
            torch.stack(
                [to_condition_tensor(f, resolution, channels) for f in v.frames[:frames]], 1
            )
            for v in videos
        ]
    )
