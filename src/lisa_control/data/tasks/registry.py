"""The registry of tasks: name -> task class, filled by each task module as it is imported."""

from __future__ import annotations

import inspect

from ...core.errors import ConfigError
from .base import ProceduralTask

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


def task_class(name: str) -> type[ProceduralTask] | None:
    """The class registered as ``name`` (None if there is none), without building the task."""
    return _TASKS.get(name)


def get_task(name: str, resolution: int = 32, **kwargs) -> ProceduralTask:
    """A new instance of the task called ``name`` at ``resolution`` pixels square; ``kwargs``
    are the task's own settings (``frames`` for video tasks)."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(available_tasks())}.")
    accepted = inspect.signature(_TASKS[name].__init__).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"task {name!r} has no setting {', '.join(unknown)} (e.g. frames is for video tasks "
            "such as pose_video)."
        )
    return _TASKS[name](resolution=resolution, **kwargs)
