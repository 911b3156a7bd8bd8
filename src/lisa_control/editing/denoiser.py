"""One view of every model that editing needs: a network output at a time on a grid, turned into
(x0-hat, eps-hat) under the model's parametrization.

Each grid point j has coefficients (alpha_j, sigma_j) with x_j = alpha_j x0 + sigma_j eps:

    DDPM (alphas_cumprod):  alpha = sqrt(abar_t),  sigma = sqrt(1 - abar_t),  timestep t (integer)
    rectified flow:         alpha = 1 - s,         sigma = s,                 timestep 1000 s

and the network output y becomes (x0-hat, eps-hat) by

    epsilon:       eps = y,                    x0 = (x - sigma eps) / alpha
    v_prediction:  eps = sigma x + alpha y,    x0 = alpha x - sigma y
    sample:        x0 = y,                     eps = (x - alpha x0) / sigma
    flow (u):      eps = x + alpha u,          x0 = x - sigma u

Point 0 of a grid is the clean end (alpha = 1, sigma = 0); the network is never evaluated there.
A deterministic step from point j to point k is DDIM's, x_k = alpha_k x0-hat + sigma_k eps-hat,
which for rectified flow is the Euler step x_k = x_j + (s_k - s_j) u of the flow ODE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError, ModelError
from .thresholding import dynamic_threshold

PARAMETRIZATIONS = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class TimeGrid:
    """Grid points 0..n from the clean end to the chosen latent time ``t0``.

    ``timesteps[j]`` is what the network is given at point j (unused at j = 0); ``alpha`` and
    ``sigma`` are float64 (n + 1,) tensors; ``t0`` is the latent time as a fraction of the
    diffusion (DDPM: t / T, flow: s).
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    t0: float

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1


def check_t0(t0) -> float:
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not 0.0 < float(t0) <= 1.0:
        raise ConfigError(
            f"t0 must be in (0, 1] (the latent time as a fraction of the diffusion, e.g. 0.5), "
            f"got {t0!r}."
        )
    return float(t0)


def check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ConfigError(f"num_inference_steps must be an integer, got {num_inference_steps!r}.")
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    return num_inference_steps


class Denoiser:
    """A network's prediction under its parametrization, on a :class:`TimeGrid`.

    Args:
        predict: ``predict(x_t, timesteps)`` -> the raw network output (B, C, H, W); timesteps
            is a (B,) tensor (integer for DDPM, 1000 s for flow).
        parametrization: ``epsilon``, ``v_prediction``, ``sample`` (DDPM-family schedules) or
            ``flow`` (rectified flow, velocity u = eps - x0).
        alphas_cumprod: the training schedule's abar_t, required unless ``flow``.
        num_train_timesteps: T; flow timesteps are T s.
    """

    def __init__(
        self,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        parametrization: str,
        alphas_cumprod: torch.Tensor | None = None,
        num_train_timesteps: int = 1000,
    ):
        if parametrization not in PARAMETRIZATIONS:
            raise ConfigError(
                f"cannot edit with a {parametrization!r} model; supported: "
                f"{', '.join(PARAMETRIZATIONS)}."
            )
        if parametrization != "flow" and alphas_cumprod is None:
            raise ModelError(
                f"a {parametrization} model needs its scheduler's alphas_cumprod (a DDPM-family "
                "scheduler)."
            )
        self.predict = predict
        self.parametrization = parametrization
        self.alphas_cumprod = (
            None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).double().cpu()
        )
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def is_flow(self) -> bool:
        return self.parametrization == "flow"

    def grid(self, t0: float, num_inference_steps: int) -> TimeGrid:
        """The grid from the clean end to ``t0`` at the spacing of ``num_inference_steps`` steps
        over the whole diffusion: n = max(1, round(t0 K)) steps.

        DDPM: the latent timestep is t_n = min(round(t0 T), T) - 1 and t_j =
        round((t_n + 1) j / n) - 1 (at most t_n + 1 distinct steps). Flow: s_j = t0 j / n.
        """
        t0 = check_t0(t0)
        n = max(1, round(t0 * check_steps(num_inference_steps)))
        if self.is_flow:
            s = torch.arange(n + 1, dtype=torch.float64) * (t0 / n)
            return TimeGrid(s * self.num_train_timesteps, 1 - s, s, t0)
        T = len(self.alphas_cumprod)
        last = max(min(round(t0 * T), T) - 1, 0)
        n = min(n, last + 1)
        j = torch.arange(1, n + 1, dtype=torch.float64)
        steps = (torch.round((last + 1) * j / n) - 1).long()
        abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[steps]])
        timesteps = torch.cat([torch.full((1,), -1.0, dtype=torch.float64), steps.double()])
        return TimeGrid(timesteps, abar.sqrt(), (1 - abar).sqrt(), t0)

    def output(self, x: torch.Tensor, grid: TimeGrid, j: int) -> torch.Tensor:
        """The network's raw output at grid point j >= 1, in fp32."""
        if j < 1:
            raise ConfigError("the network is not evaluated at the clean end of the grid.")
        t = grid.timesteps[j]
        dtype = torch.float32 if self.is_flow else torch.long
        timesteps = torch.full((x.shape[0],), float(t), device=x.device).to(dtype)
        return self.predict(x, timesteps).float()

    def estimate(
        self,
        x: torch.Tensor,
        grid: TimeGrid,
        j: int,
        threshold: tuple[float, float] | None = None,
        data_bound: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0-hat, eps-hat) at grid point j >= 1, in fp32. With ``threshold`` = (quantile,
        max_value), x0-hat is dynamically thresholded and eps-hat recomputed from it:
        eps = (x - alpha x0) / sigma."""
        y = self.output(x, grid, j)
        x = x.float()
        a, s = float(grid.alpha[j]), float(grid.sigma[j])
        if self.parametrization == "epsilon":
            eps = y
            x0 = (x - s * eps) / a
        elif self.parametrization == "v_prediction":
            eps = s * x + a * y
            x0 = a * x - s * y
        elif self.parametrization == "sample":
            x0 = y
            eps = (x - a * x0) / s
        else:  # flow: y is the velocity u = eps - x0
            eps = x + a * y
            x0 = x - s * y
        if threshold is not None:
            x0 = dynamic_threshold(x0, *threshold, data_bound=data_bound)
            eps = (x - a * x0) / s
        return x0, eps
