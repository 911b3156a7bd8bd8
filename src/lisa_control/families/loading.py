"""Finding and loading the frozen main model: a diffusers Stable Diffusion folder or hub id, a
pixel-space model folder written by ``lisa pretrain``, or a tiny network shipped in the package.

A pixel-space model folder holds ``lisa_model.json`` (family, task, resolution, objective), the
network (``unet/`` for UNets, ``transformer/`` for the flow DiT) and ``scheduler/`` in diffusers
layout; it has no VAE. Without a text encoder it is conditioned on a constant null text context;
one trained on captions (``lisa pretrain --text_encoder``) also holds ``text_encoder/`` and
``tokenizer/`` (a CLIP text model), named by ``"text_encoder"`` in ``lisa_model.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import CheckpointError, ModelError
from .base import MainModel
from .registry import family_of_network, family_of_pipeline, get_family

PIXEL_MODEL_FILE = "lisa_model.json"
SHIPPED_WEIGHTS = Path(__file__).parent.parent / "weights"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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


def check_weight_files(folder: Path, allow_pickle: bool) -> None:
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


def load_clip_text_encoder(folder: Path, tokenizer_folder: Path | None = None, what: str = ""):
    """(CLIP text model, its tokenizer) from ``folder`` (the tokenizer from ``tokenizer_folder``,
    default the same folder); a folder that holds no CLIP text model is a one-line ModelError
    naming ``what`` (e.g. the flag that passed it)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel

    what = what or str(folder)
    if not folder.is_dir():
        raise ModelError(
            f"{what} {str(folder)!r} {'is a file' if folder.exists() else 'does not exist'}; pass "
            "a folder holding a CLIP text model (config.json, model.safetensors) and its tokenizer."
        )
    try:
        model_type = AutoConfig.from_pretrained(folder).model_type
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{what} {str(folder)!r} is not a CLIP text model folder ({_first_line(exc)})."
        ) from None
    if model_type != "clip_text_model":
        raise ModelError(
            f"{what} {str(folder)!r} holds a {model_type!r} model, not a CLIP text model "
            "(model_type 'clip_text_model'), e.g. a Stable Diffusion folder's text_encoder/."
        )
    check_weight_files(folder, allow_pickle=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
        text_encoder = CLIPTextModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"cannot load the CLIP text model and tokenizer from {what} {str(folder)!r} "
            f"({_first_line(exc)}); the folder needs the tokenizer's files next to the model's."
        ) from None
    return text_encoder, tokenizer


def load_pixel_model(folder: Path, allow_pickle: bool = False) -> MainModel:

    meta = json.loads((folder / PIXEL_MODEL_FILE).read_text())
    try:
        family = get_family(meta.get("family", "unet"))
    except ModelError as exc:
        raise ModelError(
            f"{folder / PIXEL_MODEL_FILE}: {exc} Re-save the model with `lisa pretrain` or fix "
            "the file."
        ) from None
    check_weight_files(folder / family.network_folder, allow_pickle)
    network = family.network_class.from_pretrained(
        folder / family.network_folder, use_safetensors=not allow_pickle
    )
    scheduler = family.scheduler_class.from_pretrained(folder / "scheduler")
    objective = meta.get("objective") or scheduler.config.get("prediction_type", "epsilon")
    text_encoder = tokenizer = None
    if meta.get("text_encoder"):
        text_encoder, tokenizer = load_clip_text_encoder(
            folder / meta["text_encoder"], folder / meta.get("tokenizer", "tokenizer")
        )
    return MainModel(
        main_network=network,
        scheduler=scheduler,
        family=family,
        resolution=int(meta["resolution"]),
        task=meta.get("task"),
        source=str(folder),
        objective=objective,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def load_pipeline_parts(
    pipeline_cls, name: str, revision=None, variant=None, allow_pickle=False, optional=()
):
    """A diffusers pipeline whose main network is a ``transformer`` (SD3, Flux, Wan), with the
    optional components its folder omits passed as ``None`` (SD3 without T5, no IP-Adapter
    encoder, and the components named in ``optional``)."""
    local = Path(name)
    if local.is_dir():
        for sub in ("transformer", "vae"):
            check_weight_files(local / sub, allow_pickle)
    index = _pipeline_index(name, revision)
    optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor", *optional)
    accepted = _init_parameters(pipeline_cls)
    absent = {k: None for k in optional if k in accepted and index.get(k, [None])[0] is None}
    try:
        return pipeline_cls.from_pretrained(
            name, revision=revision, variant=variant, use_safetensors=not allow_pickle, **absent
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load a {pipeline_cls.__name__} from {name!r}: {_first_line(exc)}. Pass a "
            "diffusers folder with transformer/, vae/, text encoders and scheduler/, or a hub id."
        ) from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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

    family = family_of_pipeline(_pipeline_index(name, revision).get("_class_name", ""))
    return family.load_pipeline(name, revision, variant, allow_pickle)


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
        check_weight_files(folder, allow_pickle)
    elif not _looks_like_hub_id(name):
        raise ModelError(f"--controlnet_model_name_or_path {name!r} does not exist.")
    try:
        return model_cls.from_pretrained(name, use_safetensors=not allow_pickle)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a ControlNet from {name!r}: {exc}") from None


def save_pixel_model(
    folder: Path,
    network,
    scheduler,
    resolution: int,
    task: str | None,
    text_encoder=None,
    tokenizer=None,
    **meta,
) -> None:
    """Write a pixel-space main model folder (what ``lisa pretrain`` produces), with the CLIP
    ``text_encoder`` and ``tokenizer`` the network was trained on captions with, when given."""

    family = family_of_network(network)
    folder.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(folder / family.network_folder, safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    info = {"family": family.name, "resolution": resolution, "task": task}
    if text_encoder is not None:
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(folder / "tokenizer")
        info |= {"text_encoder": "text_encoder", "tokenizer": "tokenizer"}
    info |= meta
    (folder / PIXEL_MODEL_FILE).write_text(json.dumps(info, indent=2))
