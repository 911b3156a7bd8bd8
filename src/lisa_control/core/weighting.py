"""Noise-level weightings of the diffusion loss: the same regression, weighted per sample by t.

Every objective predicts a target y (noise eps, velocity v, flow velocity u) from which the clean
sample follows affinely, x0_hat - x0 = -j_t (y_hat - y), with the objective's Jacobian j_t
(``Objective.x0_scale``): sigma_t / alpha_t for eps, sigma_t for v, s for rectified flow. A
weighting multiplies each sample's mean squared error in y by w_t:

* ``none``:    w_t = 1 (the diffusers ControlNet scripts and the LISA authors);
* ``x0``:      w_t = min(j_t^2, w_max): the loss of the implied clean sample, ||x0_hat - x0||^2,
               with the weight capped so that the noisiest levels (j_t -> inf for eps) stay finite;
* ``min_snr``: w_t = min(SNR_t, gamma) j_t^2: Min-SNR-gamma (Hang et al. 2023) as diffusers'
               ``--snr_gamma`` computes it, i.e. min(SNR, gamma) / SNR for eps and
               min(SNR, gamma) / (SNR + 1) for v; for flow SNR_s = ((1 - s) / s)^2.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

WEIGHTINGS = ("none", "x0", "min_snr")


class LossWeighting:
    """Per-sample loss weights w_t for ``objective`` at ``timesteps``, shaped (B, 1, ..., 1)."""

    name = "none"

    def __call__(self, objective, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(like.shape[0], *([1] * (like.ndim - 1)), device=like.device)


class X0Weighting(LossWeighting):
    """w_t = min(j_t^2, max_weight): the regression of the implied x0, capped."""

    name = "x0"

    def __init__(self, max_weight: float = 5.0):
        _check_positive("x0 weight cap (--x0_weight_max)", max_weight)
        self.max_weight = float(max_weight)

    def __call__(self, objective, timesteps, like):
        return objective.x0_scale(timesteps, like).pow(2).clamp(max=self.max_weight)


class MinSNRWeighting(LossWeighting):
    """w_t = min(SNR_t, gamma) j_t^2 (Min-SNR-gamma, expressed in the prediction's space)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        _check_positive("Min-SNR gamma (--snr_gamma)", gamma)
        self.gamma = float(gamma)

    def __call__(self, objective, timesteps, like):
        snr = objective.snr(timesteps, like)
        return snr.clamp(max=self.gamma) * objective.x0_scale(timesteps, like).pow(2)


def make_weighting(name: str = "none", snr_gamma: float = 5.0, x0_weight_max: float = 5.0):
    """A weighting by name: ``none``, ``x0`` or ``min_snr``."""
    if name == "none" or name is None:
        return None
    if name == "x0":
        return X0Weighting(x0_weight_max)
    if name == "min_snr":
        return MinSNRWeighting(snr_gamma)
    raise ConfigError(f"unknown loss weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}.")


def _check_positive(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}.")
