"""The control tasks of the embedded default, by name.

Procedural tasks (``pose``, ``edges``, ``segmentation``, ``super_resolution``) render seeded
samples on the fly and need no files; the tasks of :mod:`lisa_control.data.packaged` read images
that OS packages install. Every task scores generated images with a deterministic metric.
"""

from __future__ import annotations

from ...core.errors import ConfigError
from .base import ProceduralTask, TaskDataset, TaskSample

_TASKS: dict[str, type[ProceduralTask]] = {}


def register_task(cls: type[ProceduralTask]) -> type[ProceduralTask]:
    """Class decorator that makes a task available to :func:`get_task` under ``cls.name``."""
    known = _TASKS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"task name {cls.name!r} is taken by {known.__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, resolution: int = 32, **kwargs) -> ProceduralTask:
    """A new instance of the task called ``name`` at ``resolution`` pixels square."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(available_tasks())}.")
    return _TASKS[name](resolution=resolution, **kwargs)


# The task modules, procedural and packaged, register themselves on import, with the
# register_task defined above.
from .. import packaged  # noqa: E402, F401
from . import edges, pose, segmentation, super_resolution  # noqa: E402, F401

__all__ = [
    "ProceduralTask",
    "TaskDataset",
    "TaskSample",
    "available_tasks",
    "get_task",
    "register_task",
]
