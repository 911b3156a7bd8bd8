"""Sampling from a dual-branch model with any diffusers scheduler.

The loop is the one diffusers' ``StableDiffusionControlNetPipeline`` runs (``guess_mode=False``),
written against :class:`~lisa_control.families.DualBranch` so that pixel-space models, models
without a text encoder and the validation callback all share it. Given the same components, seed
and prompt embeddings it returns the same latents as the pipeline with ``output_type="latent"``:

* x_T = randn(shape, generator) * scheduler.init_noise_sigma, drawn in the context's dtype;
* per timestep t: x_in = scale_model_input(x_t, t); the side network and the main network see the
  same batch; with classifier-free guidance the batch is [unconditional, conditional], both with
  the visual condition, and y = y_uncond + w (y_cond - y_uncond);
* x_{t-1} = scheduler.step(y, t, x_t) (with ``generator`` when the scheduler draws noise).

A branch whose ``forward`` takes ``step_index`` (a composition of side networks with guidance
windows, ``families.composition``) is told the step i and the run's length n = len(timesteps),
the numbers diffusers' ``controlnet_keep`` reads; its conditions may be a list or a mapping.

No decoder or regularizer takes part: sampling needs only the side network's residuals.
"""

from __future__ import annotations

import inspect

import torch

from ..core.branch import Context, DualBranch
from ..core.errors import ConfigError
from ..families.base import Family


