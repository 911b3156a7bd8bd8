"""The shared-encoder prior: the split UNet forward (``branches.unet_split``) and the
``UNetControlNetBranch`` path that uses it must give what the full UNet passes give, down to
every gradient of a LISA training step; plus a smoke run of ``benchmarks/step_time.py --tiny``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from lisa_control import (
    ConfigError,
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    ModelError,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.families import unet_split
from lisa_control.zoo.unet import tiny_unet

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
BATCH = 2
TEXT_DIM = 32
ATOL = 1e-5


def _unet(sdxl_like=False, small=False, **overrides) -> UNet2DConditionModel:
    """The tiny SD-layout UNet (two resnets per down block); ``small`` halves its widths and
    keeps one resnet per down block, the least that still gives its ControlNet LISA's down_5,
    for the tests that also run a backward pass."""
    shape = dict(block_out_channels=(16, 32, 32), layers_per_block=1) if small else {}
    config = tiny_unet(sample_size=SIZE, in_channels=4, sdxl_like=sdxl_like, **shape)
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def _context(sdxl_like=False, batch=BATCH) -> Context:
    added = None
    if sdxl_like:
        # SDXL's pooled text embedding and (orig size, crop, target size) time ids.
        added = {
            "text_embeds": torch.randn(batch, TEXT_DIM),
            "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * batch).float(),
        }
    return Context(torch.randn(batch, 7, TEXT_DIM), added_cond_kwargs=added)


def _randomize_zero_inits(*modules: torch.nn.Module) -> None:
    """Zero convolutions (and the decoder's zero output conv) block every gradient behind them
    at initialisation; small random weights make the gradient comparison cover the whole side
    network, as after some training."""
    for module in modules:
        for param in module.parameters():
            param.data.normal_(0.0, 0.05)


def _residuals_like(encoding: unet_split.UNetEncoding):
    return [torch.randn_like(s) for s in encoding.skips], torch.randn_like(encoding.mid)


# ----------------------------------------------------------------------------- unet_split


# SDXL's block layout (no attention at full resolution, deeper transformers below).
SDXL_LAYOUT = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
)


@pytest.mark.parametrize(
    "case",
    ["sd", "sdxl", "sdxl_layout", "class_embedding", "odd_size", "no_residuals"],
)
def test_encode_decode_equals_unet_forward(case):
    overrides = {
        "class_embedding": {"num_class_embeds": 10},
        "sdxl_layout": SDXL_LAYOUT,
    }.get(case, {})
    sdxl = case in ("sdxl", "sdxl_layout")
    unet = _unet(sdxl_like=sdxl, **overrides)
    # 10 is not a multiple of the total upsampling factor 4: up blocks need explicit sizes.
    size = 10 if case == "odd_size" else SIZE
    x_t = torch.randn(BATCH, 4, size, size)
    timesteps = torch.tensor([3, 901])
    context = _context(sdxl_like=sdxl)
    kwargs = dict(
        encoder_hidden_states=context.encoder_hidden_states,
        added_cond_kwargs=context.added_cond_kwargs,
        class_labels=torch.tensor([1, 7]) if case == "class_embedding" else None,
    )
    with torch.no_grad():
        encoding = unet_split.encode(unet, x_t, timesteps, **kwargs)
        if case == "no_residuals":
            down, mid = None, None
        else:
            down, mid = _residuals_like(encoding)
        reference = unet(
            x_t,
            timesteps,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **kwargs,
        ).sample
        split = unet_split.decode(unet, encoding, down, mid)
    assert split.shape == x_t.shape
    torch.testing.assert_close(split, reference, atol=ATOL, rtol=0)


def test_decode_with_prior_equals_two_decodes():
    unet = _unet()
    with torch.no_grad():
        encoding = unet_split.encode(
            unet, torch.randn(BATCH, 4, SIZE, SIZE), torch.tensor([10, 500]), torch.randn(2, 7, 32)
        )
        down, mid = _residuals_like(encoding)
        controlled, prior = unet_split.decode_with_prior(unet, encoding, down, mid)
        torch.testing.assert_close(controlled, unet_split.decode(unet, encoding, down, mid))
        torch.testing.assert_close(prior, unet_split.decode(unet, encoding))


def test_split_refuses_what_it_does_not_support():
    unet = _unet()
    x_t, t, text = torch.randn(1, 4, SIZE, SIZE), torch.tensor([5]), torch.randn(1, 7, 32)
    with pytest.raises(ConfigError, match="attention_mask"):
        unet_split.encode(unet, x_t, t, text, encoder_attention_mask=torch.ones(1, 7))
    with pytest.raises(ConfigError, match="cross_attention_kwargs"):
        unet_split.encode(unet, x_t, t, text, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        unet_split.encode(torch.nn.Linear(2, 2), x_t, t, text)
    with torch.no_grad():
        encoding = unet_split.encode(unet, x_t, t, text)
    down, mid = _residuals_like(encoding)
    with pytest.raises(ConfigError, match="both"):
        unet_split.decode(unet, encoding, down, None)
    with pytest.raises(ModelError, match="skip connections"):
        unet_split.decode(unet, encoding, down[:-1], mid)


# ----------------------------------------------------------------------------- the branch


def _lisa_step(sdxl_like: bool, prediction_type: str):
    unet = _unet(sdxl_like=sdxl_like, small=True)
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1)
    side = branch.side_network
    lisa = LikelihoodScoreAlignment(side, out_channels=4, sample_size=SIZE)
    _randomize_zero_inits(side.controlnet_down_blocks, side.controlnet_mid_block, lisa.decoder.out)
    return ControlTrainingStep(branch, make_objective(prediction_type), [lisa])


def _run(step: ControlTrainingStep, inputs: dict, shared: bool, batched: bool = False):
    """One LISA training step's loss, prediction and gradients under the given prior path."""
    branch = step.branch
    branch.shared_encoder_prior, branch.batched_prior = shared, batched
    captured = {}

    def keep_prediction(module, args, kwargs, output):
        captured["prediction"] = output

    handle = branch.register_forward_hook(keep_prediction, with_kwargs=True)
    step.zero_grad(set_to_none=True)
    out = step(**inputs)
    out.loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.requires_grad}
    return out, captured["prediction"], grads


