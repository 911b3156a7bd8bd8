"""The models editing works with, and the glue between them and :class:`Denoiser`.

:func:`load_edit_model` loads what ``load_main_model`` loads (the shipped networks, ``lisa
pretrain`` folders, Stable Diffusion / SD3 / Flux pipelines) plus unconditional diffusers
``DDPMPipeline`` / ``DDIMPipeline`` / ``PNDMPipeline`` folders and hub ids (a ``UNet2DModel`` and
its scheduler, e.g. ``google/ddpm-ema-celebahq-256``), which it wraps in the local
:class:`UnconditionalUNetFamily`.

:func:`make_denoiser` builds the prediction each step uses: the main network alone
(``model.family.predict``; Flux transformers through :func:`flux_predict`, which packs the latent
as FluxPipeline does), or a trained side network's controlled output
``branch(x_t, t, context, condition).output``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..core.branch import Context, DualBranch
from ..core.errors import ConfigError, ModelError
from ..families.base import Family, MainModel
from .denoiser import Denoiser

UNCONDITIONAL_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")


# ----------------------------------------------------------------------------- unconditional UNets


class UnconditionalUNetFamily(Family):
    """diffusers ``UNet2DModel`` pipelines (DDPM, DDIM, PNDM): no text, no side networks.

    Local to editing and not registered: it only serves ``predict`` and ``null_context``.
    """

    name = "unet2d"
    network_class = UNet2DModel
    network_folder = "unet"
    scheduler_class = DDPMScheduler

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        """An empty token list: the network takes no context."""
        return Context(encoder_hidden_states=torch.zeros(batch, 0, 1, device=device, dtype=dtype))

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        return network(x_t, timesteps, return_dict=False)[0]


def _pipeline_class(name: str, revision=None) -> str:
    """``_class_name`` of a diffusers folder's or hub repo's model_index.json ('' if none)."""
    index = Path(name).expanduser() / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name", "")
    if Path(name).expanduser().exists() or name.startswith("embedded:"):
        return ""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        return ""
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(name, revision=revision)).get("_class_name", "")
    except (OSError, ValueError):
        return ""  # load_main_model then reports what is missing


def load_unconditional_unet(name: str, revision=None, variant=None, allow_pickle=False):
    """A :class:`MainModel` from a DDPM/DDIM/PNDM pipeline folder or hub id."""
    from ..families.loading import check_weight_files

    local = Path(name).expanduser()
    if local.is_dir():
        check_weight_files(local / "unet", allow_pickle)
    try:
        unet = UNet2DModel.from_pretrained(
            str(local) if local.is_dir() else name,
            subfolder="unet",
            revision=revision,
            variant=variant,
            use_safetensors=not allow_pickle,
        )
        config = DDPMScheduler.load_config(
            str(local) if local.is_dir() else name, subfolder="scheduler", revision=revision
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load a UNet2DModel pipeline from {name!r}: {first}. Pass a folder with "
            "unet/ and scheduler/ (as DDPMPipeline.save_pretrained writes), or a hub id."
        ) from None
    scheduler = DDPMScheduler.from_config(config)
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return MainModel(
        main_network=unet,
        scheduler=scheduler,
        family=UnconditionalUNetFamily(),
        resolution=int(size),
        source=name,
        objective=scheduler.config.prediction_type,
    )


def load_edit_model(
    name: str | None, task: str | None = None, revision=None, variant=None, allow_pickle=False
) -> MainModel:
    """``load_main_model`` plus unconditional UNet2DModel pipelines (see the module docstring)."""
    from ..families.loading import load_main_model

    if name is not None and _pipeline_class(name, revision) in UNCONDITIONAL_PIPELINES:
        return load_unconditional_unet(name, revision, variant, allow_pickle)
    return load_main_model(
        name, task, revision=revision, variant=variant, allow_pickle=allow_pickle
    )


def size_multiple(model: MainModel) -> int:
    """Image sides must be multiples of this: ``model.resolution_multiple``, or for a
    UNet2DModel its own down-sampling (one halving per block after the first)."""
    network = model.main_network
    if isinstance(model.family, UnconditionalUNetFamily):
        return 2 ** (len(network.config.block_out_channels) - 1)
    return model.resolution_multiple


def check_image_size(model: MainModel, height: int, width: int, what: str = "image") -> None:
    """Refuse an image the model cannot take, naming the multiple it needs."""
    if isinstance(model.family, UnconditionalUNetFamily):
        multiple = size_multiple(model)
        for side in (height, width):
            if side <= 0 or side % multiple:
                raise ConfigError(
                    f"{what} size {height}x{width} does not fit this model: give sides that are "
                    f"positive multiples of {multiple}, the model's down-sampling factor."
                )
        return
    for side in (height, width):
        model.check_resolution(int(side), flag=f"{what} size {height}x{width}: side")


# ----------------------------------------------------------------------------- predictions


def flux_predict(network, x_t, timesteps, context: Context, guidance: float = 3.5):
    """A Flux transformer's velocity for an image-shaped latent (B, C, H, W): packed into 2x2
    tokens with FluxPipeline's position ids, timesteps given as s = timesteps / 1000, the
    distilled guidance passed where the transformer embeds it."""
    from ..families.flux import latent_image_ids, pack_latents, text_ids, unpack_latents

    height, width = x_t.shape[-2:]
    device, dtype = x_t.device, network.dtype
    ctx = context.to(dtype=dtype)
    tokens = ctx.encoder_hidden_states
    guidance_value = ctx.extra.get("guidance", guidance)
    kwargs = dict(
        encoder_hidden_states=tokens,
        pooled_projections=ctx.extra["pooled_projections"],
        timestep=(timesteps.float() / 1000).to(dtype),
        txt_ids=ctx.extra.get("txt_ids", text_ids(tokens.shape[1], device, dtype)),
        img_ids=latent_image_ids(height, width, device, dtype),
    )
    if network.config.get("guidance_embeds", False):
        kwargs["guidance"] = torch.full((x_t.shape[0],), float(guidance_value), device=device).to(
            dtype
        )
    out = network(hidden_states=pack_latents(x_t).to(dtype), return_dict=False, **kwargs)[0]
    return unpack_latents(out, height, width)


def _repeat(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ConfigError(f"{what} has batch size {tensor.shape[0]}, expected 1 or {batch}.")


def make_denoiser(
    model: MainModel,
    context: Context,
    branch: DualBranch | None = None,
    condition: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> Denoiser:
    """The :class:`Denoiser` of ``model`` under ``context``: the main network alone, or with
    ``branch`` (main + side network) and its ``condition`` the controlled prediction."""
    from diffusers import FluxTransformer2DModel

    network = model.main_network
    if (branch is None) != (condition is None):
        raise ConfigError("a side network and its condition come together: pass both or neither.")
    if branch is not None:
        extra = {} if conditioning_scale == 1.0 else {"conditioning_scale": conditioning_scale}

        def predict(x, t):
            cond = _repeat(condition.to(x.device), x.shape[0], "condition")
            ctx = context.to(x.device)
            return branch(x, t, ctx, cond, **extra).output

    elif isinstance(network, FluxTransformer2DModel):

        def predict(x, t):
            return flux_predict(network, x, t, context.to(x.device))

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
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((posterior.mean.float() - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def from_model_space(model: MainModel, x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_model_space`: images in [-1, 1] (clamped)."""
    from ..eval.sampling import decode

    return decode(model.vae, x).float()
