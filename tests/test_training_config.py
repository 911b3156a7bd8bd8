"""The training config: flags and defaults stay as they were, the regularizer takes every
spelling (a list, ``lisa+layersync``, a config-file string or list) and fingerprints as before,
so checkpoints written under the old spelling resume; the condition column takes one name or
several."""

from __future__ import annotations

import dataclasses
import json

import pytest
from factories import make_image_folder, make_pixel_model

from lisa_control.cli import main
from lisa_control.core.errors import ConfigError
from lisa_control.training.config import TrainConfig, build_parser, make_config, parse_args

# The flags and defaults of `lisa train` (the flag names are the field names).
DEFAULTS = {
    "pretrained_model_name_or_path": None, "controlnet_model_name_or_path": None,
    "revision": None, "variant": None, "allow_pickle": False, "task": None, "dataset_name": None,
    "dataset_config_name": None, "train_data_dir": None, "image_column": "image",
    "conditioning_image_column": "conditioning_image", "caption_column": "text",
    "max_train_samples": None, "task_train_size": 100000, "proportion_empty_prompts": 0.0,
    "resolution": None, "num_frames": None, "video_column": "video",
    "conditioning_video_column": "conditioning_video", "cache_latents": False,
    "dataloader_num_workers": 0, "output_dir": "lisa-controlnet", "overwrite_output_dir": False,
    "seed": 0, "train_batch_size": 4,
    "gradient_accumulation_steps": 1, "num_train_epochs": 1, "max_train_steps": None,
    "learning_rate": 5e-06, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 0,
    "lr_num_cycles": 1, "lr_power": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_weight_decay": 0.01, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
    "use_8bit_adam": False, "mixed_precision": None, "gradient_checkpointing": False,
    "allow_tf32": False, "torch_compile": False, "torch_compile_backend": "inductor",
    "timestep_sampler": "uniform", "prediction_type": None, "loss_weighting": None,
    "snr_gamma": 5.0, "x0_weight_max": 5.0, "on_nonfinite": "stop", "checkpointing_steps": 500,
    "checkpoints_total_limit": None, "resume_from_checkpoint": None,
    "side_network": "controlnet", "regularizer": "lisa", "lisa_weight": 0.2, "lisa_layer": None,
    "lisa_distance": "mse", "lisa_timestep_range": None, "lisa_target": "residual",
    "lisa_final_weight": None, "lisa_weight_decay_steps": 0, "lisa_decoder_learning_rate": None,
    "lisa_batch_fraction": 1.0, "lisa_subset": "first", "layersync_pairs": None,
    "layersync_weight": 0.2, "validation_image": None,
    "validation_prompt": None, "num_validation_images": 4, "validation_conditions": 8,
    "validation_steps": 100, "validation_inference_steps": 20, "validation_guidance_scale": 1.0,
    "validation_feature_distance": False, "logging_steps": 1, "report_to": "tensorboard",
    "logging_dir": "logs", "tracker_project_name": "lisa_control", "device": None,
    "progress": True,
}  # fmt: skip

# What a checkpoint's trainer_state.json held as its fingerprint for these flags before the
# regularizer took a list: the regularizer as one "+"-joined string.
OLD_FINGERPRINT = {
    "pretrained_model_name_or_path": "M", "task": None, "dataset_name": None,
    "train_data_dir": "D", "resolution": 16, "num_frames": None, "seed": 0,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 1, "side_network": "controlnet",
    "regularizer": "lisa+layersync", "lisa_weight": 0.2, "lisa_layer": None,
    "lisa_distance": "mse", "lisa_target": "residual", "lisa_final_weight": None,
    "lisa_weight_decay_steps": 0, "lisa_decoder_learning_rate": None, "layersync_pairs": None,
    "layersync_weight": 0.2, "prediction_type": None, "timestep_sampler": "uniform",
}  # fmt: skip
# Fingerprint settings added since, at their defaults: a checkpoint without them ran with these
# (loss_weighting's None is resolved per run; a checkpoint without it ran with "none").
ADDED_SINCE = {
    "loss_weighting": None, "snr_gamma": 5.0, "x0_weight_max": 5.0,
    "lisa_batch_fraction": 1.0, "lisa_subset": "first",
}  # fmt: skip


