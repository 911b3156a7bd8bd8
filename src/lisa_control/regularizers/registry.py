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
    """The regularizers ``names`` (``"none"`` selects nothing) for ``branch``; for a branch with
    several side networks (``side_branches``), each one built per side network
    (:class:`~lisa_control.regularizers.per_network.PerSideNetwork`)."""
    from .per_network import PerSideNetwork

    side_branches = getattr(branch, "side_branches", None)
    regularizers = []
    for name in names:
        if name == "none":
            continue
        if name not in REGULARIZERS:
            raise ConfigError(
                f"unknown regularizer {name!r}; choose from none, {', '.join(sorted(REGULARIZERS))}."
            )
        builder = REGULARIZERS[name]
        if side_branches is not None:
            parts = {side: builder(b, sample_size, settings) for side, b in side_branches.items()}
            regularizers.append(PerSideNetwork(parts))
        else:
            regularizers.append(builder(branch, sample_size, settings))
    return regularizers
