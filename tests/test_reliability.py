"""Reliability: bad input gives one clear line and a non-zero exit, nothing written
over; non-finite values stop or skip with the step and term named; SIGKILL at random moments
(checkpoint writes included) never leaves a half checkpoint and resume loses nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_image_folder, make_pixel_model
from PIL import Image

from lisa_control.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    model = make_pixel_model(root / "model")
    data = make_image_folder(root / "data", n=8)
    # A finished run to resume from with another configuration.
    done = root / "done"
    assert main(["train", *base_args(model, data, done), "--max_train_steps", "2"]) == 0
    return root, model, data, done


def base_args(model, data, out):
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "3",
        "--checkpointing_steps", "1", "--validation_steps", "1000", "--report_to", "none",
        "--output_dir", str(out), "--no-progress",
    ]


def _with(args, **flags):
    """Replace or add flags in an argument list."""
    args = list(args)
    for key, value in flags.items():
        flag = f"--{key}"
        if flag in args:
            i = args.index(flag)
            args[i + 1] = str(value)
        else:
            args += [flag, str(value)] if value is not None else [flag]
    return args


def _without(args, *names):
    """Drop flags (and their values) from an argument list."""
    args = list(args)
    for name in names:
        i = args.index(f"--{name}")
        del args[i : i + 2]
    return args


def _tree_digest(root: Path) -> str:
    """A hash of every name, file's bytes and link target under ``root`` (links not followed)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_symlink():
                digest.update(b"link:" + os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _output_dir(args) -> Path:
    return Path(args[args.index("--output_dir") + 1])


def _run_copy(root: Path, name: str, *damaged: str) -> Path:
    """A copy of the finished run ``done`` (checkpoints 1 and 2) with the files ``damaged``
    (paths inside it) spoiled: a ``.pt`` cut in half, a ``.safetensors`` header garbled."""
    import shutil

    path = root / name
    if not path.exists():
        shutil.copytree(root / "done", path)
        for relative in damaged:
            file = path / relative
            data = bytearray(file.read_bytes())
            if file.suffix == ".pt":
                data = data[: len(data) // 2]
            else:
                data[8:24] = b"\xff" * 16
            file.write_bytes(bytes(data))
    return path


def _spoiled_data(root: Path, name: str, spoil) -> Path:
    """An image folder of 14 rows, then ``spoil(folder)``."""
    folder = root / name
    if not folder.exists():
        make_image_folder(folder, n=14)
        spoil(folder)
    return folder


def _write(folder: Path, files: dict) -> None:
    """Replace files: bytes as they are, (width, height) as a random image of that size."""
    rng = np.random.default_rng(0)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            width, height = content
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)


def _self_link(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(path.name)
    return path


def _foreign_controlnet(root: Path) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from lisa_control.zoo.unet import tiny_unet

    other = UNet2DConditionModel(**tiny_unet(sample_size=16, block_out_channels=(8, 16),
                                             cross_attention_dim=16, layers_per_block=1,
                                             norm_num_groups=4))
    path = root / "foreign_controlnet"
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(8,)).save_pretrained(path)
    return path


def _pickle_model(root: Path, model: Path) -> Path:
    import shutil

    from safetensors.torch import load_file

    path = root / "pickle_model"
    shutil.copytree(model, path, dirs_exist_ok=True)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), path / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return path


def _one_channel_controlnet(root: Path, model: Path) -> Path:
    from diffusers import ControlNetModel

    from lisa_control.families.loading import load_main_model

    unet = load_main_model(str(model)).main_network
    path = root / "gray_controlnet"
    ControlNetModel.from_unet(
        unet, conditioning_channels=1, conditioning_embedding_out_channels=(32,)
    ).save_pretrained(path)
    return path


