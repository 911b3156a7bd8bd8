"""The control tasks of the embedded default, by name.

Procedural tasks (``pose``, ``edges``, ``segmentation``, ``super_resolution``,
``pose_segmentation`` with two conditions per image, and the video task ``pose_video``) render
seeded samples on the fly and need no files; the tasks of :mod:`lisa_control.data.packaged` read
images that OS packages install. Every task scores generated images with a deterministic metric.
"""

from __future__ import annotations

from .base import ProceduralTask, TaskDataset, TaskSample
from .registry import available_tasks, get_task, register_task

# The task modules, procedural and packaged, register themselves on import.
from .. import packaged  # noqa: E402, F401
from . import edges, pose, pose_video, segmentation, super_resolution  # noqa: E402, F401
from . import pose_segmentation  # noqa: E402, F401

__all__ = [
    "ProceduralTask",
    "TaskDataset",
    "TaskSample",
    "available_tasks",
    "get_task",
    "register_task",
]
