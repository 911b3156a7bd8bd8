"""The regularizer interface: an ``nn.Module`` holding its own trainable parameters (if any),
that reads one training step's tensors and returns a loss to add to the objective's.

The trainer knows nothing else about a regularizer: it asks ``needs_prior`` and
``prior_rows(noised)`` (the batch rows it needs the prior for) before the forward pass, sums
``loss(state)`` into the objective, hands ``parameters()`` to the optimizer (in a group of
their own when the run sets a rate for them by name) and checks that it did with
``check_optimizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.branch import Prediction
from ..core.errors import ConfigError
from ..core.objectives import NoisedBatch, Objective


@dataclass
class StepState:
    """The tensors of one training step that a regularizer may read."""

    noised: NoisedBatch
    prediction: Prediction
    objective: Objective
    step: int = 0
    # The batch rows this regularizer reads, as its ``prior_rows`` chose them; None: the rows
    # the prediction's prior covers (``prediction.prior_rows``, every row when that is None).
    rows: torch.Tensor | None = None


@dataclass
class RegularizerOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Regularizer(nn.Module):
    name: str = "regularizer"
    needs_prior: bool = False

    def prior_rows(
        self, noised: NoisedBatch, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """The batch rows whose prior this regularizer reads at this step (ascending, without
        repeats), or None for every row. Asked once per step, before the forward pass, only
        when ``needs_prior``; ``generator`` is the step's, for a random choice."""
        return None

    def loss(self, state: StepState) -> RegularizerOutput:
        raise NotImplementedError

    def forward(self, state: StepState) -> RegularizerOutput:
        return self.loss(state)

    def remove_hooks(self) -> None:
        """Detach from the network(s) it reads; the module stays usable as a state container."""

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Fail if a trainable parameter of this regularizer is missing from ``optimizer``."""
        given = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in given]
        if missing:
            raise ConfigError(
                f"{type(self).__name__} has trainable parameters the optimizer does not update "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Give them to "
                "the optimizer too, e.g. AdamW([*side_network.parameters(), "
                "*regularizer.parameters()]); otherwise it stays at its zero init and the "
                "regularizer does nothing."
            )
