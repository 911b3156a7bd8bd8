"""Dual-branch adapters, one model family per module."""

from ..core.errors import ConfigError
from ..core.branch import Context, DualBranch, Prediction
from .flux import FluxControlNetBranch
from .sd3 import PreconditionedFlowObjective, SD3ControlNetBranch
from .t2i_adapter import T2IAdapterBranch
from .unet import UNetControlNetBranch

# (main-network family, side-network kind) -> branch; `lisa train --side_network` picks the kind.
BRANCHES: dict[tuple[str, str], type[DualBranch]] = {
    ("unet", "controlnet"): UNetControlNetBranch,
    ("unet", "t2i_adapter"): T2IAdapterBranch,
    ("sd3", "controlnet"): SD3ControlNetBranch,
    ("flux", "controlnet"): FluxControlNetBranch,
}


def branch_class(family: str, side_network: str = "controlnet") -> type[DualBranch]:
    """The branch for a main network of ``family`` with a side network of kind ``side_network``."""
    if (family, side_network) not in BRANCHES:
        kinds = sorted(k for f, k in BRANCHES if f == family)
        raise ConfigError(
            f"no {side_network!r} side network for a {family!r} main network; this family "
            f"takes --side_network {' or '.join(kinds) or '(none)'}."
        )
    return BRANCHES[(family, side_network)]


__all__ = [
    "BRANCHES",
    "Context",
    "DualBranch",
    "FluxControlNetBranch",
    "PreconditionedFlowObjective",
    "Prediction",
    "SD3ControlNetBranch",
    "T2IAdapterBranch",
    "UNetControlNetBranch",
    "branch_class",
]
