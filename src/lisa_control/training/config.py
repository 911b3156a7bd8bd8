"""Training configuration: one dataclass whose field names are the command-line flags.

Flags keep the names and meanings of diffusers' ``examples/controlnet/train_controlnet.py`` where
the concept is the same, so switching is a matter of changing the command name. A ``--config``
file (YAML or TOML) uses the same keys; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError


@dataclass
class TrainConfig:
    # models
    pretrained_model_name_or_path: str | None = None
    controlnet_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    # data
    task: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    task_train_size: int = 100_000
    proportion_empty_prompts: float = 0.0
    resolution: int | None = None
    cache_latents: bool = False
    dataloader_num_workers: int = 0
    # optimisation
    output_dir: str = "lisa-controlnet"
    seed: int | None = 0
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    learning_rate: float = 5e-6
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"
    timestep_sampler: str = "uniform"
    prediction_type: str | None = None
    on_nonfinite: str = "stop"
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    side_network: str = "controlnet"
    # regularizers
    regularizer: str = "lisa"
    lisa_weight: float = 0.2
    lisa_layer: str | None = None
    lisa_distance: str = "mse"
    lisa_timestep_range: list[float] | None = None
    lisa_target: str = "residual"
    lisa_final_weight: float | None = None
    lisa_weight_decay_steps: int = 0
    lisa_decoder_learning_rate: float | None = None
    layersync_pairs: str | None = None
    layersync_weight: float = 0.2
    # validation and logging
    validation_image: list[str] | None = None
    validation_prompt: list[str] | None = None
    num_validation_images: int = 4
    validation_conditions: int = 8
    validation_steps: int = 100
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 1.0
    validation_feature_distance: bool = False
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "lisa_control"
    device: str | None = None
    progress: bool = True
    # extra keys go through a config file only
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed: what defines the model,
        its data order and its loss. Step counts, logging and paths may change on resume."""
        keys = (
            "pretrained_model_name_or_path",
            "task",
            "dataset_name",
            "train_data_dir",
            "resolution",
            "seed",
            "train_batch_size",
            "gradient_accumulation_steps",
            "side_network",
            "regularizer",
            "lisa_weight",
            "lisa_layer",
            "lisa_distance",
            "lisa_target",
            "lisa_final_weight",
            "lisa_weight_decay_steps",
            "lisa_decoder_learning_rate",
            "layersync_pairs",
            "layersync_weight",
            "prediction_type",
            "timestep_sampler",
        )
        return {k: getattr(self, k) for k in keys}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra"}

_CHOICES = {
    "regularizer": ("lisa", "none", "layersync", "lisa+layersync"),
    "mixed_precision": (None, "no", "fp16", "bf16"),
    "lr_scheduler": (
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
    ),
    "on_nonfinite": ("stop", "skip"),
    "side_network": ("controlnet", "t2i_adapter"),
    "lisa_distance": ("mse", "cosine"),
    "lisa_target": ("residual", "x0", "score"),
    "timestep_sampler": ("uniform", "logit_normal", "cubic"),
    "prediction_type": (None, "epsilon", "v_prediction", "flow"),
}

_HELP = {
    "torch_compile": "torch.compile the main and side networks' blocks (GPU; the first steps "
    "take minutes to compile, later ones about 28%% less time on SD2.1 shapes)",
    "torch_compile_backend": "backend for --torch_compile (default inductor; 'eager' checks the "
    "wiring without generating code)",
    "pretrained_model_name_or_path": "main network: a diffusers folder or hub id, or a folder "
    "made by `lisa pretrain`; default: the shipped tiny network of --task",
    "controlnet_model_name_or_path": "start the side network from these weights instead of "
    "copying the main network's encoder",
    "allow_pickle": "allow loading .bin/.pt weights (pickle can run code; off by default)",
    "task": "an embedded procedural task (pose, edges, segmentation, super_resolution, ...) "
    "instead of a dataset",
    "side_network": "controlnet (default; UNet, SD3 and Flux main networks) or t2i_adapter "
    "(UNet main networks)",
    "regularizer": "lisa (default), none (plain ControlNet), layersync or lisa+layersync",
    "lisa_weight": "lambda, the weight of the LISA loss (paper: 0.2)",
    "lisa_layer": "side-network layer LISA reads: down_0..down_11, mid, or a module path "
    "(default down_5 where it exists)",
    "lisa_timestep_range": "two numbers: apply the LISA loss only for lo <= t < hi",
    "lisa_target": "space of the LISA residual: residual (paper: y - y_prior), x0 (the residual "
    "of the implied clean sample) or score (the likelihood score itself)",
    "lisa_final_weight": "decay lambda linearly from --lisa_weight to this value over "
    "--lisa_weight_decay_steps steps (default: constant lambda)",
    "lisa_decoder_learning_rate": "train the LISA decoder at this learning rate instead of "
    "--learning_rate (default: the same, as in the paper)",
    "on_nonfinite": "on a NaN/Inf loss, or gradient under bf16/fp32 (fp16 overflows are the "
    "grad scaler's): stop (default) or skip the step",
    "config": "YAML or TOML file with the same keys as the flags",
    "cache_latents": "encode each item's image and each caption text once and keep them in "
    "memory",
    "validation_feature_distance": "with --task: also score validation samples by a Fréchet "
    "distance on features of a small network trained on the task's renders (not Inception FID)",
}


