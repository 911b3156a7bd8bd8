"""Training configuration: one dataclass whose field names are the command-line flags.

Each field carries its own help text, allowed values and whether it belongs to the resume
fingerprint (see :func:`flag`); the parser, the validation and :meth:`TrainConfig.fingerprint`
are derived from the fields. Flags keep the names and meanings of diffusers'
``examples/controlnet/train_controlnet.py`` where the concept is the same, so switching is a
matter of changing the command name. A ``--config`` file (YAML, TOML or JSON) uses the same
keys; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.weighting import WEIGHTINGS
from ..families import side_network_kinds
from ..regularizers import REGULARIZERS


def flag(
    default: Any = None,
    help: str | None = None,
    choices: tuple | Callable[[], tuple] | None = None,
    fingerprint: bool = False,
    nargs: str | int | None = None,
):
    """A config field: ``help`` for ``--help``, ``choices`` checked by :func:`validate` (a
    callable is asked when checking, so registries that grow after import are seen),
    ``fingerprint`` when a checkpoint must agree on it to be resumed (it defines the model, its
    data order or its loss), ``nargs`` to override the count the annotation implies."""
    metadata = {"help": help, "choices": choices, "fingerprint": fingerprint, "nargs": nargs}
    return field(default=default, metadata=metadata)


_LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


@dataclass
class TrainConfig:
    # models
    pretrained_model_name_or_path: str | None = flag(
        None,
        "main network: a diffusers folder or hub id, or a folder made by `lisa pretrain`; "
        "default: the shipped tiny network of --task",
        fingerprint=True,
    )
    controlnet_model_name_or_path: str | None = flag(
        None,
        "start the side network from these weights instead of copying the main network's encoder",
    )
    revision: str | None = flag(None)
    variant: str | None = flag(None)
    allow_pickle: bool = flag(
        False, "allow loading .bin/.pt weights (pickle can run code; off by default)"
    )
    # data
    task: str | None = flag(
        None,
        "an embedded procedural task (pose, edges, segmentation, super_resolution, pose_video "
        "for video models, ...) instead of a dataset",
        fingerprint=True,
    )
    dataset_name: str | None = flag(None, fingerprint=True)
    dataset_config_name: str | None = flag(None)
    train_data_dir: str | None = flag(None, fingerprint=True)
    image_column: str = flag("image")
    conditioning_image_column: str | list[str] = flag(
        "conditioning_image",
        "column of the condition images; several (e.g. pose seg) train one side network per "
        "condition together, saved to output_dir/controlnet/<column>/; for a --task that renders "
        "several conditions, the ones to train on (default: all)",
    )
    caption_column: str = flag("text")
    max_train_samples: int | None = flag(None)
    task_train_size: int = flag(100_000)
    proportion_empty_prompts: float = flag(0.0)
    resolution: int | None = flag(None, fingerprint=True)
    num_frames: int | None = flag(
        None,
        "frames per training clip of video models (AnimateDiff): default the task's (pose_video: "
        "8), or 8 from a video folder",
        fingerprint=True,
    )
    video_column: str = flag("video", "metadata column of the training videos (video models)")
    conditioning_video_column: str = flag(
        "conditioning_video", "metadata column of the condition videos (video models)"
    )
    cache_latents: bool = flag(
        False, "encode each item's image and each caption text once and keep them in memory"
    )
    dataloader_num_workers: int = flag(0)
    # optimisation
    output_dir: str = flag("lisa-controlnet")
    overwrite_output_dir: bool = flag(
        False,
        "start afresh in an --output_dir that holds an earlier run, deleting that run's files "
        "(checkpoints, logs, controlnet/, validation images, config.json; other files stay)",
    )
    seed: int | None = flag(0, "random seed, 0 <= seed < 2**32", fingerprint=True)
    train_batch_size: int = flag(4, fingerprint=True)
    gradient_accumulation_steps: int = flag(1, fingerprint=True)
    num_train_epochs: int = flag(
        1, "passes over the data (>= 1); --max_train_steps, when given, wins"
    )
    max_train_steps: int | None = flag(None)
    learning_rate: float = flag(
        5e-6, "AdamW learning rate, in (0, 1]: above 1 each step moves a weight by more than 1"
    )
    scale_lr: bool = flag(False)
    lr_scheduler: str = flag("constant", choices=_LR_SCHEDULERS)
    lr_warmup_steps: int = flag(0)
    lr_num_cycles: int = flag(1)
    lr_power: float = flag(1.0)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_weight_decay: float = flag(1e-2)
    adam_epsilon: float = flag(1e-8)
    max_grad_norm: float = flag(
        1.0, "clip the gradient to this global norm (>= 0); 0 turns clipping off"
    )
    use_8bit_adam: bool = flag(False)
    mixed_precision: str | None = flag(None, choices=(None, "no", "fp16", "bf16"))
    gradient_checkpointing: bool = flag(False)
    allow_tf32: bool = flag(False)
    torch_compile: bool = flag(
        False,
        "torch.compile the main and side networks' blocks (GPU; the first steps take minutes "
        "to compile; BENCHMARKS.md has the measured speed-up)",
    )
    torch_compile_backend: str = flag(
        "inductor",
        "backend for --torch_compile (default inductor; 'eager' checks the wiring without "
        "generating code)",
    )
    timestep_sampler: str = flag(
        "uniform", choices=("uniform", "logit_normal", "cubic"), fingerprint=True
    )
    prediction_type: str | None = flag(
        None, choices=(None, "epsilon", "v_prediction", "flow"), fingerprint=True
    )
    loss_weighting: str | None = flag(
        None,
        "weight the diffusion loss by noise level: none (the LISA paper and the diffusers "
        "scripts), x0 (the error of the implied clean sample, capped by --x0_weight_max) or "
        "min_snr (Min-SNR-gamma, --snr_gamma); default: x0 where the objective takes a "
        "weighting (eps, v, pixel-space flow), none for latent SD3 and Flux (diffusers' own "
        "scheme); a resumed run keeps its checkpoint's",
        choices=(None, *WEIGHTINGS),
        fingerprint=True,
    )
    snr_gamma: float = flag(5.0, "gamma of --loss_weighting min_snr", fingerprint=True)
    x0_weight_max: float = flag(
        5.0, "cap of the per-sample weight of --loss_weighting x0", fingerprint=True
    )
    on_nonfinite: str = flag(
        "stop",
        "on a NaN/Inf loss, or gradient under bf16/fp32 (fp16 overflows are the grad scaler's): "
        "stop (default) or skip the step",
        choices=("stop", "skip"),
    )
    # checkpoints
    checkpointing_steps: int = flag(500)
    checkpoints_total_limit: int | None = flag(None)
    resume_from_checkpoint: str | None = flag(None)
    side_network: str = flag(
        "controlnet",
        "controlnet (default; UNet, SD3, Flux and AnimateDiff main networks), t2i_adapter (UNet "
        "main networks) or sparse_controlnet (SparseCtrl, AnimateDiff main networks)",
        choices=lambda: tuple(side_network_kinds()),
        fingerprint=True,
    )
    # regularizers
    regularizer: str = flag(
        "lisa",
        "lisa (default), none (plain ControlNet), layersync, or both: lisa layersync (also "
        "written lisa+layersync)",
        choices=lambda: (*REGULARIZERS, "none"),
        fingerprint=True,
        nargs="+",
    )
    lisa_weight: float = flag(
        0.2, "lambda, the weight of the LISA loss (paper: 0.2)", fingerprint=True
    )
    lisa_layer: str | None = flag(
        None,
        "side-network layer LISA reads: down_0..down_11, mid, or a module path (default down_5 "
        "where it exists)",
        fingerprint=True,
    )
    lisa_distance: str = flag("mse", choices=("mse", "cosine"), fingerprint=True)
    lisa_timestep_range: list[float] | None = flag(
        None, "two numbers: apply the LISA loss only for lo <= t < hi"
    )
    lisa_target: str = flag(
        "residual",
        "space of the LISA residual: residual (paper: y - y_prior), x0 (the residual of the "
        "implied clean sample) or score (the likelihood score itself)",
        choices=("residual", "x0", "score"),
        fingerprint=True,
    )
    lisa_final_weight: float | None = flag(
        None,
        "decay lambda linearly from --lisa_weight to this value over --lisa_weight_decay_steps "
        "steps (default: constant lambda)",
        fingerprint=True,
    )
    lisa_weight_decay_steps: int = flag(0, fingerprint=True)
    lisa_decoder_learning_rate: float | None = flag(
        None,
        "train the LISA decoder at this learning rate instead of --learning_rate (default: the "
        "same, as in the paper)",
        fingerprint=True,
    )
    lisa_batch_fraction: float = flag(
        1.0,
        "F in (0, 1]: compute the LISA prior, decoder and loss on ceil(F x batch) rows of each "
        "batch, an unbiased estimate of the full loss at about F of the prior's cost (default "
        "1: every row)",
        fingerprint=True,
    )
    lisa_subset: str = flag(
        "first",
        "the rows --lisa_batch_fraction takes: first (default; the batch order is shuffled), "
        "random, or timestep (the rows with t in --lisa_timestep_range, at most ceil(F x "
        "batch) of them: that range's loss with a prior for those rows only)",
        choices=("first", "random", "timestep"),
        fingerprint=True,
    )
    layersync_pairs: str | None = flag(None, fingerprint=True)
    layersync_weight: float = flag(0.2, fingerprint=True)
    # validation and logging
    validation_image: list[str] | None = flag(None)
    validation_prompt: list[str] | None = flag(None)
    num_validation_images: int = flag(4)
    validation_conditions: int = flag(8)
    validation_steps: int = flag(100)
    validation_inference_steps: int = flag(20)
    validation_guidance_scale: float = flag(1.0)
    validation_feature_distance: bool = flag(
        False,
        "with --task: also score validation samples by a Fréchet distance on features of a "
        "small network trained on the task's renders (not Inception FID)",
    )
    logging_steps: int = flag(
        1,
        "write one loss record (the mean over the steps since the previous one) every N steps "
        "to loss_log.jsonl, the tracker and the progress bar",
    )
    report_to: str = flag("tensorboard")
    logging_dir: str = flag("logs")
    tracker_project_name: str = flag("lisa_control")
    device: str | None = flag(None)
    progress: bool = flag(True)
    # extra keys go through a config file only
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.regularizer = normalize_regularizer(self.regularizer)
        # One column stays a string (the single-condition spelling); several stay a list.
        column = self.conditioning_image_column
        if not isinstance(column, str) and len(column) == 1:
            self.conditioning_image_column = str(column[0])

    @property
    def regularizer_names(self) -> tuple[str, ...]:
        """The regularizers to train with, in build order; empty for ``none``."""
        return tuple(n for n in self.regularizer.split("+") if n != "none")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed: what defines the model,
        its data order and its loss. Step counts, logging and paths may change on resume."""
        return {
            f.name: getattr(self, f.name) for f in _FIELDS.values() if f.metadata["fingerprint"]
        }


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra"}


