"""Fidelity to the LISA authors' recipe: noising in fp32 under mixed precision, fp16 gradient
overflow left to the grad scaler, the decoder's kernel rule, and caption choices drawn afresh at
every visit yet repeated exactly by a resumed run."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from factories import make_pixel_model, make_sd_model
from PIL import Image

from lisa_control.families.sd3 import PreconditionedFlowObjective
from lisa_control.training.config import make_config
from lisa_control.core.errors import NonFiniteLossError
from lisa_control.core.objectives import DiffusionObjective, RectifiedFlowObjective

# ----------------------------------------------------------------------------- fp32 noising

LOW_PRECISION = [torch.bfloat16, torch.float16]
SHAPE = (4, 4, 32, 32)  # one sample per timestep


def sd_scheduler(prediction_type: str) -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled-linear betas 0.00085 .. 0.012)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def noise_level(x_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per sample, the c minimising ||x_t - c noise||^2 (in float64): the noise level that x_t
    of a zero clean sample carries. Averaging over many elements cancels the rounding of x_t to
    a low-precision dtype, since the fp32 noise does not share its grid."""
    x, n = x_t.double().flatten(1), noise.double().flatten(1)
    return (x * n).sum(1) / (n * n).sum(1)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-3):
    error = ((actual - expected).abs() / expected.abs()).max().item()
    assert error <= tol, (actual.tolist(), expected.tolist(), error)


