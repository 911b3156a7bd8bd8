"""Naming and capturing intermediate features of a network.

Regularizers that read a network's own activations (LISA reads the side network, LayerSync any
network) need two things: a stable name for "the layer" and a way to catch its tensor during the
ordinary forward pass, without a second pass and without editing the model's code.

Names follow the LISA authors where a ControlNet-style side network has zero projections:

* ``down_k``   the input of ``controlnet_down_blocks[k]`` (UNet ControlNets),
* ``mid``      the input of ``controlnet_mid_block``,
* ``block_k``  the input of ``controlnet_blocks[k]`` (SD3 / Flux transformer ControlNets),
* ``single_k`` the input of ``controlnet_single_blocks[k]`` (Flux),

and any dotted module path (``down_blocks.1.resnets.0``) is accepted as well; for a path the
captured tensor is the module's *output*, for an alias the zero projection's *input*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

_ALIAS_CONTAINERS = {
    "down": "controlnet_down_blocks",
    "block": "controlnet_blocks",
    "single": "controlnet_single_blocks",
}


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: the module to hook and whether its input (True) or output is read."""

    name: str
    module: nn.Module
    reads_input: bool


def zero_projection_names(network: nn.Module) -> list[str]:
    """The authors' names for every zero projection ``network`` has, in forward order."""
    names = []
    for prefix, attr in _ALIAS_CONTAINERS.items():
        container = getattr(network, attr, None)
        if isinstance(container, nn.ModuleList):
            names.extend(f"{prefix}_{k}" for k in range(len(container)))
    if isinstance(getattr(network, "controlnet_mid_block", None), nn.Module):
        names.append("mid")
    return names


def resolve_layer(network: nn.Module, layer: str) -> LayerRef:
    """Find ``layer`` in ``network`` by alias or module path, or fail listing the valid names."""
    if not isinstance(layer, str) or not layer:
        raise ConfigError(f"layer must be a non-empty string, got {layer!r}.")
    if layer == "mid" and isinstance(getattr(network, "controlnet_mid_block", None), nn.Module):
        return LayerRef(layer, network.controlnet_mid_block, reads_input=True)
    match = re.fullmatch(r"(down|block|single)_(\d+)", layer)
    if match:
        container = getattr(network, _ALIAS_CONTAINERS[match.group(1)], None)
        index = int(match.group(2))
        if isinstance(container, nn.ModuleList) and index < len(container):
            return LayerRef(layer, container[index], reads_input=True)
    else:
        try:
            module = network.get_submodule(layer)
        except AttributeError:
            module = None
        if module is not None and module is not network:
            return LayerRef(layer, module, reads_input=False)
    valid = zero_projection_names(network)
    raise ConfigError(
        f"unknown layer {layer!r} for {type(network).__name__}. "
        f"Valid names: {', '.join(valid) if valid else '(no zero projections)'}, "
        "or any module path such as 'down_blocks.1' (see network.named_modules())."
    )


def default_layer(network: nn.Module) -> str:
    """The authors' recipe: ``down_5`` where it exists, else the middle zero projection."""
    names = zero_projection_names(network)
    if "down_5" in names:
        return "down_5"
    if not names:
        raise ConfigError(
            f"{type(network).__name__} has no zero projections; name a layer by module path."
        )
    blocks = [n for n in names if n.startswith("block_")]
    pool = blocks or names
    return pool[len(pool) // 2]


class FeatureHook:
    """Keeps the latest tensor that flows through one layer during a forward pass.

    The tensor is kept with its autograd history, so a loss on it trains everything upstream of
    the layer and nothing downstream. ``pop()`` hands it over and forgets it, so a stale feature
    from an earlier step can never be used by mistake.
    """

    def __init__(self, ref: LayerRef):
        self.ref = ref
        self._feature: torch.Tensor | None = None
        if ref.reads_input:
            self._handle = ref.module.register_forward_pre_hook(self._keep_input)
        else:
            self._handle = ref.module.register_forward_hook(self._keep_output)

    def _keep_input(self, module, args):
        self._feature = args[0]

    def _keep_output(self, module, args, output):
        self._feature = output[0] if isinstance(output, (tuple, list)) else output

    def pop(self) -> torch.Tensor:
        if self._feature is None:
            raise RuntimeError(
                f"no feature was captured at layer {self.ref.name!r}: run the network's forward "
                "pass (with gradients enabled) before computing the regularizer loss."
            )
        feature, self._feature = self._feature, None
        return feature

    def clear(self) -> None:
        self._feature = None

    def remove(self) -> None:
        self._handle.remove()
        self._feature = None
