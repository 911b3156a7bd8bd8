"""CODE (Confident Ordinary Differential Editing): from a corrupted or out-of-distribution image
and a pretrained diffusion or flow model, the most probable in-distribution image near it. SDEdit
is the baseline.

CODE, for an input x (images in [-1, 1], or their VAE latent for latent models):

1. Encode. x <- x + 0.01 z, then deterministic DDIM inversion (the probability-flow ODE; the Euler
   step of the flow ODE for rectified-flow models) from the clean end to the latent time t0.
   Confidence-based clipping after every step: x_t <- clamp(x_t, -b_t, b_t) with
   b_t = B alpha_t + eta sigma_t (DDPM: sqrt(abar_t) + eta sqrt(1 - abar_t); flow:
   (1 - s) + eta s), eta = 1.7.
2. Correct. Langevin updates at t0, x <- x + a s + sqrt(2 a) z with the score
   s = -eps-hat / sigma_t, in ``anneal_stages`` stages whose step is multiplied by
   ``anneal_factor`` from one stage to the next, then one noise-free x <- x + a s with the last
   stage's step. The first stage's step is a = step_size c(t0), c(t0) = 100^(1 - t0): the
   authors' per-timestep factor, geomspace(1, 100) over the timestep grid, 100 at the clean end
   and 1 at t = T.
3. Decode. Deterministic DDIM from t0 to the clean end.

The predicted x0 is dynamically thresholded (quantile 0.98, at most 1.3) in the Langevin and the
decoding steps (``clip_decode``); the encoding uses only the confidence clipping
(``clip_encode``).

SDEdit: x_t0 = alpha_t0 x + sigma_t0 z, then the ancestral (DDPM) sampler down to the clean end
(``stochastic=False``: deterministic DDIM), with the same x0 thresholding as CODE's decoder.

Latent models (a VAE): editing runs on the mean of the VAE latent. Both range constraints assume
|x0| <= B, which holds with B = 1 for images in [-1, 1]; a VAE latent has no fixed range (and
diffusers calls dynamic thresholding unsuitable for latent models), so for latent models both
are off unless ``data_bound`` gives the bound B of the scaled latents, in which case the
confidence bound is B alpha_t + eta sigma_t and the thresholding acts on x0 / B.
"""

from __future__ import annotations

import math

import torch

from ..core.branch import Context, DualBranch
from ..core.errors import ConfigError
from ..families.base import MainModel
from .denoiser import Denoiser, TimeGrid, check_steps, check_t0
from .models import default_context, from_model_space, make_denoiser, to_model_space
from .thresholding import DEFAULT_ETA, DEFAULT_THRESHOLD, check_threshold, confidence_clip

ENCODE_NOISE = 0.01
# The authors' settings: the base step swept over geomspace(1e-5, 2e-3, 3) (the middle value is
# the default), 1000 Langevin updates in 4 stages of x0.8, a grid of 500 DDIM steps.
DEFAULT_STEP_SIZE = 1.4e-4
DEFAULT_LANGEVIN_STEPS = 1000
DEFAULT_ANNEAL_STAGES = 4
DEFAULT_ANNEAL_FACTOR = 0.8
DEFAULT_INFERENCE_STEPS = 500
# Their default latent is index 100 of 500 (t0 = 0.2); 0.5 leaves more room for corrections.
DEFAULT_T0 = 0.5


# ----------------------------------------------------------------------------- settings


