"""Dual-branch adapters, one model family per module."""

from .base import Context, DualBranch, Prediction
from .unet_controlnet import UNetControlNetBranch

__all__ = ["Context", "DualBranch", "Prediction", "UNetControlNetBranch"]