@pytest.mark.parametrize(
    ("sdxl_like", "prediction_type"),
    [(False, "epsilon"), (False, "v_prediction"), (True, "epsilon"), (True, "v_prediction")],
)
def test_shared_encoder_step_equals_full_pass_reference(sdxl_like, prediction_type):
    step = _lisa_step(sdxl_like, prediction_type)
    inputs = dict(
        x0=torch.randn(BATCH, 4, SIZE, SIZE),
        context=_context(sdxl_like),
        condition=torch.rand(BATCH, 3, SIZE, SIZE),
        noise=torch.randn(BATCH, 4, SIZE, SIZE),
        timesteps=torch.tensor([40, 870]),
    )
    ref_out, ref_pred, ref_grads = _run(step, inputs, shared=False)

    for batched in (False, True):
        out, pred, grads = _run(step, inputs, shared=True, batched=batched)
        torch.testing.assert_close(pred.prior, ref_pred.prior, atol=ATOL, rtol=0)
        torch.testing.assert_close(pred.output, ref_pred.output, atol=ATOL, rtol=0)
        assert pred.prior.grad_fn is None and not pred.prior.requires_grad
        for key in ("loss", "diffusion_loss", "aux_loss"):
            torch.testing.assert_close(out.logs[key], ref_out.logs[key], atol=ATOL, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)

    # The comparison is not vacuous: the side network's interior and the decoder get gradient.
    interior = "branch.side_network.down_blocks.0.resnets.0.conv1.weight"
    decoder_body = "regularizers.0.decoder.body.0.weight"
    assert ref_grads[interior].abs().sum() > 0 and ref_grads[decoder_body].abs().sum() > 0


def test_plain_forward_and_prior_method_unchanged():
    step = _lisa_step(False, "epsilon")
    branch = step.branch
    x_t, t = torch.randn(BATCH, 4, SIZE, SIZE), torch.tensor([100, 600])
    context, cond = _context(), torch.rand(BATCH, 3, SIZE, SIZE)
    with torch.no_grad():
        shared = branch(x_t, t, context, cond, with_prior=True)
        plain = branch(x_t, t, context, cond)
        torch.testing.assert_close(shared.output, plain.output, atol=ATOL, rtol=0)
        torch.testing.assert_close(shared.prior, branch.prior(x_t, t, context), atol=ATOL, rtol=0)
    assert plain.prior is None


