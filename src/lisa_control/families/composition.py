"""Several side networks on one frozen main network: their residuals summed, the main network run
once, as diffusers' multi-network pipelines do.

A :class:`ComposedBranch` holds one main network and N side networks of one kind (N branches of
the same family class, all built on that main network, so each was checked against it by the
family's own ``check_side_fits_main``). Per call it asks every branch for its residuals,

    r_i = branch_i.residuals(x_t, t, context, condition_i, scale_i)      (already times scale_i)

adds them in network order, ``r = r_1 + r_2 + ... + r_N``, and runs the main network once with
``r`` (``branch_1.main_with``). That is exactly what diffusers' ``MultiControlNetModel`` (UNet),
``SD3MultiControlNetModel``, ``FluxMultiControlNetModel`` and ``MultiAdapter`` (T2I-Adapter, its
``adapter_weights`` are the scales) compute, and what their pipelines feed the main network.

Scales and guidance windows
---------------------------
Each network has a ``conditioning_scale`` and a window ``[control_guidance_start,
control_guidance_end)`` given as fractions of the sampling run. At step i of n (the sampler passes
``step_index`` and ``num_steps``) network k takes part with

    keep_k = 1 - [i / n < start_k  or  (i + 1) / n > end_k]
    scale_k = conditioning_scale_k * keep_k

diffusers' ``controlnet_keep`` in ``StableDiffusionControlNetPipeline`` and its SD3 and Flux
siblings. (diffusers' T2I-Adapter pipeline for SD has no window; the rule is applied to adapters
all the same.) Without ``step_index`` (training, a single prediction) every network takes part. A
network whose scale is 0 at a step is not run: its residuals would be zeros, and adding zeros
leaves the sum unchanged, so skipping it gives the same numbers for less work; when no network
takes part the main network runs alone.

Training several side networks at once, and LISA on each
-------------------------------------------------------
In training the step calls this branch like any other: every side network gets gradient through
the one summed prediction. LISA is built once per side network (``side_branches``; see
``regularizers.per_network``), each decoder reading its own network's feature, and each regresses
the *same* target as single-network LISA, the full residual y_target - y_prior. That is each
network's own share of the likelihood score, in expectation: the decoder of network i sees only
features of (x_t, t, c_i), and under a squared loss a function of those regresses the conditional
mean of its target,

    E[y_target - y_prior | x_t, c_i] = E[y | x_t, c_i] - y_prior(x_t)   ~   grad log p(c_i | x_t),

the rescaled likelihood score of condition i alone; the other conditions' part of the target is
noise the decoder cannot predict from c_i (as the noise itself is for single-network LISA). When
the conditions are independent given x_t, grad log p(c_1..c_N | x_t) = sum_i grad log p(c_i | x_t),
so the decoders' targets add up to the joint residual the summed residuals must produce, and a
network trained this way carries the score that a separately trained LISA network would. The
alternative, y(all) - y(all but i) for each i, is the network's current marginal effect in the
model (a prediction, not a target) and costs N more main-network passes per step. With LISA on
part of the batch (``batch_fraction``, ``subset``) every network's copy reads the same rows, the
ones the first copy chooses, and the prior is computed once, for those rows (``prior_rows``).

Saving
------
:meth:`ComposedBranch.save_side_network` writes each side network as a plain diffusers folder,
``path/<name>/``; :class:`SideNetworks` (the ``side_network`` attribute) holds them under their
names, so a checkpoint's state dict is ``<name>.<parameter>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.branch import Context, DualBranch, Prediction
from ..core.errors import ConfigError, ModelError

# Names become module keys and folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_names(names: Sequence[str]) -> list[str]:
    """Side-network names: unique, letters, digits, ``_`` and ``-`` (they name folders)."""
    names = [str(n) for n in names]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ConfigError(
            f"side-network names must be letters, digits, '_' or '-' (they name folders), got "
            f"{', '.join(map(repr, bad))}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"side-network names must differ, got {', '.join(names)}.")
    return names


def per_network(value, count: int, what: str) -> list[float]:
    """One number per network: a single number is every network's (as diffusers broadcasts a
    float), a list must have one entry per network."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * count
    values = list(value)
    if len(values) == 1:
        return [float(values[0])] * count
    if len(values) != count:
        raise ConfigError(
            f"{what} has {len(values)} values for {count} side networks; give one, or one per "
            "network in the networks' order."
        )
    return [float(v) for v in values]


def check_windows(starts: list[float], ends: list[float]) -> None:
    """diffusers' rules: 0 <= start < end <= 1 for every network."""
    for k, (start, end) in enumerate(zip(starts, ends)):
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(
                f"side network {k}: control_guidance_start {start} and control_guidance_end {end} "
                "must satisfy 0 <= start < end <= 1."
            )


