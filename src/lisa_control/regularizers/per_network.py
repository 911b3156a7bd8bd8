"""One regularizer per side network of a composed branch, behind one name.

A branch with several side networks (``families.composition.ComposedBranch``) exposes them as
``side_branches`` (name -> the branch of that side network); :func:`build_regularizers` then
builds each named regularizer once per side network and wraps the copies in a
:class:`PerSideNetwork`. To the trainer it is one regularizer (its name, which selects its
optimizer group and learning rate, and its checkpoint slot are the single-network ones); its loss
is the sum of the copies' losses, and each copy's logs appear under its side network's name
(``pose/aux_loss``, ``segmentation/aux_loss``). The copies share one choice of batch rows
(``prior_rows``): the first copy that needs the prior makes it, once per step, so a random
subset draws from the step's generator as a single regularizer does.
"""

from __future__ import annotations

from torch import nn

from .base import Regularizer, RegularizerOutput, StepState


class PerSideNetwork(Regularizer):
    """``parts``: side-network name -> the regularizer built for that side network's branch."""

    def __init__(self, parts: dict[str, Regularizer]):
        super().__init__()
        if not parts:
            raise ValueError("PerSideNetwork needs at least one regularizer.")
        first = next(iter(parts.values()))
        self.name = first.name
        self.needs_prior = any(p.needs_prior for p in parts.values())
        self.parts = nn.ModuleDict(parts)

    def prior_rows(self, noised, generator=None):
        """The rows of the first copy that needs the prior; every copy reads those (the step
        passes them on in ``StepState.rows``)."""
        for part in self.parts.values():
            if part.needs_prior:
                return part.prior_rows(noised, generator=generator)
        return None

    def loss(self, state: StepState) -> RegularizerOutput:
        total, logs = None, {}
        for side, part in self.parts.items():
            out = part(state)
            total = out.loss if total is None else total + out.loss
            logs[f"{side}/{part.name}_loss"] = out.loss.detach()
            logs.update({f"{side}/{key}": value for key, value in out.logs.items()})
        return RegularizerOutput(loss=total, logs=logs)

    def remove_hooks(self) -> None:
        for part in self.parts.values():
            part.remove_hooks()