def normalize_regularizer(value: str | list[str] | tuple[str, ...]) -> str:
    """One spelling for a regularizer choice: ``"lisa"``, ``"none"``, ``"lisa+layersync"``, ...

    Accepts a name, names joined by ``+``, or a list of either (``--regularizer lisa
    layersync``). Known names come out in :data:`REGULARIZERS` order and once each; ``none``
    stands alone. Unknown names are kept, so that :func:`validate` names them.
    """
    parts = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for part in parts:
        for name in str(part).split("+"):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    known = [n for n in REGULARIZERS if n in names]
    others = [n for n in names if n not in REGULARIZERS and n != "none"]
    if not known and not others:
        return "none"
    if "none" in names:
        others.append("none")  # "none" beside a regularizer is refused by validate
    return "+".join(known + others)


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


def _help(f: dataclasses.Field) -> str | None:
    """The field's help, or the values it takes when it has choices and no help."""
    choices = [str(c) for c in field_choices(f) or () if c is not None]
    return f.metadata["help"] or (f"one of {', '.join(choices)}" if choices else None)


def build_parser(prog: str = "lisa train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a side network (ControlNet) for a frozen main network, with LISA.",
    )
    parser.add_argument(
        "--config", type=str, default=None, help="YAML or TOML file with the same keys as the flags"
    )
    for name, f in _FIELDS.items():
        kind = _flag_type(f)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(f)}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "list_str":
            kwargs["nargs"] = "+"
        elif kind == "list_float":
            kwargs["nargs"] = 2
            kwargs["type"] = float
        else:
            kwargs["type"] = kind
        if f.metadata["nargs"] is not None:
            kwargs["nargs"] = f.metadata["nargs"]
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise ConfigError(f"config file {str(path)!r} {problem}.")
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
    if not isinstance(key, str):
        raise ConfigError(
            f"config key {key!r} ({type(key).__name__}) is not a flag name; keys are the flag "
            "names of `lisa train`, written as text."
        )
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
    values = {key: _coerce(key, value) for key, value in overrides.items()}
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


