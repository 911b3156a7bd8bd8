"""Finding and loading the frozen main model: a diffusers Stable Diffusion folder or hub id, a
pixel-space model folder written by ``lisa pretrain``, or a tiny network shipped in the package.

A pixel-space model folder holds ``lisa_model.json`` (family, task, resolution, objective), the
network (``unet/`` for UNets, ``transformer/`` for the flow DiT) and ``scheduler/`` in diffusers
layout; it has no VAE and no text encoder, and is conditioned on a constant null text context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import CheckpointError, ModelError

PIXEL_MODEL_FILE = "lisa_model.json"
SHIPPED_WEIGHTS = Path(__file__).parent.parent / "weights"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class MainModel:
    """The frozen parts of a model family, plus what the trainer must know about them."""

    main_network: torch.nn.Module
    scheduler: object
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    resolution: int = 512
    task: str | None = None
    source: str = ""
    # "unet" (UNet2DConditionModel), "sd3" (SD3Transformer2DModel), "flux" (FluxTransformer2DModel)
    family: str = "unet"
    objective: str = "epsilon"  # "epsilon", "v_prediction" or "flow"
    # Text conditioning through a pipeline's own encode_prompt (SD3's two CLIPs and T5), for
    # families whose context is more than one text encoder's hidden states.
    prompt_encoder: object | None = None

    @property
    def condition_in_latent_space(self) -> bool:
        """SD3 and Flux ControlNets take the VAE-encoded control image (as their pipelines do);
        UNet ControlNets and T2I-Adapters encode the condition image themselves."""
        return self.vae is not None and self.family in ("sd3", "flux")

    def training_objective(self, prediction_type: str | None = None, timestep_sampler=None):
        """The objective the model was trained with: DDPM eps/v over its scheduler, or rectified
        flow; latent SD3 and Flux models get diffusers' recipes with their scheduler's shift."""
        from ..core.objectives import make_objective

        name = prediction_type or self.objective
        if name == "flow" and not self.is_pixel_space and self.family in ("sd3", "flux"):
            from .sd3 import PreconditionedFlowObjective

            if self.family == "sd3":
                return PreconditionedFlowObjective.from_scheduler(self.scheduler)
            # diffusers' train_controlnet_flux.py: the scheduler's static shift, plain velocity
            # loss (Flux's scheduler shifts dynamically only at inference).
            return PreconditionedFlowObjective(
                shift=self.scheduler.config.shift,
                num_timesteps=self.scheduler.config.num_train_timesteps,
                precondition_outputs=False,
            )
        return make_objective(
            name,
            scheduler=None if name == "flow" else self.scheduler,
            timestep_sampler=timestep_sampler if name != "flow" else None,
        )

    @property
    def is_pixel_space(self) -> bool:
        return self.vae is None

    @property
    def sample_channels(self) -> int:
        """Channels of the image-shaped sample the objective noises (Flux transformers take it
        packed, 2x2 patches per token, so their ``in_channels`` is four times this)."""
        channels = self.main_network.config.in_channels
        return channels // 4 if self.family == "flux" else channels

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this: the main network halves its input three
        times, after the VAE's own down-sampling."""
        return 8 * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def shipped_model_dir(task: str) -> Path:
    """The folder of the tiny main network shipped for ``task``."""
    index_file = SHIPPED_WEIGHTS / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    if task not in index:
        raise ModelError(
            f"no main network is shipped for task {task!r} (shipped: "
            f"{', '.join(sorted(index)) or 'none'}). Train one with `lisa pretrain --task {task} "
            "--output_dir DIR` and pass --pretrained_model_name_or_path DIR."
        )
    return SHIPPED_WEIGHTS / index[task]


