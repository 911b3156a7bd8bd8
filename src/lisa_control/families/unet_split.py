"""A diffusers ``UNet2DConditionModel`` forward split where ControlNet residuals enter.

A ControlNet changes the main UNet in two places only: its residuals are added to the skip
connections (the outputs of ``conv_in`` and of every down-block layer) and to the mid block's
output. Everything before those additions does not see the residuals:

    encode(x_t, t, c)  = time/class/added embeddings, processed text context,
                         conv_in, down blocks (-> skips), mid block (-> h_mid)
    decode(enc, r, m)  = up blocks( h_mid + m, skips + r ), conv_norm_out, conv_act, conv_out

so ``unet(x_t, t, c, r, m) == decode(encode(x_t, t, c), r, m)`` and the prior (the UNet without
residuals) is ``decode(encode(x_t, t, c))``. LISA needs both every step; sharing ``encode``
replaces a second full UNet pass by a second up path. ``encode`` depends only on the frozen main
network, x_t and the context, none of which needs a gradient, so it runs once under
``torch.no_grad()``; the residuals carry the side network's gradient into the up path.

The mid block belongs to ``encode`` (not to the decoding half) because its *output* receives the
residual: its computation is the same with and without control.

Nothing here forks diffusers' UNet: the functions call its own embedding helpers
(``get_time_embed``, ``get_class_embed``, ``get_aug_embed``, ``process_encoder_hidden_states``)
and blocks in the order of ``UNet2DConditionModel.forward`` (diffusers 0.42). Attention masks,
``cross_attention_kwargs`` (GLIGEN, LoRA scale) and T2I-Adapter intra-block residuals are not
supported; passing one raises :class:`~lisa_control.core.errors.ConfigError` and callers should use
the full ``unet(...)`` call instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..core.errors import ConfigError, ModelError


@dataclass
class UNetEncoding:
    """The part of one UNet call that ControlNet residuals do not change.

    Attributes:
        emb: the block embedding (time + class + added embeddings, after ``time_embed_act``).
        encoder_hidden_states: the text context after ``encoder_hid_proj``.
        skips: the skip connections, ``conv_in``'s output first, as diffusers' up blocks pop
            them (one per ControlNet down residual).
        mid: the mid block's output (the last down block's output when there is no mid block),
            before the ControlNet mid residual is added.
        forward_upsample_size: whether the spatial size is not a multiple of the UNet's total
            upsampling factor, so up blocks must be told their output size.
    """

    emb: torch.Tensor
    encoder_hidden_states: Any
    skips: tuple[torch.Tensor, ...]
    mid: torch.Tensor
    forward_upsample_size: bool

    @property
    def batch_size(self) -> int:
        return self.mid.shape[0]

    def select(self, rows: torch.Tensor | None) -> UNetEncoding:
        """The encoding of the batch rows ``rows`` alone (None: this encoding): every operation
        of the up path acts per sample, so decoding it gives those rows of the full decode."""
        if rows is None:
            return self
        return UNetEncoding(
            emb=_rows(self.emb, rows),
            encoder_hidden_states=_rows(self.encoder_hidden_states, rows),
            skips=tuple(_rows(s, rows) for s in self.skips),
            mid=_rows(self.mid, rows),
            forward_upsample_size=self.forward_upsample_size,
        )


def _rows(value, rows: torch.Tensor):
    if isinstance(value, tuple):  # IP-Adapter: (text context, image embeddings)
        return tuple(_rows(v, rows) for v in value)
    return value[rows.to(value.device)]


def _check_unet(unet: torch.nn.Module) -> None:
    if not isinstance(unet, UNet2DConditionModel):
        raise ModelError(
            f"the split UNet forward needs a diffusers UNet2DConditionModel, got "
            f"{type(unet).__name__}; use shared_encoder_prior=False for other main networks."
        )


def encode(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    *,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> UNetEncoding:
    """Run the residual-independent part of ``unet(sample, timestep, encoder_hidden_states,
    ...)``: embeddings, ``conv_in``, down blocks and mid block.

    Arguments mean what they mean for ``UNet2DConditionModel.forward``. Call it under
    ``torch.no_grad()`` when the UNet is frozen and the inputs need no gradient (the training
    case); it records a graph like any module call otherwise.
    """
    _check_unet(unet)
    unsupported = {
        "attention_mask": attention_mask,
        "encoder_attention_mask": encoder_attention_mask,
        "cross_attention_kwargs": cross_attention_kwargs,
    }
    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise ConfigError(
            f"the split UNet forward does not support {', '.join(given)}; call the UNet directly "
            "(UNetControlNetBranch(..., shared_encoder_prior=False))."
        )
    added_cond_kwargs = added_cond_kwargs or {}

    # Up blocks need explicit output sizes when H or W is not a multiple of 2**num_upsamplers.
    overall_up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % overall_up_factor != 0 for dim in sample.shape[-2:])

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. The block embedding: time, then class and added (SDXL text/time, Kandinsky) embeddings.
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        if unet.config.class_embeddings_concat:
            emb = torch.cat([emb, class_emb], dim=-1)
        else:
            emb = emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    if unet.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )

    # 2. conv_in and the down blocks; every output they hand to the up path is a skip.
    sample = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, block_skips = block(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states
            )
        else:
            sample, block_skips = block(hidden_states=sample, temb=emb)
        skips += tuple(block_skips)

    # 3. The mid block: the ControlNet's mid residual is added to its output, not its input.
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)

    return UNetEncoding(
        emb=emb,
        encoder_hidden_states=encoder_hidden_states,
        skips=skips,
        mid=sample,
        forward_upsample_size=forward_upsample_size,
    )


def _check_residuals(
    encoding: UNetEncoding,
    down_block_additional_residuals: Sequence[torch.Tensor] | None,
    mid_block_additional_residual: torch.Tensor | None,
) -> None:
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
        raise ConfigError(
            "pass both down_block_additional_residuals and mid_block_additional_residual (a "
            "ControlNet's two outputs) or neither; T2I-Adapter residuals are not supported here."
        )
    if down_block_additional_residuals is not None and len(down_block_additional_residuals) != len(
        encoding.skips
    ):
        raise ModelError(
            f"got {len(down_block_additional_residuals)} down residuals for a UNet with "
            f"{len(encoding.skips)} skip connections; the side network was not built for this "
            "UNet."
        )


def decode(
    unet: UNet2DConditionModel,
    encoding: UNetEncoding,
    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Finish the UNet call that ``encoding`` started, adding ControlNet residuals if given.

    With residuals this equals ``unet(..., down_block_additional_residuals=...,
    mid_block_additional_residual=...)``; without, the plain ``unet(...)`` (the prior).
    """
    _check_unet(unet)
    _check_residuals(encoding, down_block_additional_residuals, mid_block_additional_residual)
    skips = encoding.skips
    sample = encoding.mid
    if down_block_additional_residuals is not None:
        skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=True))
        sample = sample + mid_block_additional_residual
    return _up_path(
        unet,
        encoding.emb,
        encoding.encoder_hidden_states,
        encoding.forward_upsample_size,
        sample,
        skips,
    )


