"""Reliability: bad input gives one clear line and a non-zero exit, nothing written
over; non-finite values stop or skip with the step and term named; SIGKILL at random moments
(checkpoint writes included) never leaves a half checkpoint and resume loses nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import make_image_folder, make_pixel_model

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
    args = breaker(base_args(model, data, tmp_path / "out"), root)
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lisa train: error:"), err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    after = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert before == after, "a failed run touched an existing run's files"


def test_non_numeric_flag_is_an_argparse_error(assets, tmp_path, capsys):
    root, model, data, _ = assets
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *_with(base_args(model, data, tmp_path / "o"), lisa_weight="abc")])
    assert exit_info.value.code == 2
    assert "lisa_weight" in capsys.readouterr().err


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
