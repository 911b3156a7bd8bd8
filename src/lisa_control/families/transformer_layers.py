"""What the SD3 and Flux families share: the zero projections of transformer ControlNets
(SD3's ``controlnet_blocks``, Flux's also ``controlnet_single_blocks``) with their names, widths
and default LISA layer, and their recipe's rule on loss weightings.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError, ModelError



def transformer_block_counts(side_network: nn.Module) -> tuple[int, int]:
    """(number of ``controlnet_blocks``, number of ``controlnet_single_blocks``)."""
    blocks = getattr(side_network, "controlnet_blocks", None) or []
    singles = getattr(side_network, "controlnet_single_blocks", None) or []
    return len(blocks), len(singles)


def middle_block_layer(side_network: nn.Module) -> str:
    """The default LISA layer of a transformer ControlNet: the input of the middle zero projection
    ``block_{n // 2}`` of its n (double) blocks, and ``block_0`` when n is 1 or 2: with two
    blocks ``n // 2`` would be the last block, whose output only feeds its projection, not a
    middle layer. Flux ControlNets without double blocks use the middle single block likewise."""
    blocks, singles = transformer_block_counts(side_network)
    if blocks:
        return "block_0" if blocks <= 2 else f"block_{blocks // 2}"
    if singles:
        return "single_0" if singles <= 2 else f"single_{singles // 2}"
    raise ModelError(f"{type(side_network).__name__} has no controlnet_blocks to hook.")


def token_feature_dim(side_network: nn.Module, layer: str) -> int:
    """Width D of the tokens entering zero projection ``layer`` (``block_k`` / ``single_k``)."""
    blocks, singles = transformer_block_counts(side_network)
    valid = [f"block_{k}" for k in range(blocks)] + [f"single_{k}" for k in range(singles)]
    if layer not in valid:
        raise ConfigError(
            f"LISA on a transformer side network reads the tokens entering a zero projection; "
            f"layer {layer!r} is not one. Valid names: {', '.join(valid)}."
        )
    kind, index = layer.split("_")
    container = (
        side_network.controlnet_blocks if kind == "block" else side_network.controlnet_single_blocks
    )
    return container[int(index)].in_features


def controlnet_block_aliases(side_network: nn.Module) -> list[tuple[str, int | None]]:
    """``block_k`` then ``single_k`` in forward order; every projection reads one width."""
    blocks, singles = transformer_block_counts(side_network)
    return [(f"block_{k}", None) for k in range(blocks)] + [
        (f"single_{k}", None) for k in range(singles)
    ]


def transformer_stack(*attributes: str):
    """A ``blocks`` function for transformers whose block lists are ``attributes``, in order."""

    def blocks(network: nn.Module) -> list[tuple[str, int | None]]:
        return [
            (f"{attr}.{k}", None)
            for attr in attributes
            for k in range(len(getattr(network, attr, None) or []))
        ]

    return blocks


def refuse_weighting(weighting) -> None:
    """Latent SD3, Flux and Wan VACE train with diffusers' own recipes; a second weighting on
    top would change them silently."""
    if weighting is not None:
        raise ConfigError(
            f"--loss_weighting {weighting.name} applies to eps, v and pixel-space flow objectives; "
            "latent SD3, Flux and Wan VACE models train with diffusers' weighting scheme (a plain "
            "velocity loss for Flux and Wan). Drop the flag."
        )