def draws(dtype):
    """A clean sample in ``dtype`` and fp32 noise, as the objectives draw it."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g)


def column(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_diffusion_noising_keeps_fp32_noise_levels_in_low_precision(prediction_type, dtype):
    """Under autocast and with a bf16/fp16 clean sample, sigma_t read back from x_t at
    t = 0, 1, 5, 10 is the fp32 schedule's (bf16 arithmetic gives 0 at t = 0 and 1), x_t is the
    fp32 formula rounded once to the input dtype, and the target is fp32."""
    scheduler = sd_scheduler(prediction_type)
    objective = DiffusionObjective(scheduler, prediction_type)
    t = torch.tensor([0, 1, 5, 10])
    x0, noise = draws(dtype)
    zeros = torch.zeros(SHAPE, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = torch.Generator().manual_seed(1)
        only_noise = objective.sample(zeros, generator=g, timesteps=t)
        both = objective.sample(x0, noise=noise, timesteps=t)
    assert only_noise.x_t.dtype == dtype and only_noise.noise.dtype == torch.float32
    sigma = (1 - scheduler.alphas_cumprod.double()[t]).sqrt()
    assert_relative(noise_level(only_noise.x_t, only_noise.noise), sigma)

    abar = scheduler.alphas_cumprod[t]  # fp32, as diffusers' add_noise reads it
    alpha_32, sigma_32 = column(abar**0.5), column((1 - abar) ** 0.5)
    x_t_32 = alpha_32 * x0.float() + sigma_32 * noise
    assert both.x_t.dtype == dtype and torch.equal(both.x_t, x_t_32.to(dtype))
    assert both.target.dtype == torch.float32
    if prediction_type == "epsilon":
        expected = noise
    else:
        expected = alpha_32 * noise - sigma_32 * x0.float()
    torch.testing.assert_close(both.target, expected)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_flow_noising_keeps_fp32_noise_levels_in_low_precision(dtype):
    """x_s = (1 - s) x0 + s eps: at small, middle and large s, s read back from x_s is exact to
    1e-3 and x_s is the fp32 formula rounded once (bf16 arithmetic rounds s = 0.9991 to 1, so
    1 - s would be 0), for rectified flow and SD3's preconditioned recipe; targets are fp32."""
    x0, noise = draws(dtype)
    zeros = torch.zeros(SHAPE, dtype=dtype)
    sd3 = PreconditionedFlowObjective(weighting_scheme="logit_normal", shift=3.0)
    given = torch.tensor([3.7, 250.3, 512.9, 999.1])
    for objective, timesteps in ((RectifiedFlowObjective(), given), (sd3, None)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = torch.Generator().manual_seed(1)
            only_noise = objective.sample(zeros, generator=g, timesteps=timesteps)
            both = objective.sample(x0, noise=noise, timesteps=only_noise.timesteps)
        s_32 = column(only_noise.timesteps.float() / 1000)
        assert only_noise.x_t.dtype == dtype and only_noise.noise.dtype == torch.float32
        assert_relative(noise_level(only_noise.x_t, only_noise.noise), s_32.double().flatten())
        x_s_32 = (1 - s_32) * x0.float() + s_32 * noise
        assert both.x_t.dtype == dtype and torch.equal(both.x_t, x_s_32.to(dtype))
        assert both.target.dtype == torch.float32
        torch.testing.assert_close(both.target, noise - x0.float())


# ----------------------------------------------------------------------------- decoder rule


def rule_parameter_count(channels: int, stages: int, out_channels: int = 4) -> int:
    """Parameters of the LISA decoder by its rule, counted by hand: Linear(256, C); per x2 stage
    a conv c -> max(c/2, 64) (1x1 for the first stage when C >= 512, else 3x3); one 3x3 conv
    when there is no stage; a last 3x3 conv to the output channels."""
    count = 256 * channels + channels
    width = channels
    for stage in range(max(stages, 1)):
        narrower = max(width // 2, 64)
        kernel = 1 if stage == 0 and stages > 0 and channels >= 512 else 3
        count += width * narrower * kernel * kernel + narrower
        width = narrower
    return count + width * out_channels * 3 * 3 + out_channels


def test_decoder_uses_a_1x1_conv_only_in_its_first_stage_on_sd21():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    from lisa_control.regularizers.decoders import ScoreDecoder
    from lisa_control.zoo.unet import SD21_BASE_UNET
    from lisa_control.regularizers.lisa import LikelihoodScoreAlignment

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    # (layer, channels, spatial size at 512 px -> stages to the 64x64 latent, count by hand)
    cases = [
        ("down_5", 640, 1, 381_124),
        ("down_8", 1280, 2, 3_003_844),
        ("mid", 1280, 3, 3_459_044),
    ]
    for layer, channels, stages, count in cases:
        assert rule_parameter_count(channels, stages) == count
        lisa = LikelihoodScoreAlignment(controlnet, layer=layer, out_channels=4, sample_size=64)
        assert sum(p.numel() for p in lisa.parameters()) == count, layer
        convs = [m for m in lisa.decoder.body if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size[0] for c in convs] == [1] + [3] * (stages - 1), layer
    # No stage (the feature is already at the output size): one 3x3 conv, wide feature or not.
    decoder = ScoreDecoder(640, 4, upsample_stages=0)
    assert decoder.body[0].kernel_size == (3, 3)
    assert sum(p.numel() for p in decoder.parameters()) == rule_parameter_count(640, 0)


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    return make_pixel_model(root / "model"), make_caption_folder(root / "data")


def make_caption_folder(folder: Path, n: int = 8, size: int = 16) -> Path:
    """Images with one caption (even items) or a list of three (odd items)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = []
    for k in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{k}.png")
        Image.fromarray(255 - img).save(folder / f"cond{k}.png")
        text = f"item {k}" if k % 2 == 0 else [f"item {k} take {j}" for j in range(3)]
        lines.append({"image": f"img{k}.png", "conditioning_image": f"cond{k}.png", "text": text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def config(model, data, out, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        resolution=16,
        train_batch_size=2,
        max_train_steps=4,
        checkpointing_steps=2,
        validation_steps=1000,
        report_to="none",
        output_dir=str(out),
        progress=False,
        device="cpu",
        seed=0,
    )
    return make_config(values | overrides)


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]


def scaled_accelerator(monkeypatch, device: str, init_scale: float):
    """Make train()'s Accelerator use a GradScaler of ``init_scale`` whose first overflow drops
    the scale to init_scale * 2^-50. accelerate gives CPU runs no scaler (nor autocast) under
    fp16, so there one is installed, with autocast, exactly as accelerate does on a GPU."""
    import accelerate

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.state.mixed_precision == "fp16":
                self.native_amp = True
                self.scaler = torch.amp.GradScaler(
                    device, init_scale=init_scale, backoff_factor=2.0**-50
                )

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)


def optimizer_updates(checkpoint: Path) -> int:
    """How many times AdamW updated the parameters before ``checkpoint`` was written."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    return int(next(iter(state.values()))["step"])


def check_overflow_skipped(out: Path, result):
    assert result.global_step == 4
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in log] == [1, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in log)
    # Step 1 overflowed and changed nothing; every later step updated the weights.
    assert optimizer_updates(out / "checkpoint-2") == 1
    assert optimizer_updates(out / "checkpoint-4") == 3
    assert (out / "controlnet").is_dir()


def test_fp16_gradient_overflow_is_skipped_by_the_grad_scaler(assets, tmp_path, monkeypatch):
    """Under fp16 a gradient overflow (forced by a 2^60 initial loss scale: the fp16 backward
    overflows) is not an error: the scaler skips that update, lowers its scale, training goes on
    and the loss log counts the skip; also with --on_nonfinite skip."""
    from lisa_control.training.train import train

    model, data = assets
    scaled_accelerator(monkeypatch, "cpu", init_scale=2.0**60)
    for policy in ("stop", "skip"):
        out = tmp_path / policy
        result = train(config(model, data, out, mixed_precision="fp16", on_nonfinite=policy))
        check_overflow_skipped(out, result)


def test_fp16_resume_continues_the_grad_scalers_scale(assets, tmp_path, monkeypatch):
    """The checkpoint holds the scaler's state: after the overflow of step 1 the scale is
    2^60 * 2^-50 = 2^10, and a run resumed at step 2 continues from it (no second overflow)
    with the losses of the uninterrupted run."""
    from lisa_control.training.train import train

    model, data = assets
    scaled_accelerator(monkeypatch, "cpu", init_scale=2.0**60)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config(model, data, full, mixed_precision="fp16"))
    saved = torch.load(full / "checkpoint-2" / "grad_scaler.pt", weights_only=False)
    assert saved["scale"] == 2.0**10
    train(config(model, data, cut, mixed_precision="fp16", max_train_steps=2))
    train(config(model, data, cut, mixed_precision="fp16", resume_from_checkpoint="latest"))
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(full)]
    assert optimizer_updates(cut / "checkpoint-4") == 3  # only step 1 was skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for real fp16")