def keep(step_index: int, num_steps: int, start: float, end: float) -> float:
    """1.0 when a network with window [start, end) acts at step ``step_index`` of ``num_steps``,
    else 0.0: diffusers' ``controlnet_keep``."""
    return 1.0 - float(step_index / num_steps < start or (step_index + 1) / num_steps > end)


def add_residuals(total, more, names=("", "")):
    """``total + more`` for residual structures (a tensor, or lists/tuples of them, or None),
    element by element; refuses structures that differ (diffusers would zip them silently)."""
    if total is None or more is None:
        if total is None and more is None:
            return None
        raise ModelError(
            f"side networks {names[0]} and {names[1]} give different residual layouts (one has "
            "residuals where the other has none); compose networks of one architecture."
        )
    if torch.is_tensor(total):
        if not torch.is_tensor(more) or more.shape != total.shape:
            shape = tuple(more.shape) if torch.is_tensor(more) else type(more).__name__
            raise ModelError(
                f"side networks {names[0]} and {names[1]} give residuals of different shapes "
                f"({tuple(total.shape)} and {shape}); compose networks of one architecture."
            )
        return total + more
    if len(total) != len(more):
        raise ModelError(
            f"side networks {names[0]} and {names[1]} give {len(total)} and {len(more)} "
            "residuals; compose networks of one depth (the same num_layers)."
        )
    summed = [add_residuals(a, b, names) for a, b in zip(total, more)]
    return tuple(summed) if isinstance(total, tuple) else summed


def check_composable(branch_class: type) -> None:
    """Refuse a branch class without ``residuals`` and ``main_with`` (the video family's
    branches: video side networks are not composed)."""
    missing = [m for m in ("residuals", "main_with") if not hasattr(branch_class, m)]
    if missing:
        raise ModelError(
            f"{branch_class.__name__} side networks cannot be composed (the branch has no "
            f"{' or '.join(missing)}); composition takes image side networks (UNet ControlNet, "
            "SD3, Flux, T2I-Adapter), and video side networks run one at a time."
        )


