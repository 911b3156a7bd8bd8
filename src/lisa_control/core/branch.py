"""The dual-branch interface: a frozen main network plus a trainable side network.

The trainer, the regularizers and the benchmarks talk only to :class:`DualBranch`; each model
family (UNet ControlNet, SD3, Flux, T2I-Adapter, ...) is one file implementing it.

The prior may be asked for on part of the batch only (``prior_rows``): a regularizer that reads
it on a subset of the rows (LISA's ``batch_fraction``) then pays for those rows alone. Row
indices are a 1-D ``LongTensor``, ascending and without repeats; ``None`` means every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ConfigError
from .hooks import default_layer, zero_projection_names


@dataclass
class Context:
    """Everything the main network is conditioned on besides x_t, t and the visual condition.

    ``encoder_hidden_states`` is the text context (a constant null context for unconditional
    models); ``added_cond_kwargs`` carries SDXL's pooled text and time ids; ``extra`` carries
    family-specific inputs (Flux's image/text ids and guidance, for example).
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> Context:
        def move(t):
            if not torch.is_tensor(t):
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Context(
            move(self.encoder_hidden_states),
            None
            if self.added_cond_kwargs is None
            else {k: move(v) for k, v in self.added_cond_kwargs.items()},
            {k: move(v) for k, v in self.extra.items()},
        )

    def select(self, rows: torch.Tensor, batch_size: int, unbatched=()) -> Context:
        """This context for the batch rows ``rows`` of a batch of ``batch_size``: every tensor
        whose first dimension is the batch's is indexed; other values (a context broadcast from
        one row, a scalar, the ``extra`` names in ``unbatched``) pass through."""

        def pick(name, value):
            return value if name in unbatched else take_rows(value, rows, batch_size)

        return Context(
            take_rows(self.encoder_hidden_states, rows, batch_size),
            None
            if self.added_cond_kwargs is None
            else {k: take_rows(v, rows, batch_size) for k, v in self.added_cond_kwargs.items()},
            {k: pick(k, v) for k, v in self.extra.items()},
        )


def take_rows(value, rows: torch.Tensor | None, batch_size: int):
    """``value[rows]`` for a tensor (or a tuple of tensors) with ``batch_size`` rows; anything
    else, and every value when ``rows`` is None, unchanged."""
    if rows is None:
        return value
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch_size) for v in value)
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[rows.to(value.device)]
    return value


def union_rows(wanted, batch_size: int) -> torch.Tensor | None:
    """The rows any of ``wanted`` (each a row tensor or None) needs: None if one needs every row
    or together they cover the batch, else the sorted union."""
    wanted = list(wanted)
    if not wanted or any(rows is None for rows in wanted):
        return None
    union = wanted[0] if len(wanted) == 1 else torch.unique(torch.cat(wanted), sorted=True)
    return None if union.numel() >= batch_size else union


