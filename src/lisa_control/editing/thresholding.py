"""The two range constraints of CODE: confidence-based clipping of x_t while encoding, and dynamic
thresholding of the predicted x0 while correcting and decoding.

Both are written for a sample x_t = alpha_t x0 + sigma_t eps whose clean part lies in [-B, B]:
B = 1 for images in [-1, 1] (pixel-space models), a user-given bound for VAE latents (see
:mod:`lisa_control.editing.code`). The schedules plug in as

    DDPM (variance preserving):  alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)
    rectified flow:              alpha_s = 1 - s,         sigma_s = s
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError

# CODE's defaults: eta_c = 1.7 for the clipping; quantile 0.98 and a largest scale of 1.3 for the
# thresholding.
DEFAULT_ETA = 1.7
DEFAULT_THRESHOLD = (0.98, 1.3)


def confidence_bound(alpha, sigma, eta: float = DEFAULT_ETA, data_bound: float = 1.0):
    """The half-width of CODE's confidence interval for x_t:

        bound_t = B alpha_t + eta sigma_t

    For |x0| <= B and eps ~ N(0, 1) every coordinate of x_t lies within it with probability at
    least P(|eps| <= eta) (95% for eta = 2). DDPM: sqrt(abar_t) + eta sqrt(1 - abar_t); flow:
    (1 - s) + eta s (with B = 1).
    """
    return data_bound * alpha + eta * sigma


def confidence_clip(
    x: torch.Tensor, alpha, sigma, eta: float = DEFAULT_ETA, data_bound: float = 1.0
) -> torch.Tensor:
    """Confidence-based clipping: x_t <- clamp(x_t, -bound_t, +bound_t) (no quantile)."""
    bound = float(confidence_bound(alpha, sigma, eta, data_bound))
    return x.clamp(-bound, bound)


def dynamic_threshold(
    x0: torch.Tensor,
    quantile: float = DEFAULT_THRESHOLD[0],
    max_value: float = DEFAULT_THRESHOLD[1],
    data_bound: float = 1.0,
) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted x0, per sample:

        s  = min(max(quantile_p(|x0 / B|), 1), max_value)
        x0 <- B clamp(x0 / B, -s, s) / s

    A sample whose values stay within [-B, B] up to the p-quantile is clipped to [-B, B] (s = 1);
    one that saturates is clipped at its quantile (at most ``max_value`` B) and scaled back into
    [-B, B]. The quantile is computed in fp32 over all channels and pixels of each sample.
    """
    dtype = x0.dtype
    scaled = x0.float() / data_bound
    flat = scaled.reshape(scaled.shape[0], -1)
    s = torch.quantile(flat.abs(), quantile, dim=1).clamp(min=1.0, max=max_value)
    s = s.reshape(-1, *([1] * (scaled.ndim - 1)))
    return (data_bound * torch.maximum(torch.minimum(scaled, s), -s) / s).to(dtype)


def check_threshold(threshold) -> tuple[float, float]:
    """``(quantile, max_value)`` as floats, or a ConfigError naming the valid ranges."""
    try:
        quantile, max_value = (float(v) for v in threshold)
    except (TypeError, ValueError):
        raise ConfigError(
            f"threshold must be (quantile, max_value), e.g. (0.98, 1.3); got {threshold!r}."
        ) from None
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"the threshold quantile must be in (0, 1], got {quantile}.")
    if not max_value >= 1.0:
        raise ConfigError(f"the threshold max_value must be >= 1, got {max_value}.")
    return quantile, max_value