# (id, how to break the arguments, words the one-line error must contain)
CASES = [
    ("unknown-lisa-layer", lambda a, r: _with(a, lisa_layer="down_99"), ["down_99", "down_0"]),
    ("negative-lisa-weight", lambda a, r: _with(a, lisa_weight=-1), ["lisa_weight", ">= 0"]),
    ("nan-lisa-weight", lambda a, r: _with(a, lisa_weight="nan"), ["lisa_weight"]),
    ("model-path-missing", lambda a, r: _with(a, pretrained_model_name_or_path=r / "nope"),
     ["does not exist"]),
    ("model-path-not-diffusers", lambda a, r: _with(a, pretrained_model_name_or_path=r / "data"),
     ["not a diffusers"]),
    ("model-path-is-file",
     lambda a, r: _with(a, pretrained_model_name_or_path=r / "data" / "metadata.jsonl"),
     ["is a file"]),
    ("side-network-from-other-main",
     lambda a, r: _with(a, controlnet_model_name_or_path=_foreign_controlnet(r)),
     ["does not fit", "block_out_channels"]),
    ("side-network-wrong-condition-channels",
     lambda a, r: _with(a, controlnet_model_name_or_path=_one_channel_controlnet(r, r / "model")),
     ["channels"]),
    ("resolution-not-divisible", lambda a, r: _with(a, resolution=12), ["divisible"]),
    ("lisa-target-unknown", lambda a, r: _with(a, lisa_target="eps"), ["lisa_target", "x0"]),
    ("negative-decoder-lr", lambda a, r: _with(a, lisa_decoder_learning_rate=-1e-4),
     ["lisa_decoder_learning_rate", "positive"]),
    ("decoder-lr-without-lisa",
     lambda a, r: _with(a, lisa_decoder_learning_rate=1e-4, regularizer="none"),
     ["lisa_decoder_learning_rate", "--regularizer lisa"]),
    ("lisa-final-weight-without-steps", lambda a, r: _with(a, lisa_final_weight=0.1),
     ["lisa_weight_decay_steps"]),
    ("output-dir-is-file",
     lambda a, r: _with(a, output_dir=r / "data" / "img0.png"), ["is a file"]),
    ("resume-other-config",
     lambda a, r: _with(a, output_dir=r / "done", lisa_weight=0.5,
                        resume_from_checkpoint="latest"),
     ["another configuration", "lisa_weight"]),
    ("resume-other-lisa-batch-fraction",
     lambda a, r: _with(a, output_dir=r / "done", lisa_batch_fraction=0.5,
                        resume_from_checkpoint="latest"),
     ["another configuration", "lisa_batch_fraction"]),
    ("resume-other-lisa-subset",
     lambda a, r: _with(a, output_dir=r / "done", lisa_subset="random",
                        resume_from_checkpoint="latest"),
     ["another configuration", "lisa_subset"]),
    ("lisa-batch-fraction-above-one", lambda a, r: _with(a, lisa_batch_fraction=1.5),
     ["--lisa_batch_fraction", "(0, 1]", "1.5"]),
    ("lisa-batch-fraction-zero", lambda a, r: _with(a, lisa_batch_fraction=0),
     ["--lisa_batch_fraction", "(0, 1]"]),
    ("lisa-subset-unknown", lambda a, r: _with(a, lisa_subset="last"),
     ["lisa_subset", "first, random, timestep"]),
    ("lisa-timestep-subset-without-range", lambda a, r: _with(a, lisa_subset="timestep"),
     ["--lisa_subset timestep", "--lisa_timestep_range"]),
    ("lisa-batch-fraction-without-lisa",
     lambda a, r: _with(a, lisa_batch_fraction=0.5, regularizer="none"),
     ["--lisa_batch_fraction", "--regularizer lisa"]),
    ("resume-not-a-checkpoint",
     lambda a, r: _with(a, resume_from_checkpoint=r / "data"), ["not a complete checkpoint"]),
    ("pickle-weights-refused",
     lambda a, r: _with(a, pretrained_model_name_or_path=_pickle_model(r, r / "model")),
     ["pickle", "--allow_pickle"]),
    ("two-data-sources", lambda a, r: _with(a, task="pose"), ["exactly one data source"]),
    ("config-unknown-key", lambda a, r: a + ["--config", str(_config(r, {"lisa_wieght": 1}))],
     ["lisa_wieght", "lisa_weight"]),
    ("config-missing", lambda a, r: a + ["--config", str(r / "missing.yaml")], ["does not exist"]),
    ("config-bad-value", lambda a, r: a + ["--config", str(_config(r, {"lisa_weight": "x"}))],
     ["lisa_weight", "number"]),
    ("bad-regularizer", lambda a, r: _with(a, regularizer="lisa2"), ["regularizer", "lisa"]),
    ("zero-batch", lambda a, r: _with(a, train_batch_size=0), ["train_batch_size"]),
    (
        "unknown-compile-backend",
        lambda a, r: _with(a, torch_compile=None, torch_compile_backend="inductr"),
        ["inductr", "inductor"],
    ),
    ("missing-caption-column", lambda a, r: _with(a, caption_column="prompt"), ["prompt"]),
    # An output folder holding an earlier run: resume it or replace it, never mix the two.
    ("earlier-run-in-output-dir", lambda a, r: _with(a, output_dir=r / "done", max_train_steps=2),
     ["holds an earlier run", "checkpoint-1/", "--resume_from_checkpoint latest",
      "--overwrite_output_dir"]),
    ("overwrite-and-resume",
     lambda a, r: _with(a, output_dir=r / "done", overwrite_output_dir=None,
                        resume_from_checkpoint="latest"),
     ["--overwrite_output_dir", "--resume_from_checkpoint", "one of the two"]),
    ("negative-max-grad-norm", lambda a, r: _with(a, max_grad_norm=-1),
     ["--max_grad_norm", ">= 0", "0 turns clipping off"]),
    ("nan-max-grad-norm", lambda a, r: _with(a, max_grad_norm="nan"), ["--max_grad_norm", ">= 0"]),
    ("zero-epochs", lambda a, r: _with(a, num_train_epochs=0), ["--num_train_epochs", ">= 1"]),
    # Config files: no rounding, no bool-as-number, the key and the type named.
    ("config-fraction-for-int",
     lambda a, r: a + ["--config", str(_config(r, {"logging_steps": 2.7}))],
     ["logging_steps", "whole number", "2.7"]),
    ("config-bool-for-int",
     lambda a, r: a + ["--config", str(_config(r, {"gradient_accumulation_steps": True}))],
     ["gradient_accumulation_steps", "whole number", "True (bool)"]),
    ("config-fraction-resolution",
     lambda a, r: _without(a, "resolution") + ["--config", str(_config(r, {"resolution": 32.9}))],
     ["resolution", "whole number", "32.9"]),
    ("config-bool-for-float", lambda a, r: a + ["--config", str(_config(r, {"lisa_weight": True}))],
     ["lisa_weight", "must be a number", "bool"]),
    ("config-number-for-text",
     lambda a, r: _without(a, "output_dir") + ["--config", str(_config(r, {"output_dir": 123}))],
     ["output_dir", "must be text", "123 (int)", "quotes"]),
    ("config-list-of-numbers-for-texts",
     lambda a, r: a + ["--config", str(_config(r, {"validation_prompt": [1, 2]}))],
     ["validation_prompt", "list of texts"]),
    ("config-text-for-bool", lambda a, r: a + ["--config", str(_config(r, {"scale_lr": "yes"}))],
     ["scale_lr", "true or false"]),
    ("config-null-for-int", lambda a, r: a + ["--config", str(_config(r, {"logging_steps": None}))],
     ["logging_steps", "whole number", "null"]),
    # An output folder that cannot be made, found before any model loads.
    ("output-dir-under-a-file", lambda a, r: _with(a, output_dir=r / "data" / "img0.png" / "out"),
     ["img0.png", "is a file, not a folder"]),
    # A damaged checkpoint: the file named, the checkpoints that load listed.
    ("damaged-optimizer-state",
     lambda a, r: _with(a, output_dir=_run_copy(r, "cut_optimizer", "checkpoint-2/optimizer.pt"),
                        resume_from_checkpoint="latest"),
     ["checkpoint-2 is damaged", "optimizer.pt", "--resume_from_checkpoint checkpoint-1"]),
    ("damaged-side-network-header",
     lambda a, r: _with(a, output_dir=_run_copy(
         r, "bad_header", "checkpoint-2/side_network/diffusion_pytorch_model.safetensors"),
                        resume_from_checkpoint="latest"),
     ["checkpoint-2 is damaged", "diffusion_pytorch_model.safetensors", "checkpoint-1"]),
    ("every-checkpoint-damaged",
     lambda a, r: _with(a, output_dir=_run_copy(r, "all_cut", "checkpoint-1/optimizer.pt",
                                                "checkpoint-2/lr_scheduler.pt"),
                        resume_from_checkpoint="latest"),
     ["lr_scheduler.pt", "no other checkpoint", "--overwrite_output_dir"]),
    # Seeds and learning rates the libraries underneath cannot take.
    ("negative-seed", lambda a, r: _with(a, seed=-1), ["--seed", "2**32"]),
    ("seed-too-large", lambda a, r: _with(a, seed=2**32), ["--seed", "2**32"]),
    ("absurd-learning-rate", lambda a, r: _with(a, learning_rate=1e38),
     ["--learning_rate", "above 1", "1e-5"]),
    # Image files found unusable before the first step, all of them in one line.
    ("unreadable-images-all-listed",
     lambda a, r: _with(a, train_data_dir=_spoiled_data(
         r, "unreadable", lambda f: _write(f, {"img0.png": b"", "cond3.png": b"not an image"}))),
     ["2 problem(s)", "img0.png", "0 bytes", "cond3.png", "does not recognise"]),
    ("many-unreadable-images",
     lambda a, r: _with(a, train_data_dir=_spoiled_data(
         r, "many_unreadable", lambda f: _write(f, {f"img{k}.png": b"" for k in range(12)}))),
     ["12 problem(s)", "and 2 more"]),
    ("one-pixel-image",
     lambda a, r: _with(a, train_data_dir=_spoiled_data(
         r, "one_pixel", lambda f: _write(f, {"img2.png": (1, 1), "cond2.png": (1, 1)}))),
     ["img2.png", "1x1", "--resolution 16", "at most 8x"]),
    ("strip-image",
     lambda a, r: _with(a, train_data_dir=_spoiled_data(
         r, "strip", lambda f: _write(f, {"img4.png": (4000, 8), "cond4.png": (4000, 8)}))),
     ["img4.png", "4000x8", "4:1"]),
    ("image-symlink-loop",
     lambda a, r: _with(a, train_data_dir=_spoiled_data(
         r, "image_loop", lambda f: _self_link(f / "img5.png"))),
     ["img5.png", "symbolic link loop"]),
    ("data-dir-symlink-loop",
     lambda a, r: _with(a, train_data_dir=_self_link(r / "data_loop")),
     ["--train_data_dir", "symbolic link loop"]),
]
if importlib.util.find_spec("bitsandbytes") is None:  # the error only exists without it
    CASES.append(("8bit-adam-without-bitsandbytes",
                  lambda a, r: _with(a, use_8bit_adam=None), ["bitsandbytes"]))