def test_fp16_gradient_overflow_is_skipped_on_a_gpu(assets, tmp_path, monkeypatch):
    """The same on a GPU, with accelerate's own fp16 autocast and a CUDA GradScaler."""
    from lisa_control.training.train import train

    model, data = assets
    scaled_accelerator(monkeypatch, "cuda", init_scale=2.0**60)
    out = tmp_path / "gpu"
    result = train(config(model, data, out, mixed_precision="fp16", device="cuda"))
    check_overflow_skipped(out, result)


def poison_encoder(monkeypatch, at_call: int):
    """The ``at_call``-th encoded batch has NaN latents: a non-finite loss."""
    from lisa_control.families import encoders

    original, calls = encoders.FrozenEncoders.encode, {"n": 0}

    def encode(self, batch):
        x0, context, condition = original(self, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            x0 = torch.full_like(x0, float("nan"))
        return x0, context, condition

    monkeypatch.setattr(encoders.FrozenEncoders, "encode", encode)


def test_fp16_nonfinite_loss_still_stops_with_the_last_checkpoint_intact(
    assets, tmp_path, monkeypatch
):
    from lisa_control.training.checkpoint import list_checkpoints
    from lisa_control.training.train import train

    model, data = assets
    scaled_accelerator(monkeypatch, "cpu", init_scale=2.0**10)
    poison_encoder(monkeypatch, at_call=3)
    out = tmp_path / "nan"
    cfg = config(model, data, out, mixed_precision="fp16", checkpointing_steps=1)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        train(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "controlnet").exists()


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_fp32_nonfinite_gradient_still_stops(assets, tmp_path, monkeypatch):
    """Without a grad scaler (fp32, and likewise bf16) a non-finite gradient stays an error."""
    from lisa_control.training.checkpoint import list_checkpoints
    from lisa_control.core.step import ControlTrainingStep
    from lisa_control.training.train import train

    model, data = assets
    original, calls = ControlTrainingStep.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = _InfiniteGradient.apply(out.loss)
        return out

    monkeypatch.setattr(ControlTrainingStep, "forward", forward)
    out = tmp_path / "inf"
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 2"):
        train(config(model, data, out, checkpointing_steps=1))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]


# ----------------------------------------------------------------------------- captions


