"""The dual-branch interface: a frozen main network plus a trainable side network.

The trainer, the regularizers and the benchmarks talk only to :class:`DualBranch`; each model
family (UNet ControlNet, SD3, Flux, T2I-Adapter, ...) is one file implementing it.
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


@dataclass
class Prediction:
    """The controlled prediction and, when asked for, the main network's prior prediction."""

    output: torch.Tensor
    prior: torch.Tensor | None = None


class DualBranch(nn.Module):
    """Frozen ``main_network`` + trainable ``side_network``.

    ``forward(..., with_prior=True)`` also returns the main network's prediction without the side
    network's residuals, computed without gradient; a family may share work between the two.
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

    def forward(self, x_t, timesteps, context: Context, condition, with_prior: bool = False):
        raise NotImplementedError

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        raise NotImplementedError

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
