"""Regularizers by name, as ``--regularizer lisa layersync`` selects them.

A builder takes the dual branch, the sample's spatial size and the run's settings (a mapping
of flag names to values: each regularizer reads its own ``<name>_*`` keys) and returns a
:class:`~lisa_control.regularizers.base.Regularizer`. Adding a regularizer is one file with its
builder plus one :func:`register_regularizer` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..core.errors import ConfigError
from .base import Regularizer

RegularizerBuilder = Callable[[Any, int, Mapping[str, Any]], Regularizer]

REGULARIZERS: dict[str, RegularizerBuilder] = {}


def register_regularizer(name: str, builder: RegularizerBuilder) -> RegularizerBuilder:
    REGULARIZERS[name] = builder
    return builder


def build_regularizers(
    names, branch, sample_size: int, settings: Mapping[str, Any]
) -> list[Regularizer]:
    """The regularizers ``names`` (``"none"`` selects nothing) for ``branch``."""
    regularizers = []
    for name in names:
        if name == "none":
            continue
        if name not in REGULARIZERS:
            raise ConfigError(
                f"unknown regularizer {name!r}; choose from none, {', '.join(sorted(REGULARIZERS))}."
            )
        regularizers.append(REGULARIZERS[name](branch, sample_size, settings))
    return regularizers