def check_settings(
    t0=DEFAULT_T0,
    eta=DEFAULT_ETA,
    langevin_steps=DEFAULT_LANGEVIN_STEPS,
    step_size=DEFAULT_STEP_SIZE,
    anneal_stages=DEFAULT_ANNEAL_STAGES,
    anneal_factor=DEFAULT_ANNEAL_FACTOR,
    threshold=DEFAULT_THRESHOLD,
    num_inference_steps=DEFAULT_INFERENCE_STEPS,
    encode_noise=ENCODE_NOISE,
    data_bound=None,
) -> None:
    """Refuse settings that cannot work, with a ConfigError naming the valid range."""
    check_t0(t0)
    check_steps(num_inference_steps)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
        raise ConfigError(
            f"eta (the clipping width in standard deviations) must be > 0, got {eta}."
        )
    if isinstance(langevin_steps, bool) or not isinstance(langevin_steps, int):
        raise ConfigError(f"langevin_steps must be an integer >= 0, got {langevin_steps!r}.")
    if langevin_steps < 0:
        raise ConfigError(f"langevin_steps must be an integer >= 0, got {langevin_steps}.")
    if not step_size > 0 or not math.isfinite(step_size):
        raise ConfigError(f"step_size must be > 0, got {step_size!r}.")
    if isinstance(anneal_stages, bool) or not isinstance(anneal_stages, int) or anneal_stages < 1:
        raise ConfigError(f"anneal_stages must be an integer >= 1, got {anneal_stages!r}.")
    if not 0 < anneal_factor <= 1:
        raise ConfigError(f"anneal_factor must be in (0, 1], got {anneal_factor!r}.")
    if not encode_noise >= 0:
        raise ConfigError(f"encode_noise must be >= 0, got {encode_noise!r}.")
    if data_bound is not None and not data_bound > 0:
        raise ConfigError(f"data_bound must be > 0, got {data_bound!r}.")
    check_threshold(threshold)


def resolve_data_bound(model: MainModel, data_bound: float | None) -> float | None:
    """B, the bound on |x0| the range constraints assume: 1 for pixel-space models, the given
    bound for latent models, ``None`` (constraints off) for latent models without one."""
    if data_bound is not None:
        return float(data_bound)
    return 1.0 if model.is_pixel_space else None


def step_scale(t0: float) -> float:
    """c(t0) = 100^(1 - t0): the Langevin step's per-timestep factor."""
    return 100.0 ** (1.0 - t0)


def langevin_schedule(
    step_size: float,
    t0: float,
    steps: int,
    anneal_stages: int = DEFAULT_ANNEAL_STAGES,
    anneal_factor: float = DEFAULT_ANNEAL_FACTOR,
) -> tuple[list[float], float | None]:
    """(step size of each noisy update, step size of the final noise-free update).

    Stage k = 0..K-1 runs ``steps // K`` updates (the first ``steps % K`` stages one more) with
    a_k = step_size c(t0) anneal_factor^k; the final update uses a_{K-1}. No steps: ([], None).
    """
    if steps == 0:
        return [], None
    base = step_size * step_scale(t0)
    per_stage, extra = divmod(steps, anneal_stages)
    sizes = []
    for k in range(anneal_stages):
        sizes += [base * anneal_factor**k] * (per_stage + (1 if k < extra else 0))
    return sizes, base * anneal_factor ** (anneal_stages - 1)


def _noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """N(0, I) drawn where the generator lives (CPU by default), in fp32, then moved: the same
    seed gives the same draws on every device."""
    source = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


# ----------------------------------------------------------------------------- the three phases