_EXPECTED = {
    int: "a whole number",
    float: "a number",
    str: "text",
    "bool": "true or false",
    "list_str": "text or a list of texts",
    "list_float": "a list of two numbers",
}


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the type of field ``key``, or a one-line ConfigError naming the key and the
    type it takes. Nothing is rounded or guessed: an int field takes whole numbers (2 or 2.0,
    not 2.7 or true), a float field numbers (not true), a text field text, a bool field true or
    false; numbers written as text ("5e-6", which YAML reads as text) are read as numbers. null
    is kept for the fields whose default may be None."""
    f = _FIELDS[key]
    kind = _flag_type(f)
    if f.metadata["nargs"] == "+" and kind is str:
        kind = "list_str"  # a choice that takes several values (--regularizer lisa layersync)
    if value is None:
        if "None" in str(f.type):
            return None
        raise _type_error(key, kind, value)
    if kind is int or kind is float:
        number = _number(value)
        if number is None:
            raise _type_error(key, kind, value)
        if kind is float:
            try:
                return float(number)
            except OverflowError:  # an integer beyond float's range
                raise _type_error(key, kind, value) from None
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise _type_error(key, kind, value)
        return int(number)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(key, kind, value)
        return value
    if kind == "list_str":
        if isinstance(value, str):
            return [value] if _flag_type(f) == "list_str" else value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise _type_error(key, kind, value)
    if kind == "list_float":
        numbers = [_number(v) for v in value] if isinstance(value, (list, tuple)) else []
        if len(numbers) != 2 or any(n is None for n in numbers):
            raise _type_error(key, kind, value)
        try:
            return [float(n) for n in numbers]
        except OverflowError:
            raise _type_error(key, kind, value) from None
    if not isinstance(value, str):
        raise _type_error(key, kind, value)
    return value


def _number(value: Any) -> int | float | None:
    """An int or float from a number or a number written as text; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    return None