def _check_weight_files(folder: Path, allow_pickle: bool) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    if any(p.suffix in _PICKLE_SUFFIXES for p in files):
        if allow_pickle:
            return
        raise CheckpointError(
            f"{folder} holds only pickle weights (.bin/.pt), which can run arbitrary code when "
            "loaded. Convert them to safetensors, or pass --allow_pickle if you trust the source."
        )
    raise ModelError(f"{folder} holds no model weights (.safetensors); is it the right folder?")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_pixel_model(folder: Path, allow_pickle: bool = False) -> MainModel:
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    meta = json.loads((folder / PIXEL_MODEL_FILE).read_text())
    family = meta.get("family", "unet")
    families = {
        "unet": (UNet2DConditionModel, "unet", DDPMScheduler),
        "sd3": (SD3Transformer2DModel, "transformer", FlowMatchEulerDiscreteScheduler),
        "flux": (FluxTransformer2DModel, "transformer", FlowMatchEulerDiscreteScheduler),
    }
    if family not in families:
        raise ModelError(
            f"{folder / PIXEL_MODEL_FILE} names the model family {family!r}; this version knows "
            f"{', '.join(families)}. Re-save the model with `lisa pretrain` or fix the file."
        )
    network_cls, sub, scheduler_cls = families[family]
    _check_weight_files(folder / sub, allow_pickle)
    network = network_cls.from_pretrained(folder / sub, use_safetensors=not allow_pickle)
    scheduler = scheduler_cls.from_pretrained(folder / "scheduler")
    objective = meta.get("objective") or scheduler.config.get("prediction_type", "epsilon")
    return MainModel(
        main_network=network,
        scheduler=scheduler,
        resolution=int(meta["resolution"]),
        task=meta.get("task"),
        source=str(folder),
        family=family,
        objective=objective,
    )


def load_stable_diffusion(
    name: str, revision=None, variant=None, allow_pickle: bool = False
) -> MainModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    local = Path(name)
    if local.is_dir():
        for sub in ("unet", "vae"):
            _check_weight_files(local / sub, allow_pickle)
    kw = dict(revision=revision, use_safetensors=not allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(
            name, subfolder="text_encoder", revision=revision, variant=variant
        )
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load a Stable Diffusion model from {name!r}: {first}. Pass a diffusers "
            "folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/, or a hub id "
            "reachable from this machine."
        ) from None
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return MainModel(
        main_network=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        resolution=resolution,
        source=name,
        objective=scheduler.config.prediction_type,
    )


