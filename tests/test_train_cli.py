"""The trainer and CLI end to end on tiny models: artefacts, resume, DDP, API parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_image_folder, make_pixel_model, make_sd_model

from lisa_control.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_pixel_model(root / "model"), make_image_folder(root / "data", n=8)


def train_args(model, data, out, steps=4, **extra):
    args = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "resolution": 16,
        "train_batch_size": 2,
        "max_train_steps": steps,
        "checkpointing_steps": 2,
        "validation_steps": 2,
        "validation_image": data / "cond0.png",
        "validation_prompt": "item 0",
        "num_validation_images": 1,
        "validation_inference_steps": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "output_dir": out,
        **extra,
    }
    argv = []
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv + ["--no-progress"]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(argv, env_extra=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "lisa_control", *argv], env=env, **popen)


def test_training_run_writes_everything_and_side_network_loads_in_diffusers(assets, tmp_path):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    model, data = assets
    out = tmp_path / "run"
    assert main(["train", *train_args(model, data, out)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in out.glob("checkpoint-*"):
        names = {p.name for p in ckpt.iterdir()}
        assert {
            "side_network",
            "regularizers.safetensors",
            "optimizer.pt",
            "lr_scheduler.pt",
            "rng_0.pt",
            "trainer_state.json",
        } <= names
    assert (out / "validation" / "step-2.png").is_file()
    assert (out / "validation" / "step-4.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "no tensorboard events"
    log = read_log(out / "loss_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all({"loss", "diffusion_loss", "aux_loss", "aux_loss_ratio"} <= r.keys() for r in log)
    side = ControlNetModel.from_pretrained(out / "controlnet")
    keys = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors")).keys()
    assert not any("decoder" in k for k in keys)
    assert side.config.conditioning_channels == 3


def test_kill_and_resume_gives_the_same_loss_sequence(assets, tmp_path):
    model, data = assets
    steps = 8
    ref = tmp_path / "ref"
    args = dict(validation_steps=1000)
    assert run_cli(["train", *train_args(model, data, ref, steps, **args)]).wait(300) == 0
    broken = tmp_path / "broken"
    proc = run_cli(["train", *train_args(model, data, broken, steps, **args)])
    deadline = time.time() + 240
    log = broken / "loss_log.jsonl"
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_log(log)) < steps, "the run finished before it was killed"
    resumed = run_cli(
        [
            "train",
            *train_args(model, data, broken, steps, **args),
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    assert resumed.wait(300) == 0
    a, b = read_log(ref / "loss_log.jsonl"), read_log(log)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
    from safetensors.torch import load_file

    wa = load_file(str(ref / "controlnet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(broken / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_accelerate_launch_two_cpu_processes_agree(assets, tmp_path):
    model, data = assets
    out = tmp_path / "ddp"
    # `--cpu` makes accelerate start a single process; the torchrun launcher (--multi_gpu) on a
    # machine without GPUs gives two processes in a gloo group, which is what we want to test.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lisa_control",
        "train",
        *train_args(model, data, out, steps=3, validation_steps=1000, report_to="none"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = read_log(out / "loss_log.jsonl")
    rank1 = read_log(out / "loss_log.rank1.jsonl")
    assert [r["step"] for r in rank0] == [1, 2, 3]
    for a, b in zip(rank0, rank1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)


def test_cli_step_equals_library_api_step(assets, tmp_path):
    """The loss the CLI logs at step 1 is what the documented library recipe computes (with
    the x0 loss weighting, the CLI's default for this UNet)."""
    from accelerate.utils import set_seed

    from lisa_control import (
        ControlTrainingStep,
        LikelihoodScoreAlignment,
        UNetControlNetBranch,
        X0Weighting,
        make_objective,
    )
    from lisa_control.data.folder import ControlDataset
    from lisa_control.data.sampler import ResumableBatchOrder
    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    model_dir, data = assets
    out = tmp_path / "one"
    assert main(["train", *train_args(model_dir, data, out, steps=1, report_to="none")]) == 0
    cli_loss = read_log(out / "loss_log.jsonl")[0]["loss"]

    set_seed(0)
    model = load_main_model(str(model_dir))
    dataset = ControlDataset(data, resolution=16)
    branch = UNetControlNetBranch.from_main(model.main_network, condition_downscale=1)
    lisa = LikelihoodScoreAlignment(branch.side_network, out_channels=3, sample_size=16)
    objective = make_objective("epsilon", model.scheduler, weighting=X0Weighting())
    step = ControlTrainingStep(branch, objective, [lisa])
    first = next(ResumableBatchOrder(len(dataset), 2, seed=0).batches())[1]
    batch = torch.utils.data.default_collate([dataset[i] for i in first])
    x0, context, condition = FrozenEncoders(model, "cpu").encode(batch)
    api_loss = step(x0, context, condition).loss.item()
    assert api_loss == pytest.approx(cli_loss, abs=1e-6)


def test_stable_diffusion_folder_trains_and_samples_with_stock_pipeline(tmp_path):
    """The latent path: VAE latents, CLIP text context, validation with CFG, then `lisa sample`
    through diffusers' StableDiffusionControlNetPipeline."""
    model = make_sd_model(tmp_path / "sd")
    data = make_image_folder(tmp_path / "data64", n=4, size=64)
    out = tmp_path / "run"
    args = train_args(
        model, data, out, steps=2, resolution=64, validation_guidance_scale=3.0, report_to="none"
    )
    assert main(["train", *args]) == 0
    assert (out / "validation" / "step-2.png").is_file()
    assert (
        main(
            [
                "sample",
                "--controlnet",
                str(out / "controlnet"),
                "--image",
                str(data / "cond0.png"),
                "--prompt",
                "a red circle",
                "--pretrained_model_name_or_path",
                str(model),
                "--num_inference_steps",
                "2",
                "--output",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    from PIL import Image

    grid = Image.open(tmp_path / "s.png")
    assert grid.size[1] >= 64 and grid.size[0] >= 128  # condition | sample


def test_t2i_adapter_on_a_stable_diffusion_folder_samples_through_the_branch(tmp_path):
    """No stock pipeline takes our T2I-Adapter with a ControlNet-style CLI, so `lisa sample`
    runs it through `sampling.sample`, with text guidance and VAE decoding."""
    model = make_sd_model(tmp_path / "sd")
    data = make_image_folder(tmp_path / "data64", n=2, size=64)
    out = tmp_path / "run"
    args = train_args(model, data, out, steps=1, resolution=64, side_network="t2i_adapter")
    assert main(["train", *args]) == 0
    grid = tmp_path / "s.png"
    argv = ["sample", "--controlnet", str(out / "controlnet"), "--side_network", "t2i_adapter",
            "--pretrained_model_name_or_path", str(model), "--image", str(data / "cond0.png"),
            "--prompt", "a red circle", "--num_inference_steps", "2", "--num_images", "2",
            "--output", str(grid)]  # fmt: skip
    assert main(argv) == 0
    from PIL import Image

    assert Image.open(grid).size == (2 + 3 * (64 + 2), 2 + 64 + 2)  # condition | 2 samples


def _make_flow_model(folder: Path, family: str) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lisa_control.families.loading import save_pixel_model
    from lisa_control.zoo.flow import tiny_flux_transformer, tiny_sd3_transformer

    torch.manual_seed(3)
    if family == "flux":
        network = tiny_flux_transformer(latent_channels=3, num_layers=1, num_single_layers=1)
    else:
        network = tiny_sd3_transformer(
            sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=8
        )
    save_pixel_model(folder, network, FlowMatchEulerDiscreteScheduler(), 16, None, objective="flow")
    return folder


@pytest.mark.parametrize(
    "family,side_network,stock",
    [
        ("unet", "t2i_adapter", "T2IAdapter"),
        ("sd3", "controlnet", "SD3ControlNetModel"),
        ("flux", "controlnet", "FluxControlNetModel"),
    ],
)
def test_every_family_trains_resumes_and_saves_a_stock_side_network(
    assets, tmp_path, family, side_network, stock
):
    """`lisa train` runs each dual-branch family with LISA; a resumed run continues
    the same losses; the saved side network loads with its stock diffusers class."""
    import diffusers

    unet_model, data = assets
    model = unet_model if family == "unet" else _make_flow_model(tmp_path / family, family)
    common = dict(side_network=side_network, validation_steps=4)
    full = tmp_path / "full"
    assert main(["train", *train_args(model, data, full, **common)]) == 0
    broken = tmp_path / "broken"
    assert main(["train", *train_args(model, data, broken, steps=2, **common)]) == 0
    resumed = train_args(model, data, broken, resume_from_checkpoint="latest", **common)
    assert main(["train", *resumed]) == 0
    losses = [r["loss"] for r in read_log(full / "loss_log.jsonl")]
    assert [r["loss"] for r in read_log(broken / "loss_log.jsonl")] == pytest.approx(
        losses, abs=1e-6
    )
    assert all("aux_loss" in r for r in read_log(full / "loss_log.jsonl"))
    side = getattr(diffusers, stock).from_pretrained(full / "controlnet")
    assert sum(p.numel() for p in side.parameters()) > 0
    assert (full / "validation" / "step-4.png").is_file()
    grid = tmp_path / "samples.png"
    sample_argv = ["sample", "--controlnet", str(full / "controlnet"), "--side_network",
                   side_network, "--pretrained_model_name_or_path", str(model), "--image",
                   str(data / "cond0.png"), "--num_inference_steps", "2", "--output", str(grid)]
    assert main(sample_argv) == 0
    assert grid.stat().st_size > 100


def test_unknown_family_side_network_pair_is_refused(assets, tmp_path, capsys):
    model, data = _make_flow_model(tmp_path / "sd3", "sd3"), assets[1]
    argv = train_args(model, data, tmp_path / "out", side_network="t2i_adapter")
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "t2i_adapter" in err and "--side_network controlnet" in err


def test_resume_accepts_a_checkpoint_from_before_a_setting_existed(assets, tmp_path):
    """A checkpoint whose fingerprint lacks a newer setting ran with that setting's default, so
    it resumes under the default and is refused under any other value."""
    model, data = assets
    out = tmp_path / "run"
    assert main(["train", *train_args(model, data, out, steps=2)]) == 0
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["lisa_target"]
    state_file.write_text(json.dumps(state))
    resume = train_args(model, data, out, steps=3, resume_from_checkpoint="latest")
    assert main(["train", *resume, "--lisa_target", "x0"]) == 2
    assert main(["train", *resume]) == 0
    assert [r["step"] for r in read_log(out / "loss_log.jsonl")] == [1, 2, 3]


def test_decoder_learning_rate_moves_only_the_decoder_faster(assets, tmp_path):
    """--lisa_decoder_learning_rate puts the decoder in its own optimizer group: Adam moves each
    weight by about lr per step, so two steps at 0.1 move the zero-initialized last conv by
    about 0.2 where the side network's 1e-3 moves it by 0.002. The setting is part of the
    checkpoint fingerprint, so a resume under another value is refused."""
    from safetensors.torch import load_file

    model, data = assets
    moved = {}
    for name, extra in (("same", {}), ("own", {"lisa_decoder_learning_rate": 0.1})):
        out = tmp_path / name
        assert main(["train", *train_args(model, data, out, steps=2, **extra)]) == 0
        groups = torch.load(out / "checkpoint-2" / "optimizer.pt")["param_groups"]
        assert [g["lr"] for g in groups] == ([1e-3] if name == "same" else [1e-3, 0.1])
        decoder = load_file(str(out / "checkpoint-2" / "regularizers.safetensors"))
        moved[name] = max(v.abs().max().item() for k, v in decoder.items() if "out." in k)
    assert moved["same"] < 0.005 and moved["own"] > 0.05, moved
    resume = train_args(model, data, tmp_path / "own", steps=3, resume_from_checkpoint="latest")
    assert main(["train", *resume, "--lisa_decoder_learning_rate", "0.01"]) == 2
    assert main(["train", *resume, "--lisa_decoder_learning_rate", "0.1"]) == 0


def train_latent_flow_model(model_dir: Path, tmp_path: Path) -> Path:
    """Two LISA steps of `lisa train` on a latent SD3/Flux folder with 64 px captioned images,
    validating at step 2, then `lisa sample` with the saved ControlNet; checks the loss log and
    both grids, returns the output folder."""
    data = make_image_folder(tmp_path / "data", n=4, size=64)
    out = tmp_path / "run"
    argv = train_args(model_dir, data, out, steps=2, resolution=64, validation_steps=2)
    assert main(["train", *argv]) == 0
    log = read_log(out / "loss_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all("aux_loss" in r for r in log)
    assert (out / "validation" / "step-2.png").is_file()
    grid = sample_grid(out / "controlnet", model_dir, data / "cond0.png", tmp_path / "s.png")
    assert grid.shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 3)  # condition | sample
    return out


def sample_grid(controlnet: Path, model_dir: Path, image: Path, output: Path) -> np.ndarray:
    """`lisa sample` with three steps and one prompt; the written grid as an array."""
    from PIL import Image

    argv = ["sample", "--controlnet", str(controlnet), "--pretrained_model_name_or_path",
            str(model_dir), "--image", str(image), "--prompt", "a red circle",
            "--num_inference_steps", "3", "--resolution", "64",
            "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    return np.asarray(Image.open(output))


def first_sample(grid: np.ndarray) -> np.ndarray:
    """The sample beside the condition in sample_grid's 64 px grid, as ints."""
    return grid[2 : 2 + 64, 4 + 64 : 4 + 128].astype(int)


def stock_image(pipe, guidance_scale: float) -> np.ndarray:
    """What a stock diffusers pipeline draws for sample_grid's prompt, seed and steps."""
    image = pipe(
        "a red circle", height=64, width=64, num_inference_steps=3,
        guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]  # fmt: skip
    return (image * 255).round().astype(int)


def test_sd3_sample_with_a_zero_controlnet_is_the_stock_pipeline(tmp_path, capsys):
    """A fresh SD3 ControlNet adds zero residuals, so `lisa sample` must then draw what
    diffusers' own StableDiffusion3Pipeline draws for the same prompt, seed, steps and guidance:
    same prompt encoding and negative prompt, noise, shifted Euler schedule and VAE decoding."""
    from diffusers import SD3ControlNetModel, StableDiffusion3Pipeline
    from factories import make_sd3_model

    model_dir = make_sd3_model(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(
        model_dir, text_encoder_3=None, tokenizer_3=None
    )
    zero = SD3ControlNetModel.from_transformer(
        pipe.transformer, num_layers=1, num_extra_conditioning_channels=0
    )
    zero.save_pretrained(tmp_path / "zero")
    data = make_image_folder(tmp_path / "data", n=1, size=64)
    grid = sample_grid(tmp_path / "zero", model_dir, data / "cond0.png", tmp_path / "s.png")
    assert np.abs(first_sample(grid) - stock_image(pipe, guidance_scale=7.5)).max() <= 1
    # a size the VAE and the network cannot halve down evenly is refused before any sampling
    argv = ["sample", "--controlnet", str(tmp_path / "zero"), "--pretrained_model_name_or_path",
            str(model_dir), "--image", str(data / "cond0.png"), "--resolution", "60"]  # fmt: skip
    assert main(argv) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_stable_diffusion_3_folder_trains_with_text_and_latent_conditions(tmp_path):
    """An SD3 diffusers folder (two CLIPs, VAE with shift, shift-3 scheduler) trains an SD3
    ControlNet with LISA through `lisa train`: captions go through the pipeline's encode_prompt,
    conditions through the VAE, the objective is diffusers' SD3 recipe, and the side network
    loads as a stock SD3ControlNetModel."""
    from diffusers import SD3ControlNetModel
    from factories import make_sd3_model

    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model
    from lisa_control.families.sd3 import PreconditionedFlowObjective

    model_dir = make_sd3_model(tmp_path / "sd3")
    model = load_main_model(str(model_dir))
    assert model.family.name == "sd3" and model.condition_in_latent_space
    objective = model.training_objective()
    assert isinstance(objective, PreconditionedFlowObjective) and objective.shift == 3.0
    encoders = FrozenEncoders(model, "cpu")
    ctx = encoders.prompt_context(["a cat", "b"])
    assert ctx.encoder_hidden_states.shape[-1] == 32
    assert ctx.extra["pooled_projections"].shape == (2, 32)
    assert not torch.equal(ctx.encoder_hidden_states[0], ctx.encoder_hidden_states[1])
    assert encoders.encode_condition(torch.rand(2, 3, 64, 64)).shape == (2, 4, 8, 8)

    out = train_latent_flow_model(model_dir, tmp_path)
    side = SD3ControlNetModel.from_pretrained(out / "controlnet")
    assert side.config.in_channels == 4


def test_cached_latents_and_prompts_are_reused_per_item(tmp_path):
    """--cache_latents: the second visit of an item reuses its VAE latent and text embedding
    (a fresh encode would draw a new latent sample), and training with it runs."""
    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    model_dir = make_sd_model(tmp_path / "sd")
    model = load_main_model(str(model_dir))
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "conditioning_pixel_values": torch.rand(2, 3, 64, 64),
        "caption": ["a b", "c"],
        "index": torch.tensor([3, 5]),
    }
    cached = FrozenEncoders(model, "cpu", cache=True)
    (x_a, ctx_a, _), (x_b, ctx_b, _) = cached.encode(batch), cached.encode(batch)
    assert torch.equal(x_a, x_b)
    assert torch.equal(ctx_a.encoder_hidden_states, ctx_b.encoder_hidden_states)
    fresh = FrozenEncoders(model, "cpu")
    assert not torch.equal(fresh.encode(batch)[0], fresh.encode(batch)[0])
    data = make_image_folder(tmp_path / "data", n=2, size=64)
    argv = train_args(model_dir, data, tmp_path / "run", steps=3, resolution=64)
    assert main(["train", *argv, "--cache_latents"]) == 0


def test_flux_sample_with_a_zero_controlnet_is_the_stock_pipeline(tmp_path):
    """The same for Flux: FluxPipeline's resolution-dependent shifted schedule, T5 + CLIP
    prompts, distilled guidance 3.5 embedded (no classifier-free guidance), packed latents."""
    from diffusers import FluxPipeline
    from factories import make_flux_model

    from lisa_control.families.flux import controlnet_from_transformer

    model_dir = make_flux_model(tmp_path / "flux")
    pipe = FluxPipeline.from_pretrained(model_dir)
    controlnet_from_transformer(pipe.transformer).save_pretrained(tmp_path / "zero")
    data = make_image_folder(tmp_path / "data", n=1, size=64)
    grid = sample_grid(tmp_path / "zero", model_dir, data / "cond0.png", tmp_path / "s.png")
    stock = stock_image(pipe, guidance_scale=3.5)
    assert stock.std() > 5  # an image, not a flat field that any schedule would reproduce
    assert np.abs(first_sample(grid) - stock).max() <= 1


def test_cached_pipeline_prompts_encode_each_caption_once(tmp_path):
    """--cache_latents on SD3: each index's caption goes through the pipeline's encode_prompt
    once; a cached context equals a fresh one, per sample, and training with it runs."""
    from factories import make_sd3_model

    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    model_dir = make_sd3_model(tmp_path / "sd3")
    encoders = FrozenEncoders(load_main_model(str(model_dir)), "cpu", cache=True)
    original, calls = encoders.model.prompt_encoder, []

    def counting(captions, device):
        calls.append(list(captions))
        return original(captions, device)

    encoders.model.prompt_encoder = counting

    def batch(indices, captions):
        return {
            "pixel_values": torch.rand(len(indices), 3, 64, 64) * 2 - 1,
            "conditioning_pixel_values": torch.rand(len(indices), 3, 64, 64),
            "caption": captions,
            "index": torch.tensor(indices),
        }

    first = encoders.encode(batch([3, 5], ["a b", "c"]))[1]
    second = encoders.encode(batch([5, 7], ["c", "d"]))[1]
    assert calls == [["a b", "c"], ["d"]]
    fresh = original(["c", "d"], "cpu")
    assert torch.allclose(second.encoder_hidden_states, fresh.encoder_hidden_states)
    pooled = second.extra["pooled_projections"]
    assert torch.allclose(pooled, fresh.extra["pooled_projections"])
    assert torch.equal(pooled[0], first.extra["pooled_projections"][1])
    data = make_image_folder(tmp_path / "data", n=2, size=64)
    argv = train_args(model_dir, data, tmp_path / "run", steps=3, resolution=64)
    assert main(["train", *argv, "--cache_latents"]) == 0


def test_flux_folder_trains_with_text_and_latent_conditions(tmp_path):
    """A Flux diffusers folder (CLIP + T5, guidance-distilled transformer, dynamic-shift
    scheduler) trains a Flux ControlNet with LISA through `lisa train`."""
    from diffusers import FluxControlNetModel
    from factories import make_flux_model

    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    model_dir = make_flux_model(tmp_path / "flux")
    model = load_main_model(str(model_dir))
    assert model.family.name == "flux" and model.condition_in_latent_space
    assert model.training_objective().shift == 3.0
    ctx = FrozenEncoders(model, "cpu").prompt_context(["a cat", "b"])
    assert ctx.encoder_hidden_states.shape[-1] == 16
    assert ctx.extra["pooled_projections"].shape == (2, 16)
    out = train_latent_flow_model(model_dir, tmp_path)
    assert FluxControlNetModel.from_pretrained(out / "controlnet").config.in_channels == 16
    # cached prompt contexts keep Flux's shared text position ids beside the per-sample parts
    data = make_image_folder(tmp_path / "data2", n=2, size=64)
    argv = train_args(model_dir, data, tmp_path / "cached", steps=3, resolution=64)
    assert main(["train", *argv, "--cache_latents"]) == 0