def _flag_type(f: dataclasses.Field):
    annotation = str(f.type)
    if "bool" in annotation:
        return "bool"
    if "list" in annotation:
        return "list_float" if "float" in annotation else "list_str"
    if "int" in annotation and "float" not in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def build_parser(prog: str = "lisa train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a side network (ControlNet) for a frozen main network, with LISA.",
    )
    parser.add_argument("--config", type=str, default=None, help=_HELP["config"])
    for name, f in _FIELDS.items():
        kind = _flag_type(f)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _HELP.get(name)}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "list_str":
            kwargs["nargs"] = "+"
        elif kind == "list_float":
            kwargs["nargs"] = 2
            kwargs["type"] = float
        else:
            kwargs["type"] = kind
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass an existing YAML or TOML."
        )
    text = path.read_text()
    try:
        if path.suffix in (".toml",):
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json.")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; all mean the same to the user
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of flag names to values.")
    return data


def _check_key(key: str) -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {key!r}.{hint} Keys are the flag names of `lisa train`."
        )


def make_config(overrides: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a mapping of flag names (file or CLI) to values."""
    for key in overrides:
        _check_key(key)
    values = {}
    for key, value in overrides.items():
        kind = _flag_type(_FIELDS[key])
        if value is not None and kind in (int, float) and not isinstance(value, bool):
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must be a number, got {value!r}.") from None
        if kind == "list_str" and isinstance(value, str):
            value = [value]
        values[key] = value
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    file_values = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    return make_config({**file_values, **args})


def validate(cfg: TrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(
                f"--{key} {getattr(cfg, key)!r} is not one of "
                f"{', '.join(str(c) for c in choices if c is not None)}."
            )
    w = cfg.lisa_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"--lisa_weight must be a finite number >= 0, got {w!r}.")
    for key in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}.")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise ConfigError(f"--max_train_steps must be >= 1, got {cfg.max_train_steps}.")
    for key in ("learning_rate", "lisa_decoder_learning_rate"):
        value = getattr(cfg, key)
        if value is not None and (value <= 0 or not math.isfinite(value)):
            raise ConfigError(f"--{key} must be a positive number, got {value}.")
    if cfg.lisa_decoder_learning_rate is not None and "lisa" not in cfg.regularizer.split("+"):
        raise ConfigError(
            f"--lisa_decoder_learning_rate is for the LISA decoder, but --regularizer is "
            f"{cfg.regularizer!r}; use --regularizer lisa (or lisa+layersync), or drop the flag."
        )
    if not 0 <= cfg.proportion_empty_prompts <= 1:
        raise ConfigError("--proportion_empty_prompts must be in [0, 1].")
    if cfg.torch_compile:
        from .compilation import check_backend

        check_backend(cfg.torch_compile_backend)
    if cfg.resolution is not None and cfg.resolution <= 0:
        raise ConfigError(f"--resolution must be positive, got {cfg.resolution}.")
    sources = [s for s in (cfg.task, cfg.dataset_name, cfg.train_data_dir) if s]
    if len(sources) > 1:
        raise ConfigError(
            "give exactly one data source: --task, --dataset_name or --train_data_dir."
        )
    if cfg.validation_prompt and cfg.validation_image:
        n_p, n_i = len(cfg.validation_prompt), len(cfg.validation_image)
        if n_p != n_i and 1 not in (n_p, n_i):
            raise ConfigError(
                "--validation_image and --validation_prompt must have the same count, or one "
                "of them a single entry (as in diffusers' script)."
            )
    output = Path(cfg.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"--output_dir {cfg.output_dir!r} is a file; give a directory path (it is created)."
        )
