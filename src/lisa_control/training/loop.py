"""The one training loop, shared by ``lisa train`` and ``lisa pretrain``.

It knows a step function returning a :class:`~lisa_control.core.step.StepOutput` (a loss and
a dict of scalar logs), an optimizer, an LR scheduler, an iterator of (micro-)batches, a
:class:`~lisa_control.training.logs.LossRecorder` and callbacks; what a batch holds, which
networks learn and what is saved is theirs. Per optimizer step:

    step function on each micro-batch -> backward -> clip -> non-finite guard -> optimizer and
    LR scheduler step -> record the logs -> callbacks (EMA, checkpoints, validation, samples)

Gradient accumulation, mixed precision and DDP come from the ``accelerate.Accelerator``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import NonFiniteLossError
from ..core.step import StepOutput
from .logs import LossRecorder

logger = logging.getLogger("lisa_control")


class Callback:
    """What the loop calls besides the step; every method is optional."""

    def on_step_end(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) was applied and recorded."""

    def on_train_end(self, step: int) -> None:
        """After the last step, once the loss records are flushed."""


class Loop:
    """Runs optimizer steps until ``max_steps`` or the end of the batches.

    ``model``: the module gradients flow into, as ``accelerator.prepare`` returned it (the
    loop sets it to training mode, clips its trainable parameters and, under DDP, skips the
    gradient all-reduce on accumulation micro-batches through it). ``step_fn(batch, step)``
    computes the loss of one micro-batch at optimizer step ``step`` (counted from 0).
    ``on_nonfinite``: ``"stop"`` raises on a NaN/Inf loss term or gradient norm, ``"skip"``
    drops that step (the weights stay, the step is not counted), ``None`` checks nothing.
    ``max_grad_norm``: the global norm gradients are clipped to; 0 (or None) turns clipping off
    (the norm is still measured, for the non-finite check).
    """

    def __init__(
        self,
        accelerator,
        model: nn.Module,
        step_fn: Callable[[Any, int], StepOutput],
        optimizer,
        lr_scheduler,
        recorder: LossRecorder,
        max_grad_norm: float = 1.0,
        on_nonfinite: str | None = "stop",
        callbacks: Sequence[Callback] = (),
    ):
        self.accelerator = accelerator
        self.model = model
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.recorder = recorder
        # Clipping to an infinite norm scales by 1: the norm is measured and nothing is clipped.
        self.max_grad_norm = max_grad_norm or math.inf
        self.on_nonfinite = on_nonfinite
        self.callbacks = list(callbacks)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.skipped_steps = 0  # optimizer steps the fp16 grad scaler skipped
        self._reset_step()

    def run(self, batches: Iterable, start_step: int, max_steps: int) -> int:
        """Train from ``start_step`` steps done; returns the number of steps done."""
        step = start_step
        self.model.train()
        for batch in batches:
            if step >= max_steps:
                break
            if not self._micro_step(batch, step):
                continue
            step += 1
            self.recorder.end_step(step, self._host_values(), last=step == max_steps)
            for callback in self.callbacks:
                callback.on_step_end(step)
        self.recorder.close(step, self._host_values())
        for callback in self.callbacks:
            callback.on_train_end(step)
        return step

    def _reset_step(self) -> None:
        self._keys: list[str] | None = None
        self._sums: torch.Tensor | None = None  # this step's logs, summed over micro-batches
        self._bad: torch.Tensor | None = None  # per log key: non-finite in some micro-batch

    def _micro_step(self, batch, step: int) -> bool:
        """One micro-batch; True when it completed an optimizer step that was applied."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            out = self.step_fn(batch, step)
            self._collect(out.logs)
            acc.backward(out.loss)
            if not acc.sync_gradients:
                return False
            norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)
            if not self._finite(norm, step):
                self.optimizer.zero_grad(set_to_none=True)
                self._reset_step()
                return False
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.scaler is not None and acc.optimizer_step_was_skipped:
            self.skipped_steps += 1
        self.recorder.add(dict(zip(self._keys, self._sums.unbind())))
        self._reset_step()
        return True

    def _collect(self, logs: dict[str, torch.Tensor]) -> None:
        """Sum a micro-batch's logs into the step's, on the device (no host sync)."""
        values = torch.stack([v.detach().float().reshape(()) for v in logs.values()])
        values = values / self.accelerator.gradient_accumulation_steps
        bad = ~torch.isfinite(values)
        if self._keys is None:
            self._keys, self._sums, self._bad = list(logs), values, bad
        elif self._keys == list(logs):
            self._sums, self._bad = self._sums + values, self._bad | bad
        else:
            raise RuntimeError(
                f"the step logs changed keys within one optimizer step: {self._keys} then "
                f"{list(logs)}"
            )

    def _finite(self, norm, step: int) -> bool:
        """Whether the step may be applied; reports (stop or skip) when it may not.

        One host sync per optimizer step, on a single flag that combines every loss term of
        every micro-batch with the clipped gradient norm and is reduced across processes (so
        all ranks skip together): a NaN update must never reach the weights, and AdamW cannot
        drop an update on the device. With the fp16 grad scaler the gradient norm is left to
        the scaler, which skips the update itself and lowers its scale.
        """
        if self.on_nonfinite is None:
            return True
        flags = [self._bad.any()]
        # DeepSpeed clips inside its engine and may return no norm.
        check_norm = self.accelerator.scaler is None and norm is not None
        if check_norm:
            flags.append(~torch.isfinite(torch.as_tensor(norm, device=self._bad.device)).all())
        flag = torch.stack(flags).any().float()
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")
        if flag.item() == 0:
            return True
        terms = [k for k, bad in zip(self._keys, self._bad.tolist()) if bad]
        if terms:
            self._report(step + 1, terms, "loss")
        elif check_norm and not torch.isfinite(torch.as_tensor(norm)).all():
            self._report(step + 1, _loss_terms(self._keys), "gradient")
        else:
            self._report(step + 1, ["another rank's loss"], "loss")
        return False

    def _report(self, step: int, terms: list[str], what: str) -> None:
        message = (
            f"non-finite {what} at step {step} in {', '.join(terms)}; the last checkpoint is "
            "intact. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or pass "
            "--on_nonfinite skip to skip such steps."
        )
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(message)
        logger.warning(message.replace("; the last", " (skipped); the last"))

    def _host_values(self) -> dict[str, float]:
        """Per-record values already on the host: the learning rate (of the first parameter
        group) and, under the fp16 grad scaler, how many steps it has skipped."""
        values = {"lr": self.lr_scheduler.get_last_lr()[0]}
        if self.accelerator.scaler is not None:
            values["skipped_steps"] = self.skipped_steps
        return values


def _loss_terms(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith("_loss") and k != "loss"] or ["loss"]
