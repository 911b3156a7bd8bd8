"""The regularizer interface: an ``nn.Module`` holding its own trainable parameters (if any),
that reads one training step's tensors and returns a loss to add to the objective's.

The trainer knows nothing else about a regularizer: it asks ``needs_prior`` before the forward
pass, sums ``loss(state)`` into the objective, hands ``parameters()`` to the optimizer (in a
group of their own at ``learning_rate`` when that is set) and checks that it did with
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


@dataclass
class RegularizerOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Regularizer(nn.Module):
    name: str = "regularizer"
    needs_prior: bool = False
    # A head trained from zero (LISA's decoder) may need to move faster than a side network
    # fine-tuned at lr 1e-5; None trains it at the side network's learning rate, as the papers do.
    learning_rate: float | None = None

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
