"""Checkpoint series for ``lisa eval --checkpoints``: finding the side networks of a run's
``checkpoint-N`` folders, and the metric-vs-step curve with its steps-to-threshold."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CheckpointError
from ..training.checkpoint import PREFIX, SIDE_DIR, STATE_FILE

_STEP = re.compile(rf"^{re.escape(PREFIX)}(\d+)$")


@dataclass
class SideNetworkAt:
    """A side network folder and the training step it was saved at (None: not a checkpoint)."""

    path: Path
    step: int | None = None
    checkpoint: Path | None = None


def find_checkpoints(patterns: list[str]) -> list[SideNetworkAt]:
    """The side networks of the complete ``checkpoint-N`` folders matched by ``patterns``
    (globs such as ``out/checkpoint-*``, checkpoint folders, or a run's output folder, which
    stands for all its checkpoints), in step order without repeats. A checkpoint is complete
    when it holds its trainer state; others are being written or were cut short."""
    found: dict[Path, int] = {}
    matched_any = False
    for pattern in patterns:
        paths = [Path(p) for p in sorted(glob.glob(str(Path(pattern).expanduser())))]
        expanded = []
        for path in paths:
            if path.is_dir() and not _STEP.match(path.name):
                expanded += sorted(path.glob(f"{PREFIX}*"))  # a run's output folder
            else:
                expanded.append(path)
        for path in expanded:
            match = _STEP.match(path.name)
            if not (match and path.is_dir()):
                continue
            matched_any = True
            if (path / STATE_FILE).is_file() and (path / SIDE_DIR).is_dir():
                found[path.resolve()] = int(match.group(1))
    if not found:
        shown = " ".join(repr(p) for p in patterns)
        what = (
            "matches checkpoint folders but none is complete (no trainer_state.json or "
            f"{SIDE_DIR}/)"
            if matched_any
            else f"matches no {PREFIX}N folder"
        )
        raise CheckpointError(
            f"--checkpoints {shown} {what}; pass e.g. --checkpoints 'OUTPUT_DIR/{PREFIX}*' "
            "(quoted) for the checkpoints of a `lisa train` run"
        )
    ordered = sorted(found.items(), key=lambda item: (item[1], str(item[0])))
    return [SideNetworkAt(path / SIDE_DIR, step, path) for path, step in ordered]


def steps_to_threshold(
    points: list[tuple[int, float]], threshold: float | None, higher_is_better: bool = True
) -> int | None:
    """The first step whose value reaches ``threshold`` (>= it, or <= it when lower is
    better); None if no point does or there is no threshold."""
    if threshold is None:
        return None
    for step, value in points:
        if value is None:
            continue
        if (value >= threshold) if higher_is_better else (value <= threshold):
            return step
    return None


def plot_curve(
    points: list[tuple[int, float]],
    metric: str,
    path: Path,
    threshold: float | None = None,
    reached: int | None = None,
) -> None:
    """``metric`` against step, with the threshold line and the step that reached it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [s for s, v in points if v is not None]
    values = [v for _, v in points if v is not None]
    ax.plot(steps, values, marker="o")
    if threshold is not None:
        ax.axhline(
            threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}"
        )
    if reached is not None:
        ax.axvline(reached, color="tab:green", linestyle=":", label=f"reached at step {reached}")
    if threshold is not None or reached is not None:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