def _config(root: Path, values: dict) -> Path:
    path = root / f"cfg_{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("case_id,breaker,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(assets, tmp_path, capsys, case_id, breaker, words):
    root, model, data, done = assets
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    done_digest = _tree_digest(done)
    args = breaker(base_args(model, data, tmp_path / "out"), root)
    out = _output_dir(args) if "--output_dir" in args else None
    existed = out is not None and (out.exists() or out.is_symlink())
    out_digest = _tree_digest(out) if existed and out.is_dir() else None
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lisa train: error:"), err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    after = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert before == after, "a failed run touched an existing run's files"
    assert _tree_digest(done) == done_digest, "a failed run changed an existing run's files"
    if out_digest is not None:
        assert _tree_digest(out) == out_digest, "a failed run changed its output folder"
    elif out is not None and not existed:
        assert not out.exists(), "a failed run created its output folder"


def test_non_numeric_flag_is_an_argparse_error(assets, tmp_path, capsys):
    root, model, data, _ = assets
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *_with(base_args(model, data, tmp_path / "o"), lisa_weight="abc")])
    assert exit_info.value.code == 2
    assert "lisa_weight" in capsys.readouterr().err


# (id, flags added to a working `lisa sample`, words the one-line error must contain)
SAMPLE_CASES = [
    ("zero-inference-steps", ["--num_inference_steps", "0"], ["--num_inference_steps", ">= 1"]),
    ("negative-seed", ["--seed", "-1"], ["--seed", ">= 0"]),
]