def _type_error(key: str, kind, value: Any) -> ConfigError:
    try:
        shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
    except ValueError:  # an int too long to print
        shown = f"a {type(value).__name__} too long to show"
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    fix = {
        int: f"write a whole number, e.g. {key}: 2",
        float: f"write a number, e.g. {key}: 0.5",
        "bool": f"write {key}: true or {key}: false",
        "list_float": f"write two numbers, e.g. {key}: [0, 500]",
        "list_str": f'write texts in quotes, e.g. {key}: ["..."]',
    }.get(kind, f'write it in quotes, e.g. {key}: "..."')
    return ConfigError(f"{key} must be {_EXPECTED[kind]}, got {shown}; {fix}.")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    file_values = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    return make_config({**file_values, **args})


def field_choices(f: dataclasses.Field) -> tuple | None:
    """The values a field takes, asking the registry when its choices are a callable."""
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def _check_choices(cfg: TrainConfig) -> None:
    for name, f in _FIELDS.items():
        choices = field_choices(f)
        if choices is None:
            continue
        values = getattr(cfg, name).split("+") if name == "regularizer" else [getattr(cfg, name)]
        for value in values:
            if value not in choices:
                raise ConfigError(
                    f"--{name} {value!r} is not one of "
                    f"{', '.join(str(c) for c in choices if c is not None)}."
                )
    if "none" in cfg.regularizer.split("+") and cfg.regularizer != "none":
        raise ConfigError(
            f"--regularizer {cfg.regularizer!r}: 'none' cannot be combined with a regularizer; "
            "drop it or pass none alone."
        )


# Above this, one AdamW step moves a weight by more than 1 (its step is about lr per weight):
# the run diverges or overflows. Every recipe this project knows uses 1e-6 .. 1e-2.
MAX_LEARNING_RATE = 1.0


