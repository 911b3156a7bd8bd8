"""Training objectives: how a clean sample is noised, what the network should predict, and what
that prediction says about the score.

Variance-preserving diffusion (DDPM schedulers), with alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t):

    x_t = alpha_t x0 + sigma_t eps
    eps-prediction target: eps                      score: grad log p(x_t) = -eps / sigma_t
    v-prediction target:   v = alpha_t eps - sigma_t x0,   eps = sigma_t x_t + alpha_t v

Rectified flow with s in [0, 1] (timestep = 1000 s, as diffusers' flow-matching models take it):

    x_s = (1 - s) x0 + s eps,   velocity target u = eps - x0
    eps-hat = x_s + (1 - s) u,  score = -eps-hat / s

Every target is affine in the score with an x_t-only offset, so by Bayes
(grad log p(x_t | c) = grad log p(x_t) + grad log p(c | x_t)) the residual between the controlled
and the prior prediction is a rescaled likelihood score:

    eps-prediction:  eps_cond - eps_prior = -sigma_t            grad log p(c | x_t)
    v-prediction:    v_cond   - v_prior   = -(sigma_t / alpha_t) grad log p(c | x_t)
    rectified flow:  u_cond   - u_prior   = -(s / (1 - s))       grad log p(c | x_s)

LISA regresses exactly that residual (see ``regularizers.lisa``).

Precision: ``sample`` forms x_t and the target in fp32, from fp32 coefficients, fp32 noise and
the clean sample upcast to fp32, as diffusers' training scripts do; only x_t is then cast back
to the clean sample's dtype for the network. The target stays fp32 for the loss. (Computing in
bf16 would round alpha_t and sigma_t: sigma_t = 0 at t = 0 and 1 for SD's schedule.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

# ----------------------------------------------------------------------------- timestep samplers


def uniform_timesteps(batch: int, num_timesteps: int, generator=None, device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}: the DDPM and LISA recipe."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)


def logit_normal_timesteps(
    batch: int, num_timesteps: int, generator=None, device=None, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """t = T * sigmoid(n), n ~ N(mean, std): SD3's default, concentrates on mid noise levels."""
    n = torch.randn(batch, generator=generator, device=device) * std + mean
    return (torch.sigmoid(n) * num_timesteps).long().clamp_(0, num_timesteps - 1)


def cubic_timesteps(batch: int, num_timesteps: int, generator=None, device=None) -> torch.Tensor:
    """t = T (1 - u^3), u ~ U[0, 1): T2I-Adapter's choice, favours the noisy early steps where
    structure is decided."""
    u = torch.rand(batch, generator=generator, device=device)
    return ((1 - u**3) * num_timesteps).long().clamp_(0, num_timesteps - 1)


TIMESTEP_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_timesteps,
    "logit_normal": logit_normal_timesteps,
    "cubic": cubic_timesteps,
}


def get_timestep_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return TIMESTEP_SAMPLERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown timestep sampler {name!r}; choose one of {sorted(TIMESTEP_SAMPLERS)}."
        ) from None


# ----------------------------------------------------------------------------- objectives