def load_flow_pipeline(
    name: str, family: str, revision=None, variant=None, allow_pickle: bool = False
) -> MainModel:
    """A Stable Diffusion 3 / 3.5 (``family="sd3"``) or Flux.1 (``"flux"``) folder or hub id:
    transformer, VAE, scheduler, and the text encoders behind the pipeline's own
    ``encode_prompt``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from .encoders import PipelinePrompts

    pipeline_cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    local = Path(name)
    if local.is_dir():
        for sub in ("transformer", "vae"):
            _check_weight_files(local / sub, allow_pickle)
    # SD3 runs without T5 (zeros in its place), both without the IP-Adapter image encoder; a
    # folder saved that way lists no such component, and the pipeline wants them passed as None.
    index = _pipeline_index(name, revision)
    optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    accepted = _init_parameters(pipeline_cls)
    absent = {k: None for k in optional if k in accepted and index.get(k, [None])[0] is None}
    try:
        pipe = pipeline_cls.from_pretrained(
            name, revision=revision, variant=variant, use_safetensors=not allow_pickle, **absent
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load a {pipeline_cls.__name__} from {name!r}: {first}. Pass a diffusers "
            "folder with transformer/, vae/, text encoders and scheduler/, or a hub id."
        ) from None
    # Flux's transformer has no sample_size; its pipeline's default is 128 latent pixels.
    latent_size = getattr(pipe.transformer.config, "sample_size", None)
    latent_size = latent_size or getattr(pipe, "default_sample_size", 128)
    return MainModel(
        main_network=pipe.transformer,
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        resolution=latent_size * pipe.vae_scale_factor,
        source=name,
        family=family,
        objective="flow",
        prompt_encoder=PipelinePrompts(pipe),
    )


def _init_parameters(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _pipeline_index(name: str, revision=None) -> dict:
    """A diffusers folder's or hub repo's model_index.json ({} if there is none)."""
    index = Path(name) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    if Path(name).exists():
        return {}
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(name, revision=revision))
    except (OSError, ValueError):
        return {}  # the Stable Diffusion loader then reports what is missing


def _load_diffusers(name: str, revision, variant, allow_pickle) -> MainModel:
    cls = _pipeline_index(name, revision).get("_class_name", "")
    if cls.startswith("StableDiffusion3"):
        return load_flow_pipeline(name, "sd3", revision, variant, allow_pickle)
    if cls.startswith("Flux"):
        return load_flow_pipeline(name, "flux", revision, variant, allow_pickle)
    return load_stable_diffusion(name, revision, variant, allow_pickle)


def load_main_model(
    name: str | None, task: str | None = None, revision=None, variant=None, allow_pickle=False
) -> MainModel:
    """Load the main model named by ``--pretrained_model_name_or_path`` (or the shipped one
    for ``task`` when no name is given)."""
    if name is None:
        if task is None:
            raise ModelError(
                "no main network: pass --pretrained_model_name_or_path (a diffusers folder or "
                "hub id) or --task for the embedded default."
            )
        return load_pixel_model(shipped_model_dir(task))
    if name.startswith("embedded:"):
        return load_pixel_model(shipped_model_dir(name.split(":", 1)[1]))
    folder = Path(name).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelError(f"{name!r} is a file; pass the model's folder.")
        if (folder / PIXEL_MODEL_FILE).is_file():
            return load_pixel_model(folder, allow_pickle)
        if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
            return _load_diffusers(str(folder), revision, variant, allow_pickle)
        raise ModelError(
            f"{name!r} is not a diffusers model folder (no model_index.json or unet/) nor a "
            f"`lisa pretrain` folder (no {PIXEL_MODEL_FILE})."
        )
    if _looks_like_hub_id(name):
        return _load_diffusers(name, revision, variant, allow_pickle)
    raise ModelError(
        f"model path {name!r} does not exist. Pass an existing folder or a hub id like 'org/model'."
    )


def load_side_network(name: str, allow_pickle: bool = False, model_cls=None):
    """A ControlNet (``model_cls``, default ``ControlNetModel``) from a diffusers folder or hub
    id, refusing pickle weights by default."""
    from diffusers import ControlNetModel

    model_cls = model_cls or ControlNetModel

    folder = Path(name)
    if folder.exists():
        if not folder.is_dir():
            raise ModelError(
                f"--controlnet_model_name_or_path {name!r} is a file; pass its folder."
            )
        if not (folder / "config.json").is_file():
            raise ModelError(f"{name!r} is not a diffusers model folder (no config.json).")
        _check_weight_files(folder, allow_pickle)
    elif not _looks_like_hub_id(name):
        raise ModelError(f"--controlnet_model_name_or_path {name!r} does not exist.")
    try:
        return model_cls.from_pretrained(name, use_safetensors=not allow_pickle)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a ControlNet from {name!r}: {exc}") from None


def save_pixel_model(
    folder: Path, network, scheduler, resolution: int, task: str | None, **meta
) -> None:
    """Write a pixel-space main model folder (what ``lisa pretrain`` produces)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family = {SD3Transformer2DModel: "sd3", FluxTransformer2DModel: "flux"}.get(
        type(network), "unet"
    )
    folder.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(
        folder / ("unet" if family == "unet" else "transformer"), safe_serialization=True
    )
    scheduler.save_pretrained(folder / "scheduler")
    info = {"family": family, "resolution": resolution, "task": task, **meta}
    (folder / PIXEL_MODEL_FILE).write_text(json.dumps(info, indent=2))
