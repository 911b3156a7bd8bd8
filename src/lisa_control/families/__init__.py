"""Model families, one per file, behind the :class:`Family` interface.

Adding a family is one file (a ``Family`` subclass, its branches and network layouts) plus one
line in the tuple below, or a :func:`register_family` call from your own code.
"""

from ..core.branch import Context, DualBranch, Prediction
from .animatediff import (
    AnimateDiffControlNetBranch,
    AnimateDiffFamily,
    AnimateDiffSparseControlNetBranch,
)
from .base import Family, MainModel
from .flux import FluxControlNetBranch, FluxFamily
from .registry import (
    FAMILIES,
    branch_class,
    family_of_network,
    family_of_pipeline,
    get_family,
    register_family,
    side_network_kinds,
)
from .sd3 import SD3ControlNetBranch, SD3Family
from .t2i_adapter import T2IAdapterBranch
from .unet import UNetControlNetBranch, UNetFamily
from .unet2d import UNet2DFamily
from .wan_vace import WanVACEBranch, WanVACEFamily

for _family in (
    UNetFamily(),
    SD3Family(),
    FluxFamily(),
    UNet2DFamily(),
    AnimateDiffFamily(),
    WanVACEFamily(),
):
    register_family(_family)

__all__ = [
    "AnimateDiffControlNetBranch",
    "AnimateDiffFamily",
    "AnimateDiffSparseControlNetBranch",
    "FAMILIES",
    "Context",
    "DualBranch",
    "Family",
    "FluxControlNetBranch",
    "FluxFamily",
    "MainModel",
    "Prediction",
    "SD3ControlNetBranch",
    "SD3Family",
    "T2IAdapterBranch",
    "UNetControlNetBranch",
    "UNetFamily",
    "WanVACEBranch",
    "WanVACEFamily",
    "branch_class",
    "family_of_network",
    "family_of_pipeline",
    "get_family",
    "register_family",
    "side_network_kinds",
]
