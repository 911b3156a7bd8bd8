"""Per-image PSNR and SSIM for restoration benchmarks, in torch.

Images are (B, C, H, W) in [-1, 1]; both metrics are computed on the [0, 1] scale.

    PSNR = 10 log10(1 / MSE)

    SSIM = mean over windows of (2 mu_x mu_y + C1)(2 cov_xy + C2)
                                / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))

with the statistics of an 11 x 11 Gaussian window (std 1.5; smaller for images under 11
pixels) taken at every valid position of each channel, C1 = 0.01^2, C2 = 0.03^2, and the mean
over positions and channels (Wang et al. 2004, as scikit-image's ``gaussian_weights=True``
with ``use_sample_covariance=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError

C1, C2 = 0.01**2, 0.03**2


def _unit(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ConfigError(f"expected images (B, C, H, W), got {tuple(images.shape)}.")
    return (images.detach().double().clamp(-1, 1) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """(B,) PSNR in dB between two batches in [-1, 1] (identical images: ``max_db``)."""
    a, b = _unit(a), _unit(b)
    mse = (a - b).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(10 ** (-max_db / 10)))).float()


def gaussian_window(size: int = 11, std: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / std) ** 2)
    w = w / w.sum()
    return w[:, None] * w[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11, std: float = 1.5) -> torch.Tensor:
    """(B,) mean SSIM between two batches in [-1, 1] (see the module docstring)."""
    if a.shape != b.shape:
        raise ConfigError(
            f"SSIM needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a, b = _unit(a), _unit(b)
    size = min(window_size, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    window = gaussian_window(size, std * size / window_size).to(a.device)
    channels = a.shape[1]
    kernel = window.expand(channels, 1, size, size)

    def filt(x):
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
    s = numerator / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))
    return s.flatten(1).mean(1).float()
