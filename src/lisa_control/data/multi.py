"""Training data with several conditions per image, for side networks trained together.

An item of a multi-condition dataset is the single-condition item with one change:
``conditioning_pixel_values`` is a mapping condition name -> (C, R, R) tensor in [0, 1] (collated
into a mapping of batches), and the dataset lists the names in ``condition_names``, the order of
the side networks. Single-condition datasets keep a tensor there and have no (or one) name, so
their code paths are untouched.

Two sources: a folder with ``metadata.jsonl`` naming several condition columns
(:class:`MultiConditionDataset`, ``--conditioning_image_column pose seg``; the names are the
column names), and procedural tasks that render several conditions
(:func:`select_task_conditions`).
"""

from __future__ import annotations

import difflib

from ..core.errors import ConfigError, DataError
from .folder import _CROP_STREAM, ControlDataset, _file_label
from .images import pair_to_tensors, same_aspect
from .sampler import split_key

# ``lisa train``'s default --conditioning_image_column: for a task with several conditions it
# selects all of them.
DEFAULT_COLUMN = "conditioning_image"


class MultiConditionDataset(ControlDataset):
    """A :class:`~lisa_control.data.folder.ControlDataset` whose rows name several condition
    images, ``conditioning_image_columns`` (at least two, their order the networks' order).
    Every condition goes through the crop of its image (the same box for all), and each must
    have its image's aspect ratio. Other arguments are the single-condition dataset's."""

    def __init__(self, source, *, conditioning_image_columns, **kwargs):
        columns = [str(c) for c in conditioning_image_columns]
        if len(columns) < 2 or len(set(columns)) != len(columns):
            raise ConfigError(
                "several conditions need at least two different --conditioning_image_column "
                f"names, got {', '.join(columns)}."
            )
        self.condition_names = tuple(columns)
        super().__init__(source, conditioning_image_column=columns[0], **kwargs)

    @property
    def _image_columns(self) -> list[str]:
        return [self.image_column, *self.condition_names]

    def _check_columns(self) -> None:
        super()._check_columns()
        present = self._source.columns()
        for column in self.condition_names[1:]:
            if column not in present:
                close = difflib.get_close_matches(column, present, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(
                    f"{self._source.name} has no column {column!r} for condition images{hint}; "
                    f"its columns are: {', '.join(present)}; fix --conditioning_image_column"
                )

    def __getitem__(self, key):
        item = super().__getitem__(key)
        epoch, index = split_key(key)
        index = index % len(self)
        record = self._source.record(self._rows[index])
        image = self._image(record, index, self.image_column, "image")
        conditions = {self.condition_names[0]: item["conditioning_pixel_values"]}
        for column in self.condition_names[1:]:
            condition = self._image(record, index, column, "condition")
            if not same_aspect(image.size, condition.size):
                raise DataError(
                    f"{self._where(index)}: the image {_file_label(record, self.image_column)} is "
                    f"{image.width}x{image.height} but its condition "
                    f"{_file_label(record, column)} is {condition.width}x{condition.height}, a "
                    "different aspect ratio; make the condition from this image or crop both "
                    "alike"
                )
            # The crop stream restarts per condition, so each gets its image's box.
            crop_rng = self._rng(index, _CROP_STREAM) if self.random_crop else None
            _, tensor = pair_to_tensors(
                image, condition, self.resolution, channels=self.condition_channels, rng=crop_rng
            )
            conditions[column] = tensor
        item["conditioning_pixel_values"] = conditions
        return item


def condition_columns(value) -> list[str]:
    """``--conditioning_image_column`` as a list (one name or several)."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


def select_task_conditions(task, columns):
    """The view of ``task`` that renders the conditions ``columns`` names. A task with one
    condition ignores the column (as before); a task with several (``condition_names``) takes
    all of them for the default column, else the ones named."""
    names = getattr(task, "condition_names", ())
    if not names:
        return task
    columns = condition_columns(columns)
    if columns == [DEFAULT_COLUMN]:
        return task.with_conditions(names)
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise ConfigError(
            f"task {task.name!r} renders the conditions {', '.join(names)}; "
            f"--conditioning_image_column {' '.join(columns)} names {', '.join(unknown)}."
        )
    return task.with_conditions(columns)