@pytest.mark.parametrize("reason", ["x_t_requires_grad", "main_trainable", "main_hooked"])
def test_falls_back_to_full_passes_where_the_split_would_change_results(monkeypatch, reason):
    """A gradient through the down path (x_t or a main-network weight requiring grad) would be
    dropped by the no-grad shared down path; a hook on the UNet's own call would be skipped."""
    branch = _lisa_step(False, "epsilon").branch
    context, cond = _context(), torch.rand(BATCH, 3, SIZE, SIZE)
    t = torch.tensor([100, 600])
    x_t = torch.randn(BATCH, 4, SIZE, SIZE, requires_grad=reason == "x_t_requires_grad")
    if reason == "main_trainable":
        branch.main_network.conv_in.weight.requires_grad_(True)
    calls = []
    if reason == "main_hooked":
        branch.main_network.register_forward_hook(lambda *args: calls.append(1))

    def split_must_not_run(*args, **kwargs):
        raise AssertionError(f"the split forward ran although {reason}")

    monkeypatch.setattr(unet_split, "encode", split_must_not_run)
    pred = branch(x_t, t, context, cond, with_prior=True)
    pred.output.sum().backward()
    assert pred.prior is not None
    if reason == "x_t_requires_grad":
        assert x_t.grad is not None
    if reason == "main_trainable":
        assert branch.main_network.conv_in.weight.grad is not None
    if reason == "main_hooked":
        assert len(calls) == 2  # the controlled and the prior pass


def test_flags_are_checked_and_passed_through():
    unet = _unet()
    with pytest.raises(ConfigError, match="shared_encoder_prior"):
        UNetControlNetBranch(
            unet, ControlNetModel.from_unet(unet), shared_encoder_prior=False, batched_prior=True
        )
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1, batched_prior=True)
    assert branch.shared_encoder_prior and branch.batched_prior


# ----------------------------------------------------------------------------- benchmark smoke


def _load_benchmark_script():
    spec = importlib.util.spec_from_file_location(
        "step_time_benchmark", REPO / "benchmarks" / "step_time.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_benchmark_tiny_cpu_smoke(tmp_path, capsys):
    """``benchmarks/step_time.py --tiny --device cpu`` runs every variant and writes its JSON
    (the GPU run is the same code at SD2.1 size). In-process: a subprocess would spend most of
    its time importing diffusers again."""
    benchmark = _load_benchmark_script()
    out = tmp_path / "step_time.json"
    argv = ["--tiny", "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    benchmark.main(argv)
    elapsed = time.perf_counter() - start

    result = json.loads(out.read_text())
    assert result["argv"][1:] == argv
    assert {r["variant"] for r in result["runs"]} == set(benchmark.VARIANTS)
    for run in result["runs"]:
        assert run["median_s"] > 0 and run["flops_per_step"] > 0 and run["all_losses_finite"]
    for batch in result["config"]["batch_sizes"]:
        ratios = result["ratios"][str(batch)]
        assert set(ratios) >= {"C/B", "A/B", "A/C"} and all(r > 0 for r in ratios.values())
    # In fp32 on the CPU the shared and batched paths agree with the full passes.
    for mode in ("shared", "batched"):
        check = result["equality_check"][mode]
        assert check["prior_max_abs_diff"] < ATOL and check["grad_max_abs_diff"] < ATOL
    assert "C/B" in capsys.readouterr().out.strip().splitlines()[-1]
    # About 5 s on an idle 2-core CI runner; the bound only catches a smoke run gone full-size.
    assert elapsed < 60, f"the --tiny smoke run took {elapsed:.1f} s"


def test_step_time_benchmark_interleaved_rounds_and_breakdown(tmp_path):
    """``--rounds`` times every variant in each round (the per-round medians and ratios are
    read back and agree with the step times), and ``--breakdown`` times the prior on B, B/2 and
    B/4 rows and the decoder on the hooked feature's shape."""
    benchmark = _load_benchmark_script()
    out = tmp_path / "step_time.json"
    argv = ["--tiny", "--device", "cpu", "--variants", "B", "C", "--batch-sizes", "4", "--rounds",
            "3", "--steps", "2", "--breakdown", "--no-check", "--out", str(out)]  # fmt: skip
    benchmark.main(argv)

    result = json.loads(out.read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    for run in runs.values():
        assert len(run["step_times_s"]) == 6 and len(run["round_medians_s"]) == 3
        first_round = sorted(run["step_times_s"][:2])
        assert run["round_medians_s"][0] == pytest.approx(sum(first_round) / 2)
    ratios = result["round_ratios"]["4"]["C/B"]
    expected = [c / b for c, b in zip(runs["C"]["round_medians_s"], runs["B"]["round_medians_s"])]
    assert ratios == pytest.approx(expected)
    pieces = result["breakdown_ms"]["4"]
    assert {"encode", "prior_rows_4", "prior_rows_2", "prior_rows_1"} <= set(pieces)
    assert {"decoder_rows_4", "decoder_rows_2", "decoder_rows_1"} <= set(pieces)
    assert all(pieces[k] > 0 for k in pieces if k.startswith(("prior", "decoder", "encode")))
    # The tiny ControlNet's down_5 input: 32 channels at a quarter of the 8x8 latent.
    assert pieces["feature_shape"] == [4, 32, 2, 2] and pieces["decoder_parameters"] > 0
    assert result["config"]["rounds"] == 3