@dataclass
class NoisedBatch:
    """One draw of the forward process for a batch of clean samples."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class Objective:
    """Interface: ``sample`` draws (x_t, t, target), ``loss`` compares a prediction to it,
    ``score`` turns a prediction into grad log p(x_t)."""

    prediction_type: str = ""
    num_timesteps: int = 1000
    # A noise-level weighting of the loss (``core.weighting``); None is the plain mean.
    weighting = None

    def sample(self, x0: torch.Tensor, generator=None, noise=None, timesteps=None) -> NoisedBatch:
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """MSE in fp32, as the diffusers ControlNet scripts and the LISA authors use; with a
        ``weighting``, the mean over samples of w_t times each sample's mean squared error."""
        if self.weighting is None:
            return F.mse_loss(prediction.float(), batch.target.float(), reduction="mean")
        error = (prediction.float() - batch.target.float()).pow(2)
        weights = self.weighting(self, batch.timesteps, error)
        return (weights * error).flatten(1).mean(1).mean()

    def x0_scale(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """j_t with x0_hat - x0 = -j_t (prediction - target), shaped to broadcast with ``like``."""
        raise NotImplementedError

    def snr(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio of x_t, shaped to broadcast with ``like``."""
        raise NotImplementedError

    def score(self, prediction: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        raise NotImplementedError

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        """The clean sample a prediction implies (affine in the prediction)."""
        raise NotImplementedError


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionObjective(Objective):
    """eps- or v-prediction over a diffusers DDPM-family scheduler (``alphas_cumprod``)."""

    def __init__(self, scheduler, prediction_type: str | None = None, timestep_sampler="uniform"):
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ConfigError(
                f"{type(scheduler).__name__} has no alphas_cumprod; use a DDPM-family scheduler "
                "for diffusion objectives or RectifiedFlowObjective for flow models."
            )
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not supported; "
                "use 'epsilon' or 'v_prediction'."
            )
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.timestep_sampler = (
            get_timestep_sampler(timestep_sampler)
            if isinstance(timestep_sampler, str)
            else timestep_sampler
        )

    def alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor):
        """(alpha_t, sigma_t) in fp32, shaped to broadcast against ``like``."""
        abar = self.scheduler.alphas_cumprod.to(like.device, torch.float32)
        abar = abar[timesteps.to(like.device)]
        return _broadcast(abar.sqrt(), like), _broadcast((1 - abar).sqrt(), like)

    def sample(self, x0, generator=None, noise=None, timesteps=None) -> NoisedBatch:
        """x_t in ``x0``'s dtype, computed in fp32; ``noise`` and ``target`` in fp32."""
        if noise is None:
            noise = torch.randn(
                x0.shape, generator=generator, device=x0.device, dtype=torch.float32
            )
        if timesteps is None:
            timesteps = self.timestep_sampler(
                x0.shape[0], self.num_timesteps, generator=generator, device=x0.device
            )
        timesteps = timesteps.long()
        # diffusers' add_noise and get_velocity cast alphas_cumprod to their inputs' dtype.
        x0_32, noise = x0.float(), noise.float()
        x_t = self.scheduler.add_noise(x0_32, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(x0_32, noise, timesteps)
        return NoisedBatch(x_t=x_t.to(x0.dtype), timesteps=timesteps, noise=noise, target=target)

    def predicted_noise(self, prediction, x_t, timesteps):
        if self.prediction_type == "epsilon":
            return prediction
        alpha, sigma = self.alpha_sigma(timesteps, x_t)
        return sigma * x_t.float() + alpha * prediction.float()

    def score(self, prediction, x_t, timesteps):
        """grad_x log p(x_t) = -eps / sigma_t."""
        _, sigma = self.alpha_sigma(timesteps, x_t)
        return -self.predicted_noise(prediction, x_t, timesteps).float() / sigma

    def x0_scale(self, timesteps, like):
        """sigma_t / alpha_t for eps, sigma_t for v."""
        alpha, sigma = self.alpha_sigma(timesteps, like)
        return sigma / alpha if self.prediction_type == "epsilon" else sigma

    def snr(self, timesteps, like):
        """alpha_t^2 / sigma_t^2."""
        alpha, sigma = self.alpha_sigma(timesteps, like)
        return alpha.pow(2) / sigma.pow(2)

    def x0(self, prediction, x_t, timesteps):
        """x0 = (x_t - sigma_t eps) / alpha_t, or alpha_t x_t - sigma_t v (no division)."""
        alpha, sigma = self.alpha_sigma(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return (x_t.float() - sigma * prediction.float()) / alpha
        return alpha * x_t.float() - sigma * prediction.float()


class RectifiedFlowObjective(Objective):
    """Rectified flow: x_s = (1 - s) x0 + s eps, target u = eps - x0, timestep = 1000 s."""

    prediction_type = "flow"

    def __init__(self, timestep_sampler="logit_normal", num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        self.timestep_sampler = (
            get_timestep_sampler(timestep_sampler)
            if isinstance(timestep_sampler, str)
            else timestep_sampler
        )

    def sigmas(self, timesteps, like):
        return _broadcast(timesteps.float() / self.num_timesteps, like)

    def sample(self, x0, generator=None, noise=None, timesteps=None) -> NoisedBatch:
        """x_s in ``x0``'s dtype, computed in fp32; ``noise`` and ``target`` in fp32."""
        if noise is None:
            noise = torch.randn(
                x0.shape, generator=generator, device=x0.device, dtype=torch.float32
            )
        if timesteps is None:
            # Continuous s drawn through the integer sampler's law, then jittered so s covers
            # (0, 1) rather than a grid.
            steps = self.timestep_sampler(
                x0.shape[0], self.num_timesteps, generator=generator, device=x0.device
            ).float()
            jitter = torch.rand(x0.shape[0], generator=generator, device=x0.device)
            timesteps = (steps + jitter).clamp_(1e-3, self.num_timesteps - 1e-3)
        x0_32, noise = x0.float(), noise.float()
        s = self.sigmas(timesteps, x0_32)
        x_t = (1 - s) * x0_32 + s * noise
        return NoisedBatch(
            x_t=x_t.to(x0.dtype), timesteps=timesteps, noise=noise, target=noise - x0_32
        )

    def score(self, prediction, x_t, timesteps):
        s = self.sigmas(timesteps, x_t).clamp_min(1e-4)
        eps = x_t.float() + (1 - s) * prediction.float()
        return -eps / s

    def x0_scale(self, timesteps, like):
        """s: x0 = x_s - s u."""
        return self.sigmas(timesteps, like)

    def snr(self, timesteps, like):
        """((1 - s) / s)^2."""
        s = self.sigmas(timesteps, like)
        return ((1 - s) / s).pow(2)

    def x0(self, prediction, x_t, timesteps):
        """x0 = x_s - s u."""
        return x_t.float() - self.sigmas(timesteps, x_t) * prediction.float()


def make_objective(
    name: str, scheduler=None, timestep_sampler: str | None = None, weighting=None
) -> Objective:
    """Build an objective by name: 'epsilon', 'v_prediction' or 'flow', optionally with a loss
    ``weighting`` (a ``core.weighting.LossWeighting``)."""
    if name == "flow":
        objective = RectifiedFlowObjective(timestep_sampler=timestep_sampler or "logit_normal")
    elif name in ("epsilon", "v_prediction"):
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=name)
        objective = DiffusionObjective(
            scheduler, name, timestep_sampler=timestep_sampler or "uniform"
        )
    else:
        raise ConfigError(f"unknown objective {name!r}; use 'epsilon', 'v_prediction' or 'flow'.")
    objective.weighting = weighting
    return objective


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer/DDPM sinusoidal embedding [cos | sin] of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half
    )
    angles = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------- SD3 recipe

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


class PreconditionedFlowObjective(RectifiedFlowObjective):
    """SD3's training recipe from diffusers' ``train_controlnet_sd3.py``.

    Timesteps: u ~ ``compute_density_for_timestep_sampling(weighting_scheme)`` (logit-normal,
    "mode" or uniform; the loss-weighting schemes sample uniformly), index i = floor(u T), and
    s = sigma_i from the table of ``FlowMatchEulerDiscreteScheduler(shift=shift)``:

        r_i = (T - i) / T,      sigma_i = shift r_i / (1 + (shift - 1) r_i),   timestep = T sigma_i.

    Loss (per sample mean, then batch mean), with w = ``compute_loss_weighting_for_sd3(s)``
    (s^-2 for "sigma_sqrt", 2 / (pi (1 - 2 s + 2 s^2)) for "cosmap", else 1):

        precondition_outputs=True:   w || (x_s - s u) - x0 ||^2  =  w s^2 || u - (eps - x0) ||^2
        precondition_outputs=False:  w || u - (eps - x0) ||^2

    ``batch.target`` stays the velocity eps - x0, the space the network predicts in, so the
    prior residual that LISA regresses and ``score`` are those of :class:`RectifiedFlowObjective`.
    ``shift`` is 1.0 by default (right for small images); SD3-medium's scheduler uses 3.0, see
    :meth:`from_scheduler`.
    """

    def __init__(
        self,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        precondition_outputs: bool = True,
        num_timesteps: int = 1000,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(
                f"unknown weighting_scheme {weighting_scheme!r}; choose one of "
                f"{', '.join(WEIGHTING_SCHEMES)} (as diffusers' train_controlnet_sd3.py)."
            )
        if not shift > 0:
            raise ConfigError(f"shift must be > 0, got {shift!r}.")
        super().__init__(timestep_sampler="uniform", num_timesteps=num_timesteps)
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.shift = float(shift)
        self.precondition_outputs = precondition_outputs

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> PreconditionedFlowObjective:
        """Take ``shift`` and the number of training timesteps from a
        ``FlowMatchEulerDiscreteScheduler`` (e.g. the one shipped with SD3)."""
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ConfigError(
                "schedulers with use_dynamic_shifting (Flux) have no fixed training shift; "
                "pass shift= explicitly."
            )
        return cls(
            shift=scheduler.config.shift,
            num_timesteps=scheduler.config.num_train_timesteps,
            **kwargs,
        )

    def sigma_table(self, device=None) -> torch.Tensor:
        """sigma_i for i = 0..T-1, as ``FlowMatchEulerDiscreteScheduler(shift).sigmas``."""
        T = self.num_timesteps
        r = torch.arange(T, 0, -1, device=device, dtype=torch.float32) / T
        return self.shift * r / (1 + (self.shift - 1) * r)

    def sample(self, x0, generator=None, noise=None, timesteps=None) -> NoisedBatch:
        if timesteps is None:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling(
                weighting_scheme=self.weighting_scheme,
                batch_size=x0.shape[0],
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                device=x0.device,
                generator=generator,
            )
            # u can reach 1.0 (sigmoid saturation, the "mode" law at u' = 0): clamp the index.
            index = (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
            timesteps = self.sigma_table(x0.device)[index] * self.num_timesteps
        return super().sample(x0, generator=generator, noise=noise, timesteps=timesteps)

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        s = self.sigmas(batch.timesteps, prediction)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=s)
        prediction, target = prediction.float(), batch.target.float()
        if self.precondition_outputs:
            x_t = batch.x_t.float()
            prediction = x_t - s * prediction  # x0-hat
            # x0, up to the rounding of x_t to the network's dtype, which cancels in the
            # difference: the loss is s^2 times the velocity error either way.
            target = x_t - s * target
        per_sample = (weighting * (prediction - target) ** 2).reshape(target.shape[0], -1).mean(1)
        return per_sample.mean()