def test_flags_and_defaults_are_the_documented_ones():
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
    assert fields == DEFAULTS
    options = {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    assert options == {"-h", "--config", *(f"--{name}" for name in DEFAULTS)}
    assert dataclasses.asdict(parse_args([])) == {**DEFAULTS, "extra": {}}


@pytest.mark.parametrize(
    "spelling",
    [["lisa", "layersync"], ["layersync", "lisa"], ["lisa+layersync"], "lisa+layersync"],
)
def test_every_regularizer_spelling_fingerprints_as_the_joined_string(spelling):
    flags = dict(pretrained_model_name_or_path="M", train_data_dir="D", resolution=16,
                 train_batch_size=2)  # fmt: skip
    cfg = make_config({**flags, "regularizer": spelling})
    assert cfg.fingerprint() == OLD_FINGERPRINT | ADDED_SINCE
    assert cfg.regularizer_names == ("lisa", "layersync")


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--regularizer", "lisa"], ("lisa",)),
        (["--regularizer", "none"], ()),
        (["--regularizer", "layersync"], ("layersync",)),
        (["--regularizer", "lisa", "layersync"], ("lisa", "layersync")),
        (["--regularizer", "lisa+layersync"], ("lisa", "layersync")),
        ([], ("lisa",)),
    ],
)
def test_regularizer_flag_spellings(argv, names):
    cfg = parse_args(argv)
    assert cfg.regularizer_names == names
    assert cfg.regularizer == ("+".join(names) or "none")


@pytest.mark.parametrize("value", ["lisa+layersync", ["lisa", "layersync"]])
def test_regularizer_in_a_config_file_is_a_string_or_a_list(tmp_path, value):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"regularizer": value}))
    assert parse_args(["--config", str(path)]).regularizer_names == ("lisa", "layersync")


@pytest.mark.parametrize("value", [["lisa", "none"], ["lisa2"], "lisa+lisa2"])
def test_bad_regularizer_names_are_refused(value):
    with pytest.raises(ConfigError, match="--regularizer"):
        make_config({"regularizer": value})


@pytest.mark.parametrize(
    "value,expected",
    [("pose", "pose"), (["pose"], "pose"), (["pose", "seg"], ["pose", "seg"])],
)
def test_condition_columns_are_one_name_or_several(tmp_path, value, expected):
    """One column stays the single-condition string; several (one side network each) a list,
    from the flags and from a config file alike; anything but text is refused."""
    import yaml

    names = [value] if isinstance(value, str) else value
    assert parse_args(["--conditioning_image_column", *names]).conditioning_image_column == expected
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"conditioning_image_column": value}))
    assert parse_args(["--config", str(path)]).conditioning_image_column == expected
    with pytest.raises(ConfigError, match="conditioning_image_column must be text or a list"):
        make_config({"conditioning_image_column": ["pose", 3]})


def test_checkpoint_with_the_old_fingerprint_resumes_under_either_spelling(tmp_path):
    model = make_pixel_model(tmp_path / "model")
    data = make_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "run"

    def argv(steps, *regularizer):
        return ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir",
                str(data), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps",
                str(steps), "--checkpointing_steps", "1", "--validation_steps", "1000",
                "--report_to", "none", "--output_dir", str(out), "--no-progress",
                "--resume_from_checkpoint", "latest", "--regularizer", *regularizer]  # fmt: skip

    assert main(argv(1, "lisa", "layersync")) == 0
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    old = {**OLD_FINGERPRINT, "pretrained_model_name_or_path": str(model),
           "train_data_dir": str(data)}  # fmt: skip
    # The run names no weighting: the family's default (x0 for this UNet) is what it records.
    assert state["fingerprint"] == old | ADDED_SINCE | {"loss_weighting": "x0"}
    state_file.write_text(json.dumps({**state, "fingerprint": old}))  # as older checkpoints hold it
    assert main(argv(2, "lisa")) == 2  # another regularizer is refused
    assert main(argv(2, "lisa+layersync")) == 0
    assert main(argv(3, "layersync", "lisa")) == 0
    log = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
