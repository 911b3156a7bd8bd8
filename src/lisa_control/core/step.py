"""One training step of a dual-branch model as a single module, so that every caller (the CLI
trainer, a user's own loop, the benchmarks, DDP through accelerate) computes the same loss.

    loss = objective.loss(y(x_t, t, c), y_target) + sum_r r.loss(step state)

The prior y_prior(x_t, t) is computed only when a regularizer needs it, and only for the batch
rows one of them asks for (``Regularizer.prior_rows``; the union when several do, every row when
one says None).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .branch import Context, DualBranch, union_rows
from .objectives import Objective
from ..regularizers.base import Regularizer, StepState


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class ControlTrainingStep(nn.Module):
    """Side network + regularizers behind one ``forward``; the frozen main network rides along.

    Wrapping this module (not the side network alone) in DDP keeps the side network's and every
    regularizer's gradients in one all-reduce.
    """

    def __init__(
        self, branch: DualBranch, objective: Objective, regularizers: list[Regularizer] = ()
    ):
        super().__init__()
        self.branch = branch
        self.objective = objective
        self.regularizers = nn.ModuleList(regularizers)

    @property
    def needs_prior(self) -> bool:
        return any(r.needs_prior for r in self.regularizers)

    def _branch_takes_prior_rows(self) -> bool:
        """Whether the branch's ``forward`` accepts ``prior_rows``; a branch without it computes
        the full prior, and regularizers read their rows from it."""
        try:
            params = inspect.signature(self.branch.forward).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == "prior_rows" or p.kind is p.VAR_KEYWORD for p in params)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        x0: torch.Tensor,
        context: Context,
        condition: torch.Tensor,
        step: int = 0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> StepOutput:
        noised = self.objective.sample(x0, generator=generator, noise=noise, timesteps=timesteps)
        needs_prior = self.needs_prior
        rows = [
            reg.prior_rows(noised, generator=generator) if reg.needs_prior else None
            for reg in self.regularizers
        ]
        prior_kwargs = {}
        if needs_prior:
            union = union_rows(
                (r for reg, r in zip(self.regularizers, rows) if reg.needs_prior),
                noised.x_t.shape[0],
            )
            if union is not None and self._branch_takes_prior_rows():
                prior_kwargs["prior_rows"] = union
        prediction = self.branch(
            noised.x_t, noised.timesteps, context, condition, with_prior=needs_prior, **prior_kwargs
        )
        diffusion = self.objective.loss(prediction.output, noised)
        logs = {"diffusion_loss": diffusion.detach()}
        total = diffusion
        state = StepState(noised=noised, prediction=prediction, objective=self.objective, step=step)
        for reg, reg_rows in zip(self.regularizers, rows):
            out = reg(state if reg_rows is None else replace(state, rows=reg_rows))
            total = total + out.loss
            prefix = "" if len(self.regularizers) == 1 else f"{reg.name}/"
            logs[f"{prefix}{reg.name}_loss"] = out.loss.detach()
            logs.update({f"{prefix}{k}": v for k, v in out.logs.items()})
        logs["loss"] = total.detach()
        return StepOutput(loss=total, logs=logs)