@pytest.mark.parametrize("case_id,extra,words", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input_is_one_clear_line(assets, tmp_path, capsys, case_id, extra, words):
    root, model, data, done = assets
    out = tmp_path / "samples"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"an earlier sample")
    digest = _tree_digest(out)
    code = main(["sample", "--controlnet", str(done / "controlnet"),
                 "--pretrained_model_name_or_path", str(model), "--image", str(data / "cond0.png"),
                 "--output_dir", str(out), *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lisa sample: error:") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert _tree_digest(out) == digest


def test_version_prints_the_package_version(capsys):
    import lisa_control

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lisa-control {lisa_control.__version__}\n"


def test_unwritable_output_dir_is_refused_before_models_load(assets, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    """A read-only parent folder. Root may write anywhere, so the permission check is told the
    folder is read-only rather than chmod-ed; the check itself is os.access."""
    from lisa_control.training import build, output_dir

    root, model, data, _ = assets
    parent = tmp_path / "read_only"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_dir.os, "access",
                        lambda path, mode: Path(path) != parent and real_access(path, mode))

    def no_model(cfg):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(build, "load_model", no_model)
    assert main(["train", *base_args(model, data, parent / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err and "read_only" in err, err
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_chmod_read_only_output_parent_is_refused(assets, tmp_path, capsys):
    root, model, data, _ = assets
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["train", *base_args(model, data, parent / "out")]) == 2
    finally:
        parent.chmod(0o755)
    assert "not writable" in capsys.readouterr().err


def test_max_grad_norm_zero_turns_clipping_off(assets, tmp_path):
    """0 trains exactly as an unreachable clipping norm does, and the zero-initialized output
    convolutions move (clipping to norm 0 would leave them at zero)."""
    from safetensors.torch import load_file

    _, model, data, _ = assets
    weights = {}
    for norm in ("0", "1e9"):
        out = tmp_path / f"norm{norm}"
        args = _with(base_args(model, data, out), max_train_steps=1, max_grad_norm=norm,
                     learning_rate=1e-3)  # fmt: skip
        assert main(["train", *args]) == 0
        weights[norm] = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(weights["0"][k], weights["1e9"][k]) for k in weights["0"])
    zero_convs = [v for k, v in weights["0"].items() if k.startswith("controlnet_down_blocks")]
    assert zero_convs and all(v.abs().sum() > 0 for v in zero_convs)


def test_overwrite_output_dir_replaces_only_the_trainers_files(assets, tmp_path):
    import shutil

    root, model, data, done = assets
    out = tmp_path / "again"
    shutil.copytree(done, out)
    (out / "notes.txt").write_text("mine")
    (out / "validation").mkdir(exist_ok=True)
    (out / "validation" / "step-1.png").write_bytes(b"an earlier run's grid")
    (out / "validation" / "mine.png").write_bytes(b"mine")
    (out / "loss_log.rank1.jsonl").write_text('{"step": 1}\n')
    args = _with(base_args(model, data, out), max_train_steps=1, overwrite_output_dir=None)
    assert main(["train", *args]) == 0
    from lisa_control.training.checkpoint import list_checkpoints

    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-1"]
    log = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["mine.png"]
    assert not (out / "loss_log.rank1.jsonl").exists()
    assert json.loads((out / "config.json").read_text())["max_train_steps"] == 1


def test_resume_without_a_checkpoint_starts_a_clean_log(assets, tmp_path, capsys):
    """Runs killed before their first checkpoint left log lines (and a cut one); `latest` finds
    no checkpoint, starts afresh and the log is one sequence again."""
    _, model, data, _ = assets
    out = tmp_path / "early"
    out.mkdir()
    (out / "loss_log.jsonl").write_text('{"step": 1}\n{"step": 1}\n{"step": 2}\n{"st')
    (out / "validation.jsonl").write_text('{"step": 1}\n')
    args = _with(base_args(model, data, out), checkpointing_steps=10,
                 resume_from_checkpoint="latest")  # fmt: skip
    assert main(["train", *args]) == 0
    assert "no checkpoint to resume from" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (out / "validation.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- NaN guard


def _poison_encoder(monkeypatch, at_call: int):
    from lisa_control.families import encoders

    original = encoders.FrozenEncoders.encode
    calls = {"n": 0}

    def encode(self, batch):
        x0, context, condition = original(self, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            x0 = torch.full_like(x0, float("nan"))
        return x0, context, condition

    monkeypatch.setattr(encoders.FrozenEncoders, "encode", encode)


def test_nonfinite_loss_stops_naming_step_and_term(assets, tmp_path, capsys, monkeypatch):
    _, model, data, _ = assets
    out = tmp_path / "nan"
    _poison_encoder(monkeypatch, at_call=3)
    assert main(["train", *base_args(model, data, out)]) == 2
    err = capsys.readouterr().err
    assert "step 3" in err and "diffusion_loss" in err and "--on_nonfinite skip" in err
    from lisa_control.training.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "controlnet").exists()


def test_nonfinite_loss_can_be_skipped(assets, tmp_path, monkeypatch):
    _, model, data, _ = assets
    out = tmp_path / "skip"
    _poison_encoder(monkeypatch, at_call=2)
    assert main(["train", *_with(base_args(model, data, out), on_nonfinite="skip")]) == 0
    log = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


# ----------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_random_moments_never_loses_a_checkpoint(assets, tmp_path):
    from lisa_control.training.checkpoint import STATE_FILE, list_checkpoints

    _, model, data, _ = assets
    steps = 12
    args = _with(base_args(model, data, tmp_path / "ref"), max_train_steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "lisa_control", "train"]
    assert subprocess.run(run + args, env=env, capture_output=True).returncode == 0

    out = tmp_path / "killed"
    args = _with(args, output_dir=out)
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(run + args + ["--resume_from_checkpoint", "latest"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until training is under way, then kill at a random moment of the step loop,
        # where every step also writes a checkpoint.
        while proc.poll() is None and not (out / "loss_log.jsonl").is_file():
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for ckpt in list_checkpoints(out):
            state = json.loads((ckpt / STATE_FILE).read_text())
            assert state["step"] == int(ckpt.name.split("-")[1])
            assert (ckpt / "side_network" / "diffusion_pytorch_model.safetensors").is_file()
            assert (ckpt / "optimizer.pt").is_file()
    assert kills >= 1
    final = subprocess.run(run + args + ["--resume_from_checkpoint", "latest"], env=env,
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "loss_log.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ref" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(out.glob(".tmp-*")), "interrupted writes were not cleaned up"
