"""The shared training loop on a toy model: the non-finite guard never lets a NaN update reach
the weights and names what went wrong; the loop reads device values only at log flushes and,
with the guard on, once per step; under fp16 the grad scaler owns non-finite gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lisa_control.core.errors import NonFiniteLossError
from lisa_control.core.step import StepOutput
from lisa_control.training.logs import LossRecorder
from lisa_control.training.loop import Callback, Loop

SRC = str(Path(__file__).resolve().parents[1] / "src" / "lisa_control")


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite norm."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Records:
    def __init__(self):
        self.records: list[dict] = []

    def write(self, records):
        self.records.extend(records)

    def close(self):
        pass


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def toy(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = nn.Linear(2, 1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def step_fn(model, bad: dict[int, str] | None = None):
    """Mean squared output; at the micro-batches in ``bad`` (counted from 0) a NaN loss
    (``"loss"``) or an infinite gradient (``"gradient"``)."""
    calls = {"n": 0}

    def fn(batch, step):
        out = model(batch).pow(2).mean()
        kind = (bad or {}).get(calls["n"])
        calls["n"] += 1
        if kind == "loss":
            out = out * float("nan")
        elif kind == "gradient":
            out = InfiniteGradient.apply(out)
        return StepOutput(loss=out, logs={"diffusion_loss": out.detach(), "loss": out.detach()})

    return fn


def batches(n, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, generator=g).to(device) for _ in range(n)]


def make_loop(accelerator, model, optimizer, scheduler, fn, on_nonfinite="stop", **recorder):
    sink = Records()
    rec = LossRecorder(accelerator, [sink], **recorder)
    loop = Loop(accelerator, model, fn, optimizer, scheduler, rec, on_nonfinite=on_nonfinite)
    return loop, sink


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skipped_step_leaves_the_weights_and_is_not_counted(accelerator, kind):
    data = batches(4)
    model, opt, sched = toy()
    loop, sink = make_loop(accelerator, model, opt, sched, step_fn(model, {1: kind}), "skip")
    assert loop.run(data, 0, 3) == 3
    clean, opt2, sched2 = toy()
    reference, _ = make_loop(accelerator, clean, opt2, sched2, step_fn(clean))
    reference.run([data[0], data[2], data[3]], 0, 3)
    for a, b in zip(model.parameters(), clean.parameters()):
        assert torch.equal(a, b)
    assert [r["step"] for r in sink.records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in sink.records)


@pytest.mark.parametrize(
    "kind,words", [("loss", "non-finite loss at step 2 in diffusion_loss, loss"),
                   ("gradient", "non-finite gradient at step 2 in diffusion_loss")]
)  # fmt: skip
def test_stop_names_the_step_and_the_term(accelerator, kind, words):
    model, opt, sched = toy()
    loop, sink = make_loop(accelerator, model, opt, sched, step_fn(model, {1: kind}))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=words):
        loop.run(batches(3), 0, 3)
    assert [r["step"] for r in sink.records] == [1]
    after_one = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, after_one))  # step 1 applied
    for p, q in zip(model.parameters(), after_one):
        assert torch.all(torch.isfinite(p)) and torch.equal(p, q)  # step 2 never applied


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Count the tensor-to-host reads made by lisa_control's own code."""
    counts = {"item": 0, "tolist": 0, "__bool__": 0, "__float__": 0}
    for name in counts:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(SRC):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


@pytest.mark.parametrize("on_nonfinite,reads_per_step", [(None, 0), ("stop", 1), ("skip", 1)])
def test_host_reads_happen_only_at_flushes_and_for_the_guard(
    accelerator, monkeypatch, on_nonfinite, reads_per_step
):
    model, opt, sched = toy()
    fn = step_fn(model)
    loop, sink = make_loop(
        accelerator, model, opt, sched, fn, on_nonfinite, logging_steps=2, flush_steps=4
    )
    counts = count_host_reads(monkeypatch)
    loop.run(batches(8), 0, 8)
    assert counts == {"item": 8 * reads_per_step, "tolist": 2, "__bool__": 0, "__float__": 0}
    assert [r["step"] for r in sink.records] == [2, 4, 6, 8]


def test_records_are_window_means_flushed_on_schedule(accelerator):
    sink = Records()
    rec = LossRecorder(accelerator, [sink], logging_steps=3, flush_steps=6)
    for step in range(1, 8):
        rec.add({"loss": torch.tensor(float(step))})
        rec.end_step(step, {"lr": 0.5}, last=step == 7)
        assert len(sink.records) == {6: 2, 7: 3}.get(step, 0), step
    assert [(r["step"], r["loss"], r["lr"]) for r in sink.records] == [
        (3, 2.0, 0.5), (6, 5.0, 0.5), (7, 7.0, 0.5)
    ]  # fmt: skip


class CountSteps(Callback):
    def __init__(self):
        self.steps, self.ended = [], None

    def on_step_end(self, step):
        self.steps.append(step)

    def on_train_end(self, step):
        self.ended = step


def test_callbacks_see_each_applied_step_and_the_end(accelerator):
    model, opt, sched = toy()
    rec = LossRecorder(accelerator, [Records()])
    counter = CountSteps()
    loop = Loop(accelerator, model, step_fn(model), opt, sched, rec, callbacks=[counter])
    assert loop.run(batches(10), 2, 5) == 5  # resumed after 2 steps
    assert counter.steps == [3, 4, 5] and counter.ended == 5
    # batches running out end the run early
    assert loop.run(batches(1), 5, 9) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 grad scaler needs CUDA")
def test_fp16_scaler_skips_infinite_gradients_and_the_loss_guard_still_stops():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradScalerKwargs

    AcceleratorState._reset_state(True)
    try:
        # a scale the toy's fp16 gradients fit under, so only the planted step overflows
        scaler = GradScalerKwargs(init_scale=1024.0)
        acc = Accelerator(mixed_precision="fp16", kwargs_handlers=[scaler])
        model, opt, sched = toy(device="cuda")
        model, opt, sched = acc.prepare(model, opt, sched)
        data = batches(5, "cuda")
        loop, sink = make_loop(acc, model, opt, sched, step_fn(model, {1: "gradient"}))
        loop.run(data[:3], 0, 3)  # no error: the scaler skipped step 2 and lowered its scale
        assert loop.skipped_steps == 1
        assert [r["step"] for r in sink.records] == [1, 2, 3]
        assert [r["skipped_steps"] for r in sink.records] == [0, 1, 1]
        assert all(torch.isfinite(p).all() for p in model.parameters())
        loop, _ = make_loop(acc, model, opt, sched, step_fn(model, {0: "loss"}))
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
            loop.run(data[3:], 3, 5)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronizations")
@pytest.mark.parametrize("on_nonfinite,syncs_per_step", [(None, 0), ("stop", 1)])
def test_cuda_synchronizes_only_at_flushes_and_for_the_guard(on_nonfinite, syncs_per_step):
    import warnings

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = Accelerator()
    model, opt, sched = toy(device="cuda")
    data = batches(8, "cuda")
    loop, sink = make_loop(
        acc, model, opt, sched, step_fn(model), on_nonfinite, logging_steps=2, flush_steps=4
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.run(data, 0, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        AcceleratorState._reset_state(True)
    syncs = [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 8 * syncs_per_step + 2, syncs  # + one read per flush (steps 4, 8)
    assert [r["step"] for r in sink.records] == [2, 4, 6, 8]