def langevin_step(x, score, step_size: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x + a s + sqrt(2 a) z (noise-free without ``noise``)."""
    x = x + step_size * score
    if noise is not None:
        x = x + math.sqrt(2 * step_size) * noise
    return x


@torch.no_grad()
def invert(
    denoiser: Denoiser,
    x: torch.Tensor,
    grid: TimeGrid,
    eta: float | None = DEFAULT_ETA,
    data_bound: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM inversion from the clean end (point 0) to t0 (point n).

    Step j -> j + 1: x_{j+1} = alpha_{j+1} x0-hat_j + sigma_{j+1} eps-hat_j, with (x0-hat_j,
    eps-hat_j) predicted at point j; from the clean end x0-hat = x and eps-hat is the network's
    at point 1 (as diffusers' DDIMInverseScheduler). With ``eta``, confidence-based clipping of
    the start and of every x_{j+1}.
    """
    x = x.float()
    if eta is not None:
        x = confidence_clip(x, 1.0, 0.0, eta, data_bound)
    for j in range(grid.steps):
        if j == 0:
            _, eps = denoiser.estimate(x, grid, 1)
            x0 = x
        else:
            x0, eps = denoiser.estimate(x, grid, j)
        alpha, sigma = float(grid.alpha[j + 1]), float(grid.sigma[j + 1])
        x = alpha * x0 + sigma * eps
        if eta is not None:
            x = confidence_clip(x, alpha, sigma, eta, data_bound)
    return x


@torch.no_grad()
def langevin(
    denoiser: Denoiser,
    x: torch.Tensor,
    grid: TimeGrid,
    step_sizes: list[float],
    final_step: float | None,
    generator: torch.Generator | None = None,
    threshold: tuple[float, float] | None = DEFAULT_THRESHOLD,
    data_bound: float = 1.0,
) -> torch.Tensor:
    """Langevin corrections at the grid's last point: x <- x + a s + sqrt(2 a) z for each a in
    ``step_sizes``, then x <- x + final_step s; s = -eps-hat / sigma_t0."""
    j = grid.steps
    sigma = float(grid.sigma[j])

    def score(x):
        _, eps = denoiser.estimate(x, grid, j, threshold, data_bound)
        return -eps / sigma

    for a in step_sizes:
        x = langevin_step(x, score(x), a, _noise(x.shape, generator, x.device))
    if final_step is not None:
        x = langevin_step(x, score(x), final_step)
    return x


@torch.no_grad()
def decode(
    denoiser: Denoiser,
    x: torch.Tensor,
    grid: TimeGrid,
    threshold: tuple[float, float] | None = DEFAULT_THRESHOLD,
    data_bound: float = 1.0,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """From t0 (point n) to the clean end: x_{j-1} = alpha_{j-1} x0-hat_j + sigma_{j-1} eps-hat_j
    (DDIM). ``stochastic``: the ancestral sampler, x_{j-1} = alpha' x0-hat + sqrt(sigma'^2 - v)
    eps-hat + sqrt(v) z with the posterior variance v = sigma'^2 (1 - (alpha sigma' / (alpha'
    sigma))^2) of q(x_{j-1} | x_j, x0) (DDPM's for variance-preserving schedules)."""
    x = x.float()
    for j in range(grid.steps, 0, -1):
        x0, eps = denoiser.estimate(x, grid, j, threshold, data_bound)
        alpha, sigma = float(grid.alpha[j]), float(grid.sigma[j])
        alpha_next, sigma_next = float(grid.alpha[j - 1]), float(grid.sigma[j - 1])
        if stochastic and j > 1:
            ratio = (alpha * sigma_next) / (alpha_next * sigma)
            variance = max(sigma_next**2 * (1 - ratio**2), 0.0)
            x = (
                alpha_next * x0
                + math.sqrt(max(sigma_next**2 - variance, 0.0)) * eps
                + math.sqrt(variance) * _noise(x.shape, generator, x.device)
            )
        else:
            x = alpha_next * x0 + sigma_next * eps
    return x


# ----------------------------------------------------------------------------- entry points


def _prepare(model, images, context, branch, condition, conditioning_scale, prompts):
    device = next(model.main_network.parameters()).device
    if images.ndim != 4:
        raise ConfigError(f"images must be (B, C, H, W) in [-1, 1], got {tuple(images.shape)}.")
    x = to_model_space(model, images.to(device))
    if context is None:
        context = default_context(model, x.shape[0], device, prompts)
    if condition is not None and branch is not None:
        from ..families.encoders import FrozenEncoders

        condition = FrozenEncoders(model, device).encode_condition(condition.to(device))
    return x, make_denoiser(model, context, branch, condition, conditioning_scale)


@torch.no_grad()
def code_edit(
    model: MainModel,
    images: torch.Tensor,
    *,
    t0: float = DEFAULT_T0,
    eta: float = DEFAULT_ETA,
    langevin_steps: int = DEFAULT_LANGEVIN_STEPS,
    step_size: float = DEFAULT_STEP_SIZE,
    anneal_stages: int = DEFAULT_ANNEAL_STAGES,
    anneal_factor: float = DEFAULT_ANNEAL_FACTOR,
    clip_encode: bool = True,
    clip_decode: bool = True,
    threshold: tuple[float, float] = DEFAULT_THRESHOLD,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    encode_noise: float = ENCODE_NOISE,
    data_bound: float | None = None,
    generator: torch.Generator | None = None,
    context: Context | None = None,
    prompts: list[str] | None = None,
    branch: DualBranch | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """Restore ``images`` (B, 3, H, W) in [-1, 1] with CODE; returns images in [-1, 1].

    Args:
        model: the frozen model (``load_edit_model``), its networks on the device to run on.
        t0: the latent time, a fraction of the diffusion in (0, 1] (DDPM: t0 T; flow: s).
            Shallow latents suit noise and blur, deeper ones fog and contrast.
        eta: the confidence interval's width in standard deviations (``clip_encode``).
        langevin_steps: noisy Langevin updates at t0 (0: none, and no final update).
        step_size: the base step, multiplied by c(t0) = 100^(1 - t0) and annealed.
        anneal_stages, anneal_factor: stages of Langevin updates and the step's factor per stage.
        clip_encode: confidence-based clipping while encoding.
        clip_decode: dynamic thresholding of x0-hat in the Langevin and decoding steps.
        threshold: (quantile, max_value) of the dynamic thresholding.
        num_inference_steps: grid spacing, in steps over the whole diffusion; round(t0 K) steps
            are taken each way.
        encode_noise: std of the noise added before inverting.
        data_bound: B for the range constraints (default 1 for pixel models, off for latent
            models; see the module docstring).
        generator: draws the encoding noise, then the Langevin noise.
        context / prompts: what the main network is conditioned on (default: the empty prompt
            for text models, the null context otherwise).
        branch, condition: a trained side network (``branch_class(model.family, kind)`` around
            the main network) and its condition (B or 1, C, H, W) in [0, 1]: the controlled
            prediction replaces the main network's.
    """
    check_settings(t0, eta, langevin_steps, step_size, anneal_stages, anneal_factor, threshold,
                   num_inference_steps, encode_noise, data_bound)  # fmt: skip
    bound = resolve_data_bound(model, data_bound)
    x, denoiser = _prepare(model, images, context, branch, condition, conditioning_scale, prompts)
    grid = denoiser.grid(t0, num_inference_steps)
    thresholds = tuple(threshold) if clip_decode and bound is not None else None
    if encode_noise > 0:
        x = x + encode_noise * _noise(x.shape, generator, x.device)
    x = invert(denoiser, x, grid, eta if clip_encode and bound is not None else None, bound or 1.0)
    sizes, final = langevin_schedule(step_size, grid.t0, langevin_steps, anneal_stages,
                                     anneal_factor)  # fmt: skip
    x = langevin(denoiser, x, grid, sizes, final, generator, thresholds, bound or 1.0)
    x = decode(denoiser, x, grid, thresholds, bound or 1.0)
    return from_model_space(model, x)


@torch.no_grad()
def sdedit(
    model: MainModel,
    images: torch.Tensor,
    *,
    t0: float = DEFAULT_T0,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    stochastic: bool = True,
    clip_decode: bool = True,
    threshold: tuple[float, float] = DEFAULT_THRESHOLD,
    data_bound: float | None = None,
    generator: torch.Generator | None = None,
    context: Context | None = None,
    prompts: list[str] | None = None,
    branch: DualBranch | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """SDEdit: noise ``images`` to t0 (x_t0 = alpha x + sigma z), then denoise to the clean end
    with the ancestral sampler (DDIM with ``stochastic=False``). Arguments as :func:`code_edit`."""
    check_settings(t0, threshold=threshold, num_inference_steps=num_inference_steps,
                   data_bound=data_bound)  # fmt: skip
    bound = resolve_data_bound(model, data_bound)
    x, denoiser = _prepare(model, images, context, branch, condition, conditioning_scale, prompts)
    grid = denoiser.grid(t0, num_inference_steps)
    thresholds = tuple(threshold) if clip_decode and bound is not None else None
    n = grid.steps
    x = float(grid.alpha[n]) * x + float(grid.sigma[n]) * _noise(x.shape, generator, x.device)
    x = decode(denoiser, x, grid, thresholds, bound or 1.0, stochastic, generator)
    return from_model_space(model, x)


METHODS = {"code": code_edit, "sdedit": sdedit}