def test_caption_choices_are_drawn_afresh_every_epoch(assets):
    from lisa_control.data.folder import ControlDataset

    _, data = assets
    p, epochs = 0.3, 150
    dataset = ControlDataset(data, resolution=16, proportion_empty_prompts=p, seed=3)
    captions = [[dataset[(e, i)]["caption"] for e in range(epochs)] for i in range(len(dataset))]
    empty = np.array([[c == "" for c in row] for row in captions])
    n = empty.size
    assert abs(empty.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n)
    # Every item is captionless in some epochs and captioned in others.
    assert empty.any(axis=1).all() and (~empty).any(axis=1).all()
    # Items with several captions use each of them, about equally often.
    for i in range(1, len(dataset), 2):
        used = [c for c in captions[i] if c]
        shares = np.array([used.count(f"item {i} take {j}") for j in range(3)]) / len(used)
        assert abs(shares - 1 / 3).max() <= 4 * np.sqrt(2 / 9 / len(used)), (i, shares)
    # A plain index reads epoch 0; the draws depend on the seed.
    assert [dataset[i]["caption"] for i in range(8)] == [row[0] for row in captions]
    other = ControlDataset(data, resolution=16, proportion_empty_prompts=p, seed=4)
    assert [other[(e, 1)]["caption"] for e in range(epochs)] != captions[1]


def record_captions(monkeypatch) -> list[list[str]]:
    from lisa_control.families import encoders

    original, seen = encoders.FrozenEncoders.encode, []

    def encode(self, batch):
        seen.append(list(batch["caption"]))
        return original(self, batch)

    monkeypatch.setattr(encoders.FrozenEncoders, "encode", encode)
    return seen


def test_resumed_run_repeats_the_captions_of_the_unbroken_run(assets, tmp_path, monkeypatch):
    """Six steps over 4-batch epochs: the trainer reads the keys of the resumable order, and a
    run resumed at step 3 sees exactly the captions the unbroken run saw at steps 4 to 6."""
    from lisa_control.data.folder import ControlDataset
    from lisa_control.data.sampler import ResumableBatchOrder
    from lisa_control.training.train import train

    model, data = assets
    settings = dict(proportion_empty_prompts=0.5, max_train_steps=6, checkpointing_steps=3)
    seen = record_captions(monkeypatch)
    train(config(model, data, tmp_path / "unbroken", **settings))
    unbroken = list(seen)

    dataset = ControlDataset(data, resolution=16, proportion_empty_prompts=0.5, seed=0)
    keys = islice(ResumableBatchOrder(len(dataset), 2, seed=0).batch_keys(), 6)
    assert unbroken == [[dataset[k]["caption"] for k in batch] for batch in keys]
    assert len({c for batch in unbroken for c in batch}) > 4  # empty, single and listed captions

    out = tmp_path / "broken"
    seen.clear()
    train(config(model, data, out, **settings | dict(max_train_steps=3)))
    seen.clear()
    train(config(model, data, out, **settings, resume_from_checkpoint="latest"))
    assert seen == unbroken[3:]
    assert [r["loss"] for r in read_log(out)] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "unbroken")], abs=1e-6
    )


def test_cached_prompts_follow_the_caption_drawn_at_each_visit(tmp_path):
    """--cache_latents keeps one latent per item, but the text context of the caption each
    visit drew (here an item first captioned, then captionless)."""
    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    model = load_main_model(str(make_sd_model(tmp_path / "sd")))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1

    def batch(captions):
        return {
            "pixel_values": pixels,
            "conditioning_pixel_values": torch.rand(2, 3, 64, 64),
            "caption": captions,
            "index": torch.tensor([3, 5]),
        }

    cached, fresh = FrozenEncoders(model, "cpu", cache=True), FrozenEncoders(model, "cpu")
    x_a, ctx_a, _ = cached.encode(batch(["a b", "c"]))
    x_b, ctx_b, _ = cached.encode(batch(["", "c"]))
    assert torch.equal(x_a, x_b)  # the item's latent is reused
    expected = fresh.prompt_context(["", "c"]).encoder_hidden_states
    torch.testing.assert_close(ctx_b.encoder_hidden_states, expected)
    assert not torch.allclose(ctx_a.encoder_hidden_states[0], ctx_b.encoder_hidden_states[0])
    assert torch.equal(ctx_a.encoder_hidden_states[1], ctx_b.encoder_hidden_states[1])
