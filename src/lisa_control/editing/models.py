"""The models editing works with, and the glue between them and :class:`Denoiser`.

:func:`load_edit_model` loads what ``load_main_model`` loads: the shipped networks, ``lisa
pretrain`` folders, Stable Diffusion / SD3 / Flux pipelines and unconditional diffusers
``DDPMPipeline`` / ``DDIMPipeline`` / ``PNDMPipeline`` folders and hub ids (the ``unet2d``
family).

:func:`make_denoiser` builds the prediction each step uses: the main network alone
(``model.family.predict``), or a trained side network's controlled output
``branch(x_t, t, context, condition).output``.
"""

from __future__ import annotations

import torch

from ..core.branch import Context, DualBranch
from ..core.errors import ConfigError, ModelError
from ..families.base import MainModel
from ..eval.sampling import repeat_to
from ..families.loading import load_main_model
from .denoiser import Denoiser


def load_edit_model(
    name: str | None, task: str | None = None, revision=None, variant=None, allow_pickle=False
) -> MainModel:
    """The model to edit with: whatever ``load_main_model`` loads."""
    return load_main_model(
        name, task, revision=revision, variant=variant, allow_pickle=allow_pickle
    )


def size_multiple(model: MainModel) -> int:
    """Image sides must be multiples of this (the model's down-sampling factor)."""
    return model.resolution_multiple


def check_image_size(model: MainModel, height: int, width: int, what: str = "image") -> None:
    """Refuse an image the model cannot take, naming the multiple it needs."""
    for side in (height, width):
        model.check_resolution(int(side), flag=f"{what} size {height}x{width}: side")


# ----------------------------------------------------------------------------- predictions


def make_denoiser(
    model: MainModel,
    context: Context,
    branch: DualBranch | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> Denoiser:
    """The :class:`Denoiser` of ``model`` under ``context``: the main network alone, or with
    ``branch`` (main + side network) and its ``condition`` the controlled prediction."""
    network = model.main_network
    if (branch is None) != (condition is None):
        raise ConfigError("a side network and its condition come together: pass both or neither.")
    if branch is not None:
        extra = {} if conditioning_scale == 1.0 else {"conditioning_scale": conditioning_scale}

        def predict(x, t):
            cond = repeat_to(condition.to(x.device), x.shape[0], "condition")
            ctx = context.to(x.device)
            return branch(x, t, ctx, cond, **extra).output

    else:

        def predict(x, t):
            ctx = context.to(x.device, dtype=network.dtype)
            return model.family.predict(network, x.to(network.dtype), t, ctx)

    if model.objective == "flow":
        num = getattr(model.scheduler.config, "num_train_timesteps", 1000)
        return Denoiser(predict, "flow", num_train_timesteps=num)
    alphas_cumprod = getattr(model.scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ModelError(
            f"{type(model.scheduler).__name__} has no alphas_cumprod; editing a "
            f"{model.objective} model needs a DDPM-family scheduler."
        )
    return Denoiser(
        predict,
        model.objective,
        alphas_cumprod=alphas_cumprod,
        num_train_timesteps=len(alphas_cumprod),
    )


def default_context(model: MainModel, batch: int, device, prompts: list[str] | None = None):
    """The context to edit under: the encoded ``prompts`` (default the empty prompt) for models
    with text encoders, else the model's constant null context; Flux's distilled guidance is set
    to the family default."""
    if model.has_text:
        from ..families.encoders import FrozenEncoders

        prompts = list(prompts) if prompts else [""] * batch
        context = FrozenEncoders(model, device).prompt_context(_repeat_list(prompts, batch))
    else:
        context = model.null_context(batch, device)
    _, embedded_guidance = model.family.guidance(model, None)
    if embedded_guidance is not None:
        context.extra["guidance"] = embedded_guidance
    return context


def _repeat_list(items: list[str], batch: int) -> list[str]:
    if len(items) == batch:
        return items
    if len(items) == 1:
        return items * batch
    raise ConfigError(f"give one prompt or {batch}, got {len(items)}.")


# ----------------------------------------------------------------------------- VAE


@torch.no_grad()
def to_model_space(model: MainModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the space the model denoises: the images themselves (pixel-space
    models) or the VAE latent's mean, shifted and scaled as in training (deterministic)."""
    if model.vae is None:
        return images.float()
    vae = model.vae
    mean = vae.encode(images.to(vae.dtype)).latent_dist.mean.float()
    return model.family.normalize_latents(vae, mean).float()


@torch.no_grad()
def from_model_space(model: MainModel, x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_model_space`: images in [-1, 1] (clamped)."""
    from ..eval.sampling import decode

    return decode(model.vae, x, family=model.family).float()