@dataclass
class Prediction:
    """The controlled prediction and, when asked for, the main network's prior prediction.

    ``prior`` holds the batch rows ``prior_rows`` in that order (None: every row); read it
    through :meth:`prior_at`.
    """

    output: torch.Tensor
    prior: torch.Tensor | None = None
    prior_rows: torch.Tensor | None = None

    def prior_at(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The prior of the batch rows ``rows`` (None: every row)."""
        if self.prior is None:
            raise RuntimeError("no prior prediction: call the branch with with_prior=True.")
        if rows is self.prior_rows:
            return self.prior
        if self.prior_rows is None:
            return self.prior if rows is None else self.prior[rows.to(self.prior.device)]
        if rows is None:
            raise RuntimeError(
                f"the prior was computed for {self.prior_rows.numel()} of the batch's rows "
                "only, but every row was asked for."
            )
        if rows.numel() == 0:
            return self.prior[:0]
        have = self.prior_rows.to(rows.device)
        at = torch.searchsorted(have, rows).clamp_max(max(have.numel() - 1, 0))
        if have.numel() == 0 or not torch.equal(have[at], rows):
            raise RuntimeError(
                "the prior was not computed for every row asked for: give the branch the union "
                "of the rows (core.branch.union_rows)."
            )
        return self.prior[at.to(self.prior.device)]


class DualBranch(nn.Module):
    """Frozen ``main_network`` + trainable ``side_network``.

    ``forward(..., with_prior=True)`` also returns the main network's prediction without the side
    network's residuals, computed without gradient; a family may share work between the two.
    ``forward(..., with_prior=True, prior_rows=rows)`` computes that prior for the batch rows
    ``rows`` only and returns it with ``Prediction.prior_rows = rows``.
    """

    # The stock diffusers class of the side network, for loading saved weights.
    side_network_class: ClassVar[type[nn.Module]]
    # True where the side network encodes the condition image itself (UNet ControlNet, T2I-
    # Adapter), so its constructor needs the condition's channels and its size relative to the
    # sample; False where the condition comes in the sample's shape (SD3, Flux).
    condition_at_pixel_level: ClassVar[bool] = False

    def __init__(self, main_network: nn.Module, side_network: nn.Module):
        super().__init__()
        self.main_network = main_network
        self.side_network = side_network
        self.main_network.requires_grad_(False)
        self.main_network.eval()

    def train(self, mode: bool = True):
        # The main network stays in eval mode: it is a fixed prior, dropout and norm statistics
        # must not drift while the side network trains.
        super().train(mode)
        self.main_network.eval()
        return self

    @classmethod
    def for_training(
        cls, main_network, side_network=None, condition_channels: int = 3, condition_downscale=1
    ) -> DualBranch:
        """The branch the trainer builds: ``side_network`` loaded, or ``None`` for a new one."""
        if cls.condition_at_pixel_level:
            return cls.from_main(
                main_network,
                side_network,
                conditioning_channels=condition_channels,
                condition_downscale=condition_downscale,
            )
        return cls.from_main(main_network, side_network)

    # Names in ``Context.extra`` that have no batch dimension (Flux's position ids), which
    # ``Context.select`` must not index even when their length equals the batch size.
    unbatched_context: ClassVar[tuple[str, ...]] = ()

    def forward(
        self,
        x_t,
        timesteps,
        context: Context,
        condition,
        with_prior: bool = False,
        prior_rows: torch.Tensor | None = None,
    ):
        raise NotImplementedError

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prior_on_rows(self, x_t, timesteps, context: Context, rows, output) -> torch.Tensor:
        """:meth:`prior` for the batch rows ``rows`` (None: every row), the main network run on
        those rows alone; ``output`` (the controlled prediction) gives the shape of an empty
        prior when ``rows`` is empty."""
        if rows is None:
            return self.prior(x_t, timesteps, context)
        if rows.numel() == 0:
            return output.detach().new_empty((0, *output.shape[1:]))
        batch = x_t.shape[0]
        return self.prior(
            take_rows(x_t, rows, batch),
            take_rows(timesteps, rows, batch),
            context.select(rows, batch, self.unbatched_context),
        )

    def layer_names(self) -> list[str]:
        return zero_projection_names(self.side_network)

    def default_lisa_layer(self) -> str:
        """The side-network layer LISA reads when none is named."""
        return default_layer(self.side_network)

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> nn.Module:
        """LISA's decoder from the feature at ``layer`` to this family's prediction space, for a
        sample ``sample_size`` wide (default the main network's)."""
        raise ConfigError(
            f"no LISA decoder recipe for {type(self).__name__}; build "
            "LikelihoodScoreAlignment(side_network, layer=..., decoder=...) yourself."
        )

    def save_side_network(self, path: str | Path) -> None:
        """Save the side network alone as a plain diffusers folder (safetensors)."""
        self.side_network.save_pretrained(str(path), safe_serialization=True)


def prediction_without_residuals(output, with_prior: bool, prior_rows=None) -> Prediction:
    """The prediction of a main network run without residuals (no side network acting): the
    output is its own prior, which ``with_prior`` returns for the batch rows ``prior_rows``
    (None: every row)."""
    if not with_prior:
        return Prediction(output=output)
    prior = take_rows(output.detach(), prior_rows, output.shape[0])
    return Prediction(output=output, prior=prior, prior_rows=prior_rows)


class ResidualBranch(DualBranch):
    """A dual branch whose side network returns residuals that the main network takes in one
    call, so that

        forward(x_t, t, c, cond) = main_with(x_t, t, c, residuals(x_t, t, c, cond))
        prior(x_t, t, c)         = main_prediction(x_t, t, c, None)

    A family implements ``residuals`` (checking its inputs) and ``main_prediction``; the prior
    on a subset of rows, the composition of several side networks (``main_with`` with summed
    residuals) and the no-residual case come from here.
    """

    def residuals(self, x_t, timesteps, context: Context, condition, scale=1.0):
        """The side network's residuals for ``condition``, times ``scale``."""
        raise NotImplementedError

    def main_prediction(self, x_t, timesteps, context: Context, residuals) -> torch.Tensor:
        """The main network's prediction with ``residuals`` added (None: without any)."""
        raise NotImplementedError

    def forward(
        self,
        x_t,
        timesteps,
        context: Context,
        condition,
        with_prior: bool = False,
        conditioning_scale: float = 1.0,
        prior_rows: torch.Tensor | None = None,
    ) -> Prediction:
        residuals = self.residuals(x_t, timesteps, context, condition, conditioning_scale)
        return self.main_with(x_t, timesteps, context, residuals, with_prior, prior_rows)

    def main_with(
        self, x_t, timesteps, context: Context, residuals, with_prior=False, prior_rows=None
    ) -> Prediction:
        """The main network with ``residuals`` (None: without any), and the prior of the batch
        rows ``prior_rows`` (None: every row) when asked."""
        output = self.main_prediction(x_t, timesteps, context, residuals)
        if residuals is None:
            return prediction_without_residuals(output, with_prior, prior_rows)
        if not with_prior:
            return Prediction(output=output)
        prior = self.prior_on_rows(x_t, timesteps, context, prior_rows, output)
        return Prediction(output=output, prior=prior, prior_rows=prior_rows)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        return self.main_prediction(x_t, timesteps, context, None)