def decode_with_prior(
    unet: UNet2DConditionModel,
    encoding: UNetEncoding,
    down_block_additional_residuals: Sequence[torch.Tensor],
    mid_block_additional_residual: torch.Tensor,
    prior_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(controlled, prior) from one up-path call on a 2B batch instead of two calls on B; with
    ``prior_rows`` (k rows) a B + k batch whose prior part covers those rows only.

    The prior part gets zero residuals; ``s + 0 == s`` exactly, so it is the plain skip. Every
    up-path operation acts per sample (GroupNorm, convolutions, attention within a sample), so
    each part equals its own call up to the kernels' summation order; the prior is detached.
    Trade-off: one kernel launch per op instead of two, but autograd records the whole batch,
    so the backward and the saved activations of the up path grow by the prior's rows (the
    prior part's gradient is zero but still computed). Worth it only where the GPU is
    launch-bound.
    """
    _check_unet(unet)
    _check_residuals(encoding, down_block_additional_residuals, mid_block_additional_residual)
    prior_part = encoding.select(prior_rows)
    skips = tuple(
        torch.cat([s + r, p])
        for s, r, p in zip(encoding.skips, down_block_additional_residuals, prior_part.skips)
    )
    sample = torch.cat([encoding.mid + mid_block_additional_residual, prior_part.mid])
    out = _up_path(
        unet,
        _concat(encoding.emb, prior_part.emb),
        _concat(encoding.encoder_hidden_states, prior_part.encoder_hidden_states),
        encoding.forward_upsample_size,
        sample,
        skips,
    )
    batch = encoding.batch_size
    return out[:batch], out[batch:].detach()


def _concat(value, more):
    if isinstance(value, tuple):  # IP-Adapter: (text context, image embeddings)
        return tuple(_concat(v, m) for v, m in zip(value, more))
    return torch.cat([value, more])


def _up_path(
    unet: UNet2DConditionModel,
    emb: torch.Tensor,
    encoder_hidden_states,
    forward_upsample_size: bool,
    sample: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Up blocks and output head, as in ``UNet2DConditionModel.forward`` steps 5 and 6."""
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        is_final_block = i == len(unet.up_blocks) - 1
        # Each up block consumes as many skips as it has resnets, deepest first.
        block_skips = skips[-len(block.resnets) :]
        skips = skips[: -len(block.resnets)]
        if not is_final_block and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=block_skips,
                encoder_hidden_states=encoder_hidden_states,
                upsample_size=upsample_size,
            )
        else:
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=block_skips,
                upsample_size=upsample_size,
            )
    if unet.conv_norm_out:
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
    return unet.conv_out(sample)
