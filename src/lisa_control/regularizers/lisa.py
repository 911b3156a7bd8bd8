"""LISA: Likelihood Score Alignment.

The main network alone predicts the prior y_prior(x_t, t); with the side network's residuals it
predicts y(x_t, t, c). Their difference is a rescaled likelihood score grad log p(c | x_t) (see
``objectives``). LISA asks the side network to carry that score explicitly: a light decoder D
reads the side network's feature h at one layer and is trained, with the side network, on

    L_LISA = lambda * || D(h, t) - stopgrad(y_target - y_prior) ||^2        (mean over elements)

where y_target is the ordinary training target (noise, v or velocity). The target uses the
ground-truth y_target rather than the controlled prediction, so it is the residual the side
network *should* supply, available from step one. The decoder is dropped after training.

On part of the batch
--------------------
The prior is the expensive part of L_LISA: the main network once more, without gradient (its up
path alone with the UNet's shared encoder). The loss is a mean over the batch's rows i of a
per-sample term l_i, so a subset S of k rows estimates it:

    L_S = (1 / k) sum_{i in S} l_i,      E[L_S] = (1 / B) sum_i l_i   for S uniform of size k,

and the prior and the decoder then run on those k rows only. ``subset="random"`` draws S
uniformly (from the global torch RNG, which checkpoints save, or the step's generator);
``"first"`` takes rows 0..k-1, the same estimate when the batch order is random, as the
trainer's is. k = ceil(f B) for ``batch_fraction`` f. ``"timestep"`` takes the rows whose t lies
in ``timestep_range``, where the decoder explains most of the target; it computes exactly the
loss of ``timestep_range`` alone (a mean over the in-range rows) without a prior for the other
rows, and with f < 1 keeps the first ceil(f B) of them (a uniform subset of the in-range rows
when the batch order is random), so the prior never costs more than f of a full one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .decoders import ScoreDecoder
from ..core.branch import take_rows
from ..core.errors import ConfigError
from ..core.hooks import FeatureHook, default_layer, resolve_layer
from .base import Regularizer, RegularizerOutput, StepState

# Spaces the LISA residual can be matched in; all but "residual" name an Objective method.
TARGETS = ("residual", "x0", "score")
# How the rows that get a prior are chosen (see "On part of the batch" above).
SUBSETS = ("first", "random", "timestep")


def _check_batch_fraction(value) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise ConfigError(f"LISA batch fraction must be a number in (0, 1], got {value!r}.")


def subset_size(fraction: float, batch_size: int) -> int:
    """ceil(fraction * batch_size), at least 1 and at most the batch; products that miss an
    integer by a rounding error (0.3 * 10) count as that integer."""
    return min(batch_size, max(1, math.ceil(round(fraction * batch_size, 6))))


def _check_weight(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"LISA {name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"LISA {name} must be a finite number >= 0, got {value!r}.")


class LikelihoodScoreAlignment(Regularizer):
    """The LISA regularizer. Its parameters are exactly the :class:`ScoreDecoder`'s.

    Args:
        side_network: the trainable side network (a diffusers ``ControlNetModel`` or any module).
        layer: ``down_k`` / ``mid`` (input of that zero conv) or a module path; default
            ``down_5`` when the network has it.
        out_channels: channels of the main network's prediction (4 for SD latents).
        sample_size: spatial size of the prediction (64 for SD2.1-base at 512 px).
        weight: lambda, 0.2 in the paper.
        distance: ``mse`` (the paper) or ``cosine`` (1 - per-pixel cosine over channels).
        timestep_range: apply the loss only to samples with lo <= t < hi.
        target: the space the residual is matched in. ``residual`` (the paper):
            y_target - y_prior in the prediction space; ``x0``: the same residual mapped to the
            clean sample, x0(y_target) - x0(y_prior) (for eps: -(sigma/alpha)(eps - eps_prior),
            so it weights noisy timesteps up); ``score``: score(y_target) - score(y_prior), the
            likelihood score itself (for eps: -(eps - eps_prior)/sigma, weighting clean
            timesteps up). The objective supplies the maps.
        final_weight / weight_decay_steps: a schedule for lambda, linear from ``weight`` at step
            0 to ``final_weight`` at ``weight_decay_steps`` and constant after ("large early,
            decaying"); by default lambda stays ``weight``.
        feature_channels / feature_size: needed only for a module-path layer whose shape cannot
            be read from the config.
        decoder: a ready decoder ``decoder(feature, timesteps) -> prediction-shaped tensor``
            (token decoders for transformer side networks); by default a :class:`ScoreDecoder`
            sized from a UNet ControlNet's config.
        optimizer_check_after: raise if the decoder holds gradients but was not updated for this
            many consecutive steps (the optimizer was not given its parameters).
        batch_fraction: f in (0, 1]: compute the prior, the decoder and the loss on ceil(f B)
            rows of each batch (see the module docstring); 1, the default, uses every row.
        subset: which rows: ``first`` (default), ``random`` or ``timestep`` (the rows in
            ``timestep_range``, at most ceil(f B) of them; needs ``timestep_range``).
    """

    name = "lisa"
    needs_prior = True

    def __init__(
        self,
        side_network: nn.Module,
        layer: str | None = None,
        out_channels: int = 4,
        sample_size: int = 64,
        weight: float = 0.2,
        distance: str = "mse",
        timestep_range: tuple[float, float] | None = None,
        target: str = "residual",
        final_weight: float | None = None,
        weight_decay_steps: int = 0,
        feature_channels: int | None = None,
        feature_size: int | None = None,
        decoder: nn.Module | None = None,
        optimizer_check_after: int = 64,
        batch_fraction: float = 1.0,
        subset: str = "first",
    ):
        super().__init__()
        _check_weight("weight", weight)
        _check_batch_fraction(batch_fraction)
        if subset not in SUBSETS:
            raise ConfigError(f"LISA subset must be one of {', '.join(SUBSETS)}, got {subset!r}.")
        if subset == "timestep" and timestep_range is None:
            raise ConfigError(
                "the LISA subset 'timestep' picks the rows in the timestep range: give one "
                "(--lisa_timestep_range LO HI)."
            )
        if final_weight is not None:
            _check_weight("final weight", final_weight)
        if final_weight is not None and (
            not isinstance(weight_decay_steps, int) or weight_decay_steps < 1
        ):
            raise ConfigError(
                "a LISA final weight needs weight_decay_steps >= 1 (--lisa_weight_decay_steps), "
                f"got {weight_decay_steps!r}."
            )
        if target not in TARGETS:
            raise ConfigError(f"LISA target must be one of {', '.join(TARGETS)}, got {target!r}.")
        if distance not in ("mse", "cosine"):
            raise ConfigError(f"LISA distance must be 'mse' or 'cosine', got {distance!r}.")
        layer = layer or default_layer(side_network)
        ref = resolve_layer(side_network, layer)
        self.layer = layer
        self.weight = float(weight)
        self.final_weight = None if final_weight is None else float(final_weight)
        self.weight_decay_steps = weight_decay_steps
        self.target = target
        self.distance = distance
        self.timestep_range = timestep_range
        self.batch_fraction = float(batch_fraction)
        self.subset = subset
        self.decoder = (
            decoder
            if decoder is not None
            else ScoreDecoder.for_layer(
                side_network, ref, out_channels, sample_size, feature_channels, feature_size
            )
        )
        # Held outside the module tree: the side network's weights are not LISA's parameters.
        self._hook = FeatureHook(ref)
        self._optimizer_check_after = optimizer_check_after
        self._stale_steps = 0
        self._last_version = None

    def remove_hooks(self) -> None:
        self._hook.remove()

    def _check_decoder_is_trained(self) -> None:
        """Count training-mode calls since the decoder's weights last changed; an optimizer that
        updates them bumps the tensor's version counter. Evaluation calls (no grad or eval mode)
        do not count, and gradient accumulation shorter than the threshold passes."""
        weight = self.decoder.out.weight
        if not weight.requires_grad or self._optimizer_check_after <= 0:
            return
        if not (torch.is_grad_enabled() and self.training):
            return
        if weight._version == self._last_version:
            self._stale_steps += 1
        else:
            self._stale_steps = 0
        self._last_version = weight._version
        if self._stale_steps >= self._optimizer_check_after:
            raise ConfigError(
                f"the LISA decoder was used in {self._stale_steps} training steps but its "
                "weights never changed: its parameters are not in the optimizer. Use "
                "AdamW([*side_network.parameters(), *lisa.parameters()])."
            )

    def weight_at(self, step: int) -> float:
        """lambda at ``step`` (see ``final_weight``)."""
        if self.final_weight is None:
            return self.weight
        progress = min(max(step, 0) / self.weight_decay_steps, 1.0)
        return self.weight + (self.final_weight - self.weight) * progress

    @property
    def uses_subset(self) -> bool:
        """Whether the loss reads part of the batch (``batch_fraction`` < 1 or the timestep
        subset)."""
        return self.batch_fraction < 1 or self.subset == "timestep"

    def prior_rows(self, noised, generator: torch.Generator | None = None):
        """The rows this step's loss reads (see the module docstring); None: every row."""
        if not self.uses_subset:
            return None
        t = noised.timesteps
        batch = noised.x_t.shape[0]
        device = noised.x_t.device
        k = subset_size(self.batch_fraction, batch)
        if self.subset == "timestep":
            lo, hi = self.timestep_range
            t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
            rows = torch.nonzero((t >= lo) & (t < hi)).flatten().to(device)
            return rows[:k]
        if k >= batch:
            return None
        if self.subset == "first":
            return torch.arange(k, device=device)
        where = generator.device if generator is not None else "cpu"
        rows = torch.randperm(batch, generator=generator, device=where)[:k]
        return rows.sort().values.to(device)

    def aux_target(self, state: StepState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """stopgrad(y_target - y_prior) in the ``target`` space, for the batch rows ``rows``
        (None: every row)."""
        if state.prediction.prior is None:
            raise RuntimeError(
                "LISA needs the prior prediction: call the branch with with_prior=True."
            )
        noised = state.noised
        batch = noised.x_t.shape[0]
        target = take_rows(noised.target, rows, batch).float()
        prior = state.prediction.prior_at(rows).float()
        if self.target != "residual":
            to_space = getattr(state.objective, self.target)  # objective.x0 or objective.score
            x_t, t = take_rows(noised.x_t, rows, batch), take_rows(noised.timesteps, rows, batch)
            target, prior = to_space(target, x_t, t), to_space(prior, x_t, t)
        return (target - prior).detach()

    def loss(self, state: StepState) -> RegularizerOutput:
        self._check_decoder_is_trained()
        feature = self._hook.pop()
        rows = state.rows if state.rows is not None else state.prediction.prior_rows
        timesteps = state.noised.timesteps
        if rows is not None:
            batch = state.noised.x_t.shape[0]
            feature = feature[rows.to(feature.device)]
            timesteps = take_rows(timesteps, rows, batch)
        target = self.aux_target(state, rows)
        decoded = self.decoder(feature, timesteps).float()
        if self.distance == "mse":
            per_sample = (decoded - target).pow(2).flatten(1).mean(1)
        else:
            cosine = F.cosine_similarity(decoded, target, dim=1, eps=1e-6)
            per_sample = (1 - cosine).flatten(1).mean(1)
        if rows is not None and rows.numel() == 0:
            # No row to read: a zero loss that still reaches the decoder and the side network
            # (zero gradients), so that DDP sees every parameter used.
            aux = per_sample.sum()
            target_norm = target.pow(2).sum()
        else:
            target_norm = target.pow(2).mean()
            if self.timestep_range is not None and self.subset != "timestep":
                lo, hi = self.timestep_range
                t = timesteps.float()
                mask = ((t >= lo) & (t < hi)).float()
                aux = (per_sample * mask).sum() / mask.sum().clamp_min(1.0)
            else:
                aux = per_sample.mean()
        logs = {
            "aux_loss": aux.detach(),
            "aux_target_norm": target_norm.detach(),
            "aux_loss_ratio": (aux.detach() / target_norm.detach().clamp_min(1e-12)),
        }
        if self.uses_subset:
            logs["aux_rows"] = aux.new_tensor(per_sample.shape[0])
        weight = self.weight_at(state.step)
        if self.final_weight is not None:
            logs["aux_weight"] = aux.new_tensor(weight)  # on aux's device: logs are all-reduced
        return RegularizerOutput(loss=weight * aux, logs=logs)


def lisa_for_branch(
    branch, layer: str | None = None, weight: float = 0.2, sample_size: int | None = None, **kwargs
) -> LikelihoodScoreAlignment:
    """A :class:`LikelihoodScoreAlignment` for any branch, its decoder sized by the branch's
    family (``branch.lisa_decoder``): a :class:`ScoreDecoder` for feature maps (UNet ControlNets,
    T2I-Adapters), a ``TokenScoreDecoder`` for transformer tokens (SD3, Flux).

    ``layer``: default ``branch.default_lisa_layer()`` (``down_5`` on UNet ControlNets, the middle
    ``block_k`` on transformers, ``adapter.body.1`` on T2I-Adapters). ``sample_size``: the
    training resolution of the (latent) sample; default the main network's. ``feature_channels``
    / ``feature_size`` size the decoder of a module-path layer; other keyword arguments go to
    :class:`LikelihoodScoreAlignment` (``distance``, ``timestep_range``, ...).
    """
    layer = layer or branch.default_lisa_layer()
    shape = {k: kwargs.pop(k) for k in ("feature_channels", "feature_size") if k in kwargs}
    decoder = branch.lisa_decoder(layer, sample_size, **shape)
    return LikelihoodScoreAlignment(
        branch.side_network, layer=layer, weight=weight, decoder=decoder, **kwargs
    )


def lisa_from_settings(branch, sample_size: int, settings) -> LikelihoodScoreAlignment:
    """LISA as ``lisa train`` configures it: the ``lisa_*`` flags."""
    timestep_range = settings.get("lisa_timestep_range")
    return lisa_for_branch(
        branch,
        layer=settings.get("lisa_layer"),
        weight=settings.get("lisa_weight", 0.2),
        sample_size=sample_size,
        distance=settings.get("lisa_distance", "mse"),
        target=settings.get("lisa_target", "residual"),
        final_weight=settings.get("lisa_final_weight"),
        weight_decay_steps=settings.get("lisa_weight_decay_steps", 0),
        timestep_range=tuple(timestep_range) if timestep_range else None,
        batch_fraction=settings.get("lisa_batch_fraction", 1.0),
        subset=settings.get("lisa_subset", "first"),
    )
