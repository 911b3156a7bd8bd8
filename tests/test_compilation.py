"""Block-wise torch.compile: which blocks it compiles, that hooked blocks stay eager, and that a
compiled step computes what the eager one does. The 'eager' dynamo backend runs the same
tracing and guards without generating code, so this checks the wiring in seconds on a CPU;
the speed of inductor is measured on the GPU (benchmarks/step_time.py --compile)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from factories import make_image_folder, make_pixel_model

from lisa_control import (
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.cli import main
from lisa_control.training.compilation import compile_blocks, heavy_blocks
from lisa_control.zoo.unet import tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def lisa_step(layer: str, **feature_shape):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet(sample_size=16, in_channels=4))
    branch = UNetControlNetBranch.from_main(unet)
    with torch.no_grad():  # off zero, so the residuals and the decoder carry gradient
        for p in branch.side_network.controlnet_down_blocks.parameters():
            p.normal_(0, 0.05)
    lisa = LikelihoodScoreAlignment(
        branch.side_network, layer=layer, out_channels=4, sample_size=16, **feature_shape
    )
    return ControlTrainingStep(branch, make_objective("epsilon"), [lisa])


def test_every_heavy_block_compiles_except_one_holding_a_hook():
    # The hook sits inside the side network's second block (64 channels at 8x8).
    step = lisa_step("down_blocks.1.resnets.0", feature_channels=64, feature_size=8)
    side, main_net = step.branch.side_network, step.branch.main_network
    assert compile_blocks(main_net, backend="eager") == {
        "compiled": len(heavy_blocks(main_net)),
        "left_eager": 0,
    }
    counts = compile_blocks(side, backend="eager")
    assert counts == {"compiled": len(heavy_blocks(side)) - 1, "left_eager": 1}
    assert not is_compiled(side.down_blocks[1])
    assert is_compiled(side.down_blocks[0]) and is_compiled(side.controlnet_cond_embedding)
    assert all(is_compiled(b) for b in main_net.up_blocks) and is_compiled(main_net.mid_block)


def test_compiled_lisa_step_gives_the_eager_loss_and_gradients():
    eager = lisa_step("down_5")
    compiled = copy.deepcopy(eager)
    for net in (compiled.branch.main_network, compiled.branch.side_network):
        compile_blocks(net, backend="eager")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    context = Context(torch.randn(2, 7, 32, generator=g))
    condition = torch.rand(2, 3, 128, 128, generator=g)
    noise, timesteps = torch.randn(x0.shape, generator=g), torch.tensor([37, 801])

    outputs = []
    for step in (eager, compiled):
        out = step(x0, context, condition, noise=noise, timesteps=timesteps)
        out.loss.backward()
        outputs.append((out, {n: p.grad for n, p in step.named_parameters() if p.requires_grad}))
    (a, grads_a), (b, grads_b) = outputs
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    assert b.logs["aux_loss"].item() == pytest.approx(a.logs["aux_loss"].item(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_flag_compiles_and_logs_the_eager_losses(tmp_path, capsys):
    model = make_pixel_model(tmp_path / "model")
    data = make_image_folder(tmp_path / "data", n=4)
    logs = []
    for name, extra in (("eager", []), ("compiled", ["--torch_compile"])):
        argv = [
            "train",
            "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data),
            "--resolution", "16",
            "--train_batch_size", "2",
            "--max_train_steps", "2",
            "--seed", "0",
            "--report_to", "none",
            "--output_dir", str(tmp_path / name),
            "--torch_compile_backend", "eager",
            "--no-progress",
            *extra,
        ]  # fmt: skip
        assert main(argv) == 0
        logs.append((tmp_path / name / "loss_log.jsonl").read_text().splitlines())
    printed = capsys.readouterr().out
    assert "torch.compile (eager): main network" in printed
    assert "torch.compile (eager): side network" in printed

    eager, compiled = ([json.loads(line)["loss"] for line in log] for log in logs)
    assert compiled == pytest.approx(eager, rel=1e-5)