def _check_numbers(cfg: TrainConfig) -> None:
    w = cfg.lisa_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"--lisa_weight must be a finite number >= 0, got {w!r}.")
    for key in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "logging_steps",
        "num_train_epochs",
    ):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}.")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise ConfigError(f"--max_train_steps must be >= 1, got {cfg.max_train_steps}.")
    for key in ("learning_rate", "lisa_decoder_learning_rate"):
        value = getattr(cfg, key)
        if value is not None and (value <= 0 or not math.isfinite(value)):
            raise ConfigError(f"--{key} must be a positive number, got {value}.")
        if value is not None and value > MAX_LEARNING_RATE:
            raise ConfigError(
                f"--{key} {value:g} is above {MAX_LEARNING_RATE:g}: each AdamW step would move "
                f"a weight by about that much and training would diverge; use e.g. 1e-5 .. 1e-3."
            )
    if math.isnan(cfg.max_grad_norm) or cfg.max_grad_norm < 0:
        raise ConfigError(
            f"--max_grad_norm must be >= 0 (0 turns clipping off), got {cfg.max_grad_norm}; "
            "e.g. --max_grad_norm 1.0."
        )
    if cfg.seed is not None and not 0 <= cfg.seed < 2**32:
        raise ConfigError(
            f"--seed must be in 0 .. 2**32 - 1 (the range numpy and torch seed from), got "
            f"{cfg.seed}; e.g. --seed 0."
        )
    f = cfg.lisa_batch_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ConfigError(f"--lisa_batch_fraction must be a number in (0, 1], got {f!r}.")
    if not 0 <= cfg.proportion_empty_prompts <= 1:
        raise ConfigError("--proportion_empty_prompts must be in [0, 1].")
    if cfg.resolution is not None and cfg.resolution <= 0:
        raise ConfigError(f"--resolution must be positive, got {cfg.resolution}.")


def _check_combinations(cfg: TrainConfig) -> None:
    if cfg.lisa_decoder_learning_rate is not None and "lisa" not in cfg.regularizer_names:
        raise ConfigError(
            f"--lisa_decoder_learning_rate is for the LISA decoder, but --regularizer is "
            f"{cfg.regularizer!r}; use --regularizer lisa (or lisa layersync), or drop the flag."
        )
    subset_flags = [
        flag
        for flag, value, default in (
            ("--lisa_batch_fraction", cfg.lisa_batch_fraction, 1.0),
            ("--lisa_subset", cfg.lisa_subset, "first"),
        )
        if value != default
    ]
    if subset_flags and "lisa" not in cfg.regularizer_names:
        raise ConfigError(
            f"{' and '.join(subset_flags)} choose the rows LISA reads, but --regularizer is "
            f"{cfg.regularizer!r}; use --regularizer lisa (or lisa layersync), or drop them."
        )
    if cfg.lisa_subset == "timestep" and not cfg.lisa_timestep_range:
        raise ConfigError(
            "--lisa_subset timestep takes the rows with t in --lisa_timestep_range; give the "
            "range too (e.g. --lisa_timestep_range 500 1000)."
        )
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
    _check_paths(cfg)
    output = Path(cfg.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"--output_dir {cfg.output_dir!r} is a file; give a directory path (it is created)."
        )
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        raise ConfigError(
            "--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would "
            "resume from; pass one of the two."
        )


_PATH_FLAGS = (
    "pretrained_model_name_or_path",
    "controlnet_model_name_or_path",
    "train_data_dir",
    "output_dir",
    "resume_from_checkpoint",
    "validation_image",
)


def _check_paths(cfg: TrainConfig) -> None:
    """Paths the file system cannot take or follow, named as such instead of as missing."""
    for key in _PATH_FLAGS:
        values = getattr(cfg, key)
        for value in values if isinstance(values, list) else [values]:
            problem = None if value is None else path_problem(value)
            if problem:
                raise ConfigError(f"--{key} {value!r} {problem}.")


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be looked up: it holds a NUL character, is too long, or is a
    symbolic link loop (following it leads back to itself); None when it exists or simply does
    not."""
    try:
        os.stat(path)
    except ValueError:
        return "cannot be a file name (it holds a NUL character or invalid text); fix it"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return (
                "is a symbolic link loop (following it leads back to itself); point it at a real "
                "file or folder"
            )
        if err.errno == errno.ENAMETOOLONG:
            return "is too long for the file system; use a shorter path"
    return None


def validate(cfg: TrainConfig) -> None:
    _check_choices(cfg)
    _check_numbers(cfg)
    _check_combinations(cfg)
    if cfg.torch_compile:
        from .compilation import check_backend

        check_backend(cfg.torch_compile_backend)
