"""Dual-branch adapters, one model family per module."""

from .base import Context, DualBranch, Prediction
from .flux_controlnet import FluxControlNetBranch
from .sd3_controlnet import PreconditionedFlowObjective, SD3ControlNetBranch
from .t2i_adapter import T2IAdapterBranch
from .unet_controlnet import UNetControlNetBranch

__all__ = [
    "Context",
    "DualBranch",
    "FluxControlNetBranch",
    "PreconditionedFlowObjective",
    "Prediction",
    "SD3ControlNetBranch",
    "T2IAdapterBranch",
    "UNetControlNetBranch",
]