class SideNetworks(nn.ModuleDict):
    """The side networks of a :class:`ComposedBranch` by name, saved one folder each."""

    def save_pretrained(self, path, safe_serialization: bool = True, **kwargs) -> None:
        for name, network in self.items():
            network.save_pretrained(str(Path(path) / name), safe_serialization=safe_serialization)

    def enable_gradient_checkpointing(self) -> None:
        for network in self.values():
            network.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ComposedBranch(DualBranch):
    """One frozen main network and N side networks of one kind, their residuals summed.

    Args:
        branches: the family branches, all of one class and on one main network object, as a
            mapping name -> branch or a sequence (named ``0``, ``1``, ...). Their order is the
            networks' order (conditions, scales and windows follow it).
        conditioning_scale: one number for all networks or one per network.
        control_guidance_start / control_guidance_end: the windows (fractions of the sampling
            run, see the module docstring), one number or one per network.

    ``forward(x_t, t, context, conditions)`` takes the conditions as a sequence in network order
    or a mapping name -> condition, each as its branch takes it; ``with_prior=True`` (with
    ``prior_rows``: for those batch rows only) adds the main network's prior, computed once.
    Video side networks are refused (their branches have no ``residuals``/``main_with``).
    """

    def __init__(
        self,
        branches: Mapping[str, DualBranch] | Sequence[DualBranch],
        conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
    ):
        if isinstance(branches, Mapping):
            names, branches = list(branches), list(branches.values())
        else:
            branches = list(branches)
            names = [str(k) for k in range(len(branches))]
        if not branches:
            raise ConfigError("a composition needs at least one side network.")
        names = check_names(names)
        first = branches[0]
        check_composable(type(first))
        for name, branch in zip(names, branches):
            if type(branch) is not type(first):
                raise ModelError(
                    f"side network {name!r} is a {type(branch).__name__} but {names[0]!r} a "
                    f"{type(first).__name__}; compose side networks of one family and kind."
                )
            if branch.main_network is not first.main_network:
                raise ModelError(
                    f"side network {name!r} is paired with another main network object than "
                    f"{names[0]!r}; build every branch on the one main network."
                )
        super().__init__(
            first.main_network,
            SideNetworks({n: b.side_network for n, b in zip(names, branches)}),
        )
        # A plain list: the branches' modules are registered once, through main_network and
        # side_network.
        self._branches = branches
        self.unbatched_context = first.unbatched_context
        self.names = names
        n = len(branches)
        self.conditioning_scale = per_network(conditioning_scale, n, "conditioning_scale")
        self.control_guidance_start = per_network(
            control_guidance_start, n, "control_guidance_start"
        )
        self.control_guidance_end = per_network(control_guidance_end, n, "control_guidance_end")
        check_windows(self.control_guidance_start, self.control_guidance_end)

    @classmethod
    def from_side_networks(
        cls,
        branch_class: type[DualBranch],
        main_network: nn.Module,
        side_networks: Mapping[str, nn.Module] | Sequence[nn.Module],
        **settings,
    ) -> ComposedBranch:
        """Pair each side network with ``main_network`` through ``branch_class`` (which checks
        that it fits), then compose; ``settings`` are the constructor's."""
        if isinstance(side_networks, Mapping):
            items = list(side_networks.items())
        else:
            items = [(str(k), net) for k, net in enumerate(side_networks)]
        check_composable(branch_class)
        expected = branch_class.side_network_class
        for name, network in items:
            if not isinstance(network, expected):
                raise ModelError(
                    f"side network {name!r} is a {type(network).__name__}, not the "
                    f"{expected.__name__} that {branch_class.__name__} takes; compose side "
                    "networks of one kind."
                )
        return cls({name: branch_class(main_network, net) for name, net in items}, **settings)

    # ------------------------------------------------------------------ structure

    @property
    def side_branches(self) -> dict[str, DualBranch]:
        """name -> the family branch of that side network (regularizers are built per entry)."""
        return dict(zip(self.names, self._branches))

    @property
    def condition_at_pixel_level(self) -> bool:  # type: ignore[override]
        return self._branches[0].condition_at_pixel_level

    @property
    def condition_channels(self) -> list[int]:
        return [b.condition_channels for b in self._branches]

    def conditions_in_order(self, condition) -> list:
        """The conditions as a list in network order, from a sequence or a name mapping."""
        if torch.is_tensor(condition):
            raise ConfigError(
                f"{len(self.names)} side networks ({', '.join(self.names)}) need one condition "
                "each: pass a list in their order or a mapping name -> condition, not one tensor."
            )
        if isinstance(condition, Mapping):
            missing = [n for n in self.names if n not in condition]
            extra = [k for k in condition if k not in self.names]
            if missing or extra:
                raise ConfigError(
                    f"the conditions are named {', '.join(map(str, condition))} but the side "
                    f"networks {', '.join(self.names)}; give one condition per network."
                )
            return [condition[n] for n in self.names]
        condition = list(condition)
        if len(condition) != len(self.names):
            raise ConfigError(
                f"got {len(condition)} condition(s) for {len(self.names)} side networks "
                f"({', '.join(self.names)}); give one per network, in their order."
            )
        return condition

    def scales_at(self, step_index=None, num_steps=None, conditioning_scale=None) -> list[float]:
        """Each network's scale at step ``step_index`` of ``num_steps`` (all windows open when
        no step is given); ``conditioning_scale`` replaces the networks' own scales."""
        scales = self.conditioning_scale
        if conditioning_scale is not None:
            scales = per_network(conditioning_scale, len(self.names), "conditioning_scale")
        if step_index is None:
            return list(scales)
        if num_steps is None or num_steps < 1:
            raise ConfigError("step_index needs num_steps >= 1, the length of the sampling run.")
        return [
            scale * keep(step_index, num_steps, start, end)
            for scale, start, end in zip(
                scales, self.control_guidance_start, self.control_guidance_end
            )
        ]

    # ------------------------------------------------------------------ prediction

    def forward(
        self,
        x_t,
        timesteps,
        context: Context,
        condition,
        with_prior: bool = False,
        conditioning_scale=None,
        step_index: int | None = None,
        num_steps: int | None = None,
        prior_rows: torch.Tensor | None = None,
    ) -> Prediction:
        conditions = self.conditions_in_order(condition)
        scales = self.scales_at(step_index, num_steps, conditioning_scale)
        total, first = None, None
        for name, branch, cond, scale in zip(self.names, self._branches, conditions, scales):
            if scale == 0.0:
                continue  # zeros would leave the sum as it is
            residuals = branch.residuals(x_t, timesteps, context, cond, scale)
            if first is None:
                total, first = residuals, name
            else:
                total = add_residuals(total, residuals, (first, name))
        return self._branches[0].main_with(
            x_t, timesteps, context, total, with_prior=with_prior, prior_rows=prior_rows
        )

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        return self._branches[0].prior(x_t, timesteps, context)

    # ------------------------------------------------------------------ training helpers

    def layer_names(self) -> list[str]:
        return self._branches[0].layer_names()

    def default_lisa_layer(self) -> str:
        return self._branches[0].default_lisa_layer()

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> nn.Module:
        raise ConfigError(
            "a composed branch has one LISA decoder per side network: build LISA for each entry "
            "of side_branches (build_regularizers does)."
        )

    def save_side_network(self, path: str | Path) -> None:
        """Each side network as a plain diffusers folder, ``path/<name>/``."""
        self.side_network.save_pretrained(path, safe_serialization=True)
