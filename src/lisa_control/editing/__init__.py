"""Restoration and editing with a pretrained diffusion or flow model: CODE (Confident Ordinary
Differential Editing) and the SDEdit baseline, a corruption suite for benchmarks, and PSNR/SSIM.

    from lisa_control.editing import code_edit, load_edit_model

    model = load_edit_model("embedded:pose")
    restored = code_edit(model, images, t0=0.5, generator=torch.Generator().manual_seed(0))

``images`` are (B, 3, H, W) in [-1, 1]; see :mod:`lisa_control.editing.code` for the algorithm.
"""

from .code import (
    METHODS,
    check_settings,
    code_edit,
    decode,
    invert,
    langevin,
    langevin_schedule,
    langevin_step,
    sdedit,
    step_scale,
)
from .corruptions import CORRUPTIONS, available_corruptions, corrupt
from .denoiser import Denoiser, TimeGrid
from .metrics import psnr, ssim
from .models import load_edit_model, make_denoiser
from .thresholding import confidence_bound, confidence_clip, dynamic_threshold

__all__ = [
    "CORRUPTIONS",
    "METHODS",
    "Denoiser",
    "TimeGrid",
    "available_corruptions",
    "check_settings",
    "code_edit",
    "confidence_bound",
    "confidence_clip",
    "corrupt",
    "decode",
    "dynamic_threshold",
    "invert",
    "langevin",
    "langevin_schedule",
    "langevin_step",
    "load_edit_model",
    "make_denoiser",
    "psnr",
    "sdedit",
    "ssim",
    "step_scale",
]
