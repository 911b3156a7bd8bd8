"""``lisa train``'s ``--output_dir``, checked before any model loads: it can be written, it holds
no earlier run unless that run is resumed (``--resume_from_checkpoint``) or replaced
(``--overwrite_output_dir``), and the checkpoint a resume starts from can be read.

The trainer's files, which make a folder hold a run and are all that ``--overwrite_output_dir``
deletes: ``checkpoint-N/`` (and the ``.tmp-``/``.stale-`` folders and ``.*.tmp`` files of
interrupted writes), ``loss_log.jsonl``, ``loss_log.rankN.jsonl``, ``validation.jsonl``,
``validation/step-N.png``, ``controlnet/``, ``config.json`` and the tracker's folder
``<logging_dir>/<tracker_project_name>`` (when it lies inside the output folder). Any other file
in the folder is the user's and stays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..core.errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from .config import TrainConfig

_RUN_FILES = ("loss_log.jsonl", "validation.jsonl", "config.json")
_RANK_LOG = re.compile(r"loss_log\.rank\d+\.jsonl")
_VALIDATION_IMAGE = re.compile(r"step-\d+\.png")


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse, in one line, an output folder this run cannot use (see the module's text)."""
    out = Path(cfg.output_dir)
    check_writable(out)
    if cfg.resume_from_checkpoint:
        check_resume_checkpoint(out, cfg.resume_from_checkpoint)
        return
    found = run_files(out, cfg)
    if found and not cfg.overwrite_output_dir:
        names = [p.relative_to(out).as_posix() + ("/" if p.is_dir() else "") for p in found]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(
            f"--output_dir {cfg.output_dir!r} holds an earlier run ({shown}); continue it with "
            "--resume_from_checkpoint latest, replace it with --overwrite_output_dir (deletes "
            "that run's files, keeps yours), or choose another --output_dir."
        )


def check_writable(out: Path) -> None:
    """The folder, or its nearest existing parent when it is still to be made, is a folder this
    process may create files in."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"--output_dir {str(out)!r} cannot be created: {str(existing)!r} is a file, not a "
            "folder; choose an --output_dir whose parents are folders."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == out else f"its parent {str(existing)!r}"
        raise ConfigError(
            f"--output_dir {str(out)!r} cannot be written: {where} is not writable by this user; "
            "choose a writable --output_dir or change the folder's permissions."
        )


def check_resume_checkpoint(out: Path, resume_from: str) -> None:
    """The checkpoint ``resume_from`` names can be read; else name its unreadable file and the
    checkpoints of ``out`` that can be."""
    path = ckpt.resolve_resume_path(out, resume_from)
    if path is None:
        return
    problem = ckpt.checkpoint_problem(path)
    if problem is None:
        return
    others = [c for c in ckpt.list_checkpoints(out) if c != path]
    good = [c.name for c in others if ckpt.checkpoint_problem(c) is None]
    if good:
        fix = (
            f"resume from an earlier one, e.g. --resume_from_checkpoint {good[-1]} (these load: "
            f"{', '.join(good)}), or delete {path} and resume from latest"
        )
    else:
        fix = (
            f"no other checkpoint in {str(out)!r} loads; delete {path} and resume from latest, "
            "or start afresh with --overwrite_output_dir instead of --resume_from_checkpoint"
        )
    raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {fix}.")


def run_files(out: Path, cfg: TrainConfig) -> list[Path]:
    """The trainer's files in ``out`` (see the module's text), sorted by name."""
    if not out.is_dir():
        return []
    found = []
    for path in out.iterdir():
        name = path.name
        suffix = name[len(ckpt.PREFIX) :] if name.startswith(ckpt.PREFIX) else ""
        if path.is_dir() and suffix.isdigit():
            found.append(path)
        elif name.startswith((f".tmp-{ckpt.PREFIX}", f".stale-{ckpt.PREFIX}")):
            found.append(path)
        elif name.startswith((".loss_log.", ".validation.")) and name.endswith(".tmp"):
            found.append(path)  # a log truncation a kill interrupted
        elif path.is_file() and (name in _RUN_FILES or _RANK_LOG.fullmatch(name)):
            found.append(path)
        elif name == "controlnet" and path.is_dir():
            found.append(path)
        elif name == "validation" and path.is_dir():
            found += [p for p in path.iterdir() if _VALIDATION_IMAGE.fullmatch(p.name)]
    for tracker in _tracker_folders(out, cfg):
        if tracker.is_dir():
            found.append(tracker)
    return sorted(set(found), key=_in_step_order)


def _in_step_order(path: Path) -> tuple:
    """checkpoint-2 before checkpoint-10, then the rest by name."""
    suffix = path.name[len(ckpt.PREFIX) :]
    step = int(suffix) if path.name.startswith(ckpt.PREFIX) and suffix.isdigit() else None
    return (step is None, step or 0, str(path))


def clear_run(out: Path, cfg: TrainConfig) -> None:
    """Delete the trainer's files from ``out``, and the ``validation`` and logging folders
    they leave empty; nothing else."""
    for path in run_files(out, cfg):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in [out / "validation", *(t.parent for t in _tracker_folders(out, cfg))]:
        if folder.is_dir() and folder != out and not any(folder.iterdir()):
            folder.rmdir()


def _tracker_folders(out: Path, cfg: TrainConfig) -> list[Path]:
    """Where the tracker writes (``<logging_dir>/<project>``) under this run's settings and
    under the earlier run's ``config.json``; only folders inside ``out``."""
    settings = [(cfg.logging_dir, cfg.tracker_project_name)]
    try:
        earlier = json.loads((out / "config.json").read_text())
        settings.append((earlier["logging_dir"], earlier["tracker_project_name"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    root = out.resolve()
    folders = []
    for logging_dir, project in settings:
        if not isinstance(logging_dir, str) or not isinstance(project, str) or not project:
            continue
        folder = out / logging_dir / project
        resolved = folder.resolve()
        if resolved != root and root in resolved.parents and folder not in folders:
            folders.append(folder)
    return folders
