"""The registry of model families: by name, by diffusers pipeline class, by network class."""

from __future__ import annotations

from torch import nn

from ..core.branch import DualBranch
from ..core.errors import ModelError
from .base import Family

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` loadable by name (``lisa_model.json``), by its diffusers pipeline class and
    by its main network's class."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(
            f"unknown model family {name!r}; this version knows {', '.join(sorted(FAMILIES))}. "
            "Register the family (lisa_control.families.register_family) or fix the name."
        )
    return FAMILIES[name]


def family_of_network(network: nn.Module) -> Family:
    """The family whose main network class ``network`` is (the nearest registered base class)."""
    for cls in type(network).__mro__:
        for family in FAMILIES.values():
            if family.network_class is cls:
                return family
    raise ModelError(
        f"{type(network).__name__} is not the main network of a registered family "
        f"({', '.join(sorted(FAMILIES))})."
    )


def family_of_pipeline(class_name: str, default: str = "unet") -> Family:
    """The family that loads a diffusers pipeline of ``class_name`` (``model_index.json``)."""
    for family in FAMILIES.values():
        if class_name.startswith(family.pipeline_prefixes or ("\0",)):
            return family
    return get_family(default)


def branch_class(family: str | Family, side_network: str = "controlnet") -> type[DualBranch]:
    """The branch for a main network of ``family`` with a side network of kind ``side_network``."""
    family = get_family(family) if isinstance(family, str) else family
    return family.branch(side_network)


def side_network_kinds() -> list[str]:
    """Every ``--side_network`` kind some registered family takes."""
    return sorted({kind for family in FAMILIES.values() for kind in family.side_networks})


