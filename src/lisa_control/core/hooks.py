"""Naming, finding and capturing the parts of a network.

Regularizers that read a network's own activations (LISA reads the side network, LayerSync any
network) need a stable name for "the layer" and a way to catch its tensor during the ordinary
forward pass, without a second pass and without editing the model's code; ``torch.compile`` per
block needs the list of heavy blocks. What those are depends on the network's class, so each model
family registers a :class:`NetworkLayout` for the classes it brings
(:func:`register_layout`); this module only looks them up.

Layer names follow the LISA authors where a ControlNet-style side network has zero projections:
an *alias* ``<prefix>_k`` is the input of the k-th projection of a registered list (``down_5``:
``controlnet_down_blocks[5]``), a *single* alias (``mid``) the input of one registered
projection. Any dotted module path (``down_blocks.1.resnets.0``) is accepted as well; for a path
the captured tensor is the module's *output*, for an alias the zero projection's *input*.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class NetworkLayout:
    """What code outside a model family needs to know about one network class.

    Attributes:
        projection_lists: alias prefix -> attribute holding a ``ModuleList`` of zero projections
            (``{"down": "controlnet_down_blocks"}``), in forward order.
        single_projections: alias -> attribute of a single zero projection (``{"mid": ...}``).
        default_layer: ``network -> alias``, the layer LISA reads when none is named.
        blocks: ``network -> [(layer name, output width or None)]``, the top-level blocks in the
            order they run (LayerSync's default pairs and its error messages).
        heavy_blocks: attributes of the block lists and single blocks worth compiling.
        feature_shape: ``(network, layer ref, sample_size) -> (channels, spatial size)`` of the
            tensor a zero projection reads, from the config alone (sizes LISA's decoder).
    """

    projection_lists: dict[str, str] = field(default_factory=dict)
    single_projections: dict[str, str] = field(default_factory=dict)
    default_layer: Callable[[nn.Module], str] | None = None
    blocks: Callable[[nn.Module], list[tuple[str, int | None]]] | None = None
    heavy_blocks: tuple[str, ...] = ()
    feature_shape: Callable[[nn.Module, LayerRef, int], tuple[int, int]] | None = None


_LAYOUTS: dict[type, NetworkLayout] = {}


def register_layout(network_class: type, layout: NetworkLayout) -> None:
    """Declare the layout of ``network_class`` (and of its subclasses)."""
    _LAYOUTS[network_class] = layout


def layout_of(network: nn.Module) -> NetworkLayout:
    """The registered layout of ``network``'s class or nearest base class; an empty layout for
    unregistered modules (only module paths then name their layers)."""
    for cls in type(network).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    return NetworkLayout()


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: the module to hook and whether its input (True) or output is read."""

    name: str
    module: nn.Module
    reads_input: bool


def zero_projection_names(network: nn.Module) -> list[str]:
    """The authors' names for every zero projection ``network`` has, in forward order."""
    layout = layout_of(network)
    names = []
    for prefix, attr in layout.projection_lists.items():
        container = getattr(network, attr, None)
        if isinstance(container, nn.ModuleList):
            names.extend(f"{prefix}_{k}" for k in range(len(container)))
    for alias, attr in layout.single_projections.items():
        if isinstance(getattr(network, attr, None), nn.Module):
            names.append(alias)
    return names


def _alias_module(network: nn.Module, layer: str) -> nn.Module | None:
    layout = layout_of(network)
    if layer in layout.single_projections:
        module = getattr(network, layout.single_projections[layer], None)
        return module if isinstance(module, nn.Module) else None
    match = re.fullmatch(r"([a-z]+)_(\d+)", layer)
    if match and match.group(1) in layout.projection_lists:
        container = getattr(network, layout.projection_lists[match.group(1)], None)
        index = int(match.group(2))
        if isinstance(container, nn.ModuleList) and index < len(container):
            return container[index]
    return None


def resolve_layer(network: nn.Module, layer: str) -> LayerRef:
    """Find ``layer`` in ``network`` by alias or module path, or fail listing the valid names."""
    if not isinstance(layer, str) or not layer:
        raise ConfigError(f"layer must be a non-empty string, got {layer!r}.")
    module = _alias_module(network, layer)
    if module is not None:
        return LayerRef(layer, module, reads_input=True)
    if "." in layer or not re.fullmatch(r"[a-z]+_\d+|mid", layer):
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
    """The layer LISA reads when none is named: the family's choice for this class (the
    authors' ``down_5`` for UNet ControlNets), else the middle zero projection."""
    layout = layout_of(network)
    if layout.default_layer is not None:
        return layout.default_layer(network)
    names = zero_projection_names(network)
    if not names:
        raise ConfigError(
            f"{type(network).__name__} has no zero projections; name a layer by module path."
        )
    return names[len(names) // 2]


def heavy_blocks(network: nn.Module) -> list[nn.Module]:
    """The blocks of ``network`` that carry its compute, from its registered layout."""
    blocks = []
    for name in layout_of(network).heavy_blocks:
        part = getattr(network, name, None)
        if isinstance(part, nn.ModuleList):
            blocks.extend(part)
        elif isinstance(part, nn.Module):
            blocks.append(part)
    return blocks


def blocks_in_forward_order(network: nn.Module) -> list[tuple[str, int | None]]:
    """(layer name, output width) of the network's top-level blocks in the order they run; a
    plain ``blocks`` list (a SiT-style stack of one width) for unregistered modules."""
    layout = layout_of(network)
    if layout.blocks is not None:
        return layout.blocks(network)
    stack = getattr(network, "blocks", None)
    if isinstance(stack, nn.ModuleList):
        return [(f"blocks.{k}", None) for k in range(len(stack))]
    return []


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