def latent_shape(branch: DualBranch, condition: torch.Tensor, batch: int) -> tuple[int, ...]:
    """(batch, C, H, W) of x_t for ``condition``.

    A ControlNet's condition encoder halves resolution once per entry after the first of
    ``conditioning_embedding_out_channels``, and its output must match x_t; so that config says
    how the condition's size maps to the sample's (8x for SD latents, 1x for pixel models).
    """
    parts = getattr(branch, "side_branches", None)
    if parts:  # several side networks: the first one's condition says the size
        branch = next(iter(parts.values()))
        condition = next(iter(condition.values())) if isinstance(condition, dict) else condition[0]
    config = getattr(branch.side_network, "config", None)
    embedding_channels = getattr(config, "conditioning_embedding_out_channels", None)
    in_channels = getattr(getattr(branch.main_network, "config", None), "in_channels", None)
    if embedding_channels is None or in_channels is None:
        raise ConfigError(
            f"cannot infer the sample shape for {type(branch).__name__}; pass latents= "
            "(the initial noise, already scaled by scheduler.init_noise_sigma)."
        )
    downscale = 2 ** (len(embedding_channels) - 1)
    height, width = condition.shape[-2:]
    # A video condition (B, C, F, H, W) keeps its frames: x_t is (batch, C, F, h, w).
    frames = tuple(condition.shape[2:-2])
    return (batch, in_channels, *frames, height // downscale, width // downscale)


def repeat_to(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Broadcast a batch of one to ``batch`` (one condition or negative prompt for all samples)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ConfigError(f"{what} has batch size {tensor.shape[0]}, expected 1 or {batch}.")


def _each_condition(fn, condition):
    """``fn`` applied to one condition tensor, or to each of a list or mapping of them."""
    if isinstance(condition, dict):
        return {name: fn(c) for name, c in condition.items()}
    if isinstance(condition, (list, tuple)):
        return [fn(c) for c in condition]
    return fn(condition)


def _takes_step_index(branch) -> bool:
    try:
        return "step_index" in inspect.signature(branch.forward).parameters
    except (TypeError, ValueError):
        return False


def _guidance_context(positive: Context, negative: Context, batch: int) -> Context:
    """One context for the [unconditional, conditional] batch, in the pipeline's order.

    Added conditioning (SDXL's pooled text and time ids) is concatenated the same way; where the
    negative context has none, the positive one's is reused for both halves. ``extra`` holds
    family inputs that are not per sample (position ids), so it is taken as is.
    """
    hidden = torch.cat(
        [
            repeat_to(negative.encoder_hidden_states, batch, "negative_context"),
            positive.encoder_hidden_states,
        ]
    )
    added = None
    if positive.added_cond_kwargs is not None:
        negative_added = negative.added_cond_kwargs or positive.added_cond_kwargs
        added = {
            key: torch.cat([repeat_to(negative_added[key], batch, key), value])
            for key, value in positive.added_cond_kwargs.items()
        }
    return Context(hidden, added, dict(positive.extra))


def init_noise_sigma(scheduler) -> float:
    """The scale of x_T; flow-matching schedulers start from unit noise and have no attribute."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def scale_model_input(scheduler, sample: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling (Euler-type samplers divide by sqrt(sigma^2 + 1)); flow-
    matching schedulers feed x_t as is."""
    if hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(sample, t)
    return sample


def _step_kwargs(scheduler, generator) -> dict:
    # Stochastic schedulers (DDPM, Euler ancestral, SDE solvers) draw their noise from the same
    # generator as x_T, as the pipeline does; deterministic ones do not take it.
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


@torch.no_grad()
def sample(
    branch: DualBranch,
    condition: torch.Tensor,
    context: Context,
    scheduler,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    negative_context: Context | None = None,
    generator: torch.Generator | None = None,
    conditioning_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    progress: bool = False,
    schedule: dict | None = None,
) -> torch.Tensor:
    """Denoise from x_T to x_0 (latents for latent models, pixels in [-1, 1] for pixel models).

    Args:
        branch: main + side network; ``branch(x_t, t, context, condition).output`` is the
            controlled prediction.
        condition: visual condition (B or 1, C, H, W) in [0, 1], at the side network's
            resolution (8x the latent size for SD); for several side networks a list (their
            order) or a mapping name -> condition.
        context: text (or null) context of the B samples.
        scheduler: any diffusers scheduler (DDIM, DPM-Solver++, UniPC, Euler, ...); its state is
            reset by ``set_timesteps``.
        guidance_scale: classifier-free guidance weight w; guidance runs when w > 1.
        negative_context: the unconditional context (the encoded empty or negative prompt),
            required when w > 1; a batch of one is shared by all samples.
        generator: draws x_T (when ``latents`` is None) and any scheduler noise.
        conditioning_scale: multiplies the side network's residuals.
        latents: the initial x_T, used as given: already scaled by
            ``scheduler.init_noise_sigma`` (the pipeline's ``latents=`` argument is scaled
            inside it instead).
        progress: show a progress bar.
        schedule: further ``scheduler.set_timesteps`` arguments (custom sigmas, Flux's
            resolution-dependent ``mu``).
    """
    do_guidance = guidance_scale > 1.0
    if do_guidance and negative_context is None:
        raise ConfigError(
            "guidance_scale > 1 needs negative_context: the encoded empty (or negative) prompt."
        )
    device = next(branch.side_network.parameters()).device
    batch = context.encoder_hidden_states.shape[0] if latents is None else latents.shape[0]

    scheduler.set_timesteps(num_inference_steps, device=device, **(schedule or {}))
    if latents is None:
        # Drawn where the generator lives, in the context's dtype, then moved: the pipeline's
        # recipe, so a CPU generator gives the same x_T on every device.
        shape = latent_shape(branch, condition, batch)
        noise_device = generator.device if generator is not None else device
        dtype = context.encoder_hidden_states.dtype
        latents = torch.randn(shape, generator=generator, device=noise_device, dtype=dtype)
        latents = latents.to(device) * init_noise_sigma(scheduler)
    else:
        latents = latents.to(device)

    condition = _each_condition(lambda c: repeat_to(c.to(device), batch, "condition"), condition)
    model_context, model_condition = context.to(device), condition
    if do_guidance:
        # Unconditional half first: the pipeline's order. Both halves see the control.
        model_context = _guidance_context(model_context, negative_context.to(device), batch)
        model_condition = _each_condition(lambda c: torch.cat([c, c]), condition)

    # Only families with scalable residuals take conditioning_scale; 1.0 needs no argument.
    branch_kwargs = {} if conditioning_scale == 1.0 else {"conditioning_scale": conditioning_scale}
    step_kwargs = _step_kwargs(scheduler, generator)

    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    takes_step = _takes_step_index(branch)
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling")
    for i, t in enumerate(timesteps):
        if takes_step:
            branch_kwargs.update(step_index=i, num_steps=num_steps)
        model_input = torch.cat([latents, latents]) if do_guidance else latents
        model_input = scale_model_input(scheduler, model_input, t)
        # One timestep per sample: transformers (SD3, Flux) need a 1-d tensor; UNets broadcast.
        t_batch = t.expand(model_input.shape[0]) if torch.is_tensor(t) and t.ndim == 0 else t
        prediction = branch(
            model_input, t_batch, model_context, model_condition, **branch_kwargs
        ).output
        if do_guidance:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(vae, latents: torch.Tensor, family: Family | None = None) -> torch.Tensor:
    """Images in [-1, 1] from ``sample``'s output: as is (clamped) for pixel-space models
    (``vae`` None), else through ``family``'s hooks, the inverse of its encoding: its
    ``denormalize_latents`` then its ``decode_images`` (videos (B, C, f, h, w) come back as
    (B, 3, F, H, W)). Without a family, the base :class:`~lisa_control.families.base.Family`'s:
    an image VAE with a ``scaling_factor`` (and ``shift_factor``) in its config."""
    if vae is None:
        return latents.clamp(-1, 1)
    family = family or Family()
    latents = family.denormalize_latents(vae, latents.to(vae.dtype))
    return family.decode_images(vae, latents).clamp(-1, 1)
