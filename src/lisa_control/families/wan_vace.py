"""diffusers ``WanVACETransformer3DModel``: Wan 2.1 VACE, one module that holds both the frozen
main transformer and the side network taking the control video.

Main and side
-------------
A WanVACETransformer3DModel first runs its *VACE part*: ``vace_patch_embedding`` turns the
control latents into tokens, block 0 of ``vace_blocks`` adds the patch-embedded sample to them
through its ``proj_in``, and after each VACE block k its ``proj_out`` gives one hint, which the
transformer adds, times ``control_hidden_states_scale[k]``, to the output of its own block
``vace_layers[k]``. Everything else (patch embedding, text and time embeddings, ``blocks``,
output head) is the Wan text-to-video transformer.

Here the side network is the VACE part on its own, a :class:`WanVACESideNetwork` holding
``vace_patch_embedding`` and ``vace_blocks`` under the transformer's names; the main network is
the whole transformer, frozen, its own VACE part included. The branch runs the transformer with
the side network's VACE modules in place of its own (:func:`vace_part_in_place`), so diffusers'
forward computes every prediction and gradients reach the side network alone. Saved, the side
network is a diffusers folder whose weights load into a stock transformer
(``transformer.load_state_dict(weights, strict=False)``, or :func:`transformer_with_vace_part`
without copying) and drive ``WanVACEPipeline``.

A new side network (:meth:`WanVACESideNetwork.new_for`) starts its blocks as copies of the
transformer's blocks at ``vace_layers`` (ControlNet's initialisation) with ``proj_in`` and every
``proj_out`` zero, as the VACE authors initialise them, so the controlled prediction starts at
the prior. diffusers builds both as ordinary, randomly initialised ``nn.Linear`` layers: its
class exists to load trained VACE weights. Without a side network the branch fine-tunes a copy
of the transformer's own (trained) VACE part.

The prior
---------
WanVACETransformer3DModel needs ``control_hidden_states`` (``None`` fails), but with
``control_hidden_states_scale`` zero each hint enters as x + 0 h = x, exactly, whatever the
control. The prior is that call, without gradient: the transformer with its *own* VACE part, a
zero control and scale 0. Its own part, not the side network's: LISA reads the side network's
feature through a hook that keeps the latest call's tensor, which must stay the controlled
pass's. The VACE blocks run once more for nothing (about len(vace_layers) / num_layers of the
main blocks' cost); the result equals the Wan text-to-video transformer with the same weights.
A branch called with ``conditioning_scale=0`` is its own prior.

LISA
----
Layer ``vace_k`` is the input of ``vace_blocks[k].proj_out``: the control tokens after VACE block
k, (B, f h w, D) for f latent frames of h x w patches. A :class:`VideoTokenScoreDecoder` maps them
back to the prediction (B, C, F, H, W). The default layer is the middle VACE block.

Condition
---------
``WanVACEPipeline(video=control)`` with no mask and no reference image conditions on the control
everywhere: the control video in [-1, 1] is all "reactive", so its control latents are the VAE
latents (mode, normalised by ``latents_mean``/``latents_std``) of a zero video and of the video,
then a mask of ones with one channel per pixel of an s x s latent cell: 2 z + s^2 channels (96
for Wan 2.1). :meth:`WanVACEFamily.encode_condition` builds that; the branch takes it, at the
sample's latent frames and size.

Frames: Wan's causal VAE encodes 4k + 1 frames into k + 1 latent frames (the first frame alone,
then groups of four).

Objective
---------
Rectified flow with the velocity target, timestep = 1000 s as the transformer takes it: the
recipe of the Flux family (logit-normal timesteps shifted by the scheduler's static shift, a plain
velocity loss), with the shift of Wan's scheduler (``FlowMatchEulerDiscreteScheduler.shift`` or
UniPC's ``flow_shift``).

Sampling
--------
As ``WanVACEPipeline`` samples: with the model's own scheduler, from noise of k + 1 latent frames
for clips of 4k + 1 frames at 1/8 the size (:meth:`WanVACEFamily.sample_shape`), decoded by
de-normalising with ``latents_std`` and ``latents_mean`` in the pipeline's arithmetic
(:meth:`WanVACEFamily.denormalize_latents`) and running the causal VAE on the whole clip. Models
with a text encoder sample through the pipeline itself (:class:`StockWanVACEPipeline`), models
without one through the project's sampler, which draws the pipeline's frames.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock
from diffusers.utils import is_ftfy_available
from torch import nn

from ..core.branch import Context, DualBranch, Prediction, prediction_without_residuals
from ..core.errors import ConfigError, ModelError
from ..core.hooks import LayerRef, NetworkLayout, register_layout, resolve_layer
from ..core.objectives import PreconditionedFlowObjective
from ..regularizers.token_decoders import VideoTokenScoreDecoder
from .base import Family, MainModel
from .loading import load_pipeline_parts
from .transformer_layers import refuse_weighting, transformer_stack

# The transformer config keys that shape its VACE part; a side network carries them and must
# agree with its main network on each.
VACE_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "ffn_dim",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "added_kv_proj_dim",
    "vace_layers",
    "vace_in_channels",
)
VACE_MODULES = ("vace_patch_embedding", "vace_blocks")

# Wan 2.1's 480p height, the default training resolution of a loaded folder.
DEFAULT_RESOLUTION = 480
# WanVACEPipeline's default classifier-free guidance scale.
DEFAULT_GUIDANCE = 5.0
# WanVACEPipeline's default prompt length: every prompt is padded with zero states to it.
MAX_SEQUENCE_LENGTH = 512

# ----------------------------------------------------------------------------- the side network


class WanVACESideNetwork(ModelMixin, ConfigMixin):
    """The VACE part of a ``WanVACETransformer3DModel`` on its own: ``vace_patch_embedding`` and
    ``vace_blocks``, built from the transformer's config keys :data:`VACE_KEYS` and named as the
    transformer names them, so that its saved weights load into a stock transformer."""

    _supports_gradient_checkpointing = True
    # As WanVACETransformer3DModel: these stay fp32 when the weights load in half precision.
    _keep_in_fp32_modules = ["scale_shift_table", "norm1", "norm2", "norm3"]
    _no_split_modules = ["WanVACETransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int],
        num_attention_heads: int,
        attention_head_dim: int,
        ffn_dim: int,
        vace_layers: list[int],
        vace_in_channels: int,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
    ):
        super().__init__()
        width = num_attention_heads * attention_head_dim
        patch_size = tuple(patch_size)
        self.vace_patch_embedding = nn.Conv3d(
            vace_in_channels, width, kernel_size=patch_size, stride=patch_size
        )
        self.vace_blocks = nn.ModuleList(
            WanVACETransformerBlock(
                width,
                ffn_dim,
                num_attention_heads,
                qk_norm,
                cross_attn_norm,
                eps,
                added_kv_proj_dim,
                # The first block takes the sample's tokens in: the transformer's layout.
                apply_input_projection=k == 0,
                apply_output_projection=True,
            )
            for k in range(len(vace_layers))
        )
        self.gradient_checkpointing = False

    @property
    def hint_projections(self) -> nn.ModuleList:
        """Each VACE block's ``proj_out``, in block order: the projections LISA names
        ``vace_k``. A view: the modules stay registered under ``vace_blocks`` alone."""
        return nn.ModuleList(block.proj_out for block in self.vace_blocks)

    @classmethod
    def shaped_like(cls, transformer: WanVACETransformer3DModel) -> WanVACESideNetwork:
        """A randomly initialised VACE part of ``transformer``'s shape."""
        return cls(**{key: transformer.config[key] for key in VACE_KEYS})

    @classmethod
    def from_transformer(cls, transformer: WanVACETransformer3DModel) -> WanVACESideNetwork:
        """A copy of ``transformer``'s own VACE part (trained VACE weights, to fine-tune)."""
        side = cls.shaped_like(transformer)
        own = {
            key: value
            for key, value in transformer.state_dict().items()
            if key.split(".", 1)[0] in VACE_MODULES
        }
        side.load_state_dict(own)
        return side

    @classmethod
    def new_for(cls, transformer: WanVACETransformer3DModel) -> WanVACESideNetwork:
        """A new VACE part for ``transformer``: block k copies the transformer's block
        ``vace_layers[k]`` (the attention, cross-attention and feed-forward weights they share),
        ``proj_in`` and every ``proj_out`` start at zero, the patch embedding is freshly
        initialised. Until the projections learn, the prediction is the prior."""
        side = cls.shaped_like(transformer)
        for block, layer in zip(side.vace_blocks, transformer.config.vace_layers):
            projections = {
                key: torch.zeros_like(value)
                for key, value in block.state_dict().items()
                if key.startswith(("proj_in.", "proj_out."))
            }
            block.load_state_dict(transformer.blocks[layer].state_dict() | projections)
        return side


def check_side_fits_main(transformer, side_network) -> None:
    """Refuse a pair that does not fit, naming the first config key that differs."""
    if not isinstance(transformer, WanVACETransformer3DModel):
        raise ModelError(
            f"the main network must be a WanVACETransformer3DModel, got "
            f"{type(transformer).__name__}."
        )
    if not isinstance(side_network, WanVACESideNetwork):
        raise ModelError(
            f"the side network must be a WanVACESideNetwork (the VACE part of a Wan VACE "
            f"transformer), got {type(side_network).__name__}."
        )
    for key in VACE_KEYS:
        main_value, side_value = transformer.config.get(key), side_network.config.get(key)
        if isinstance(main_value, (list, tuple)):
            main_value, side_value = list(main_value), list(side_value or ())
        if main_value != side_value:
            raise ModelError(
                f"the side network does not fit the main network: {key} is {side_value!r} in the "
                f"VACE side network but {main_value!r} in the transformer. Build the side network "
                "from this transformer (WanVACEBranch.from_main)."
            )


@contextmanager
def vace_part_in_place(transformer: WanVACETransformer3DModel, side_network: WanVACESideNetwork):
    """``transformer`` running ``side_network``'s VACE modules, and its gradient checkpointing,
    instead of its own, inside the ``with`` block; its own modules and checkpointing switch come
    back on leaving it."""
    own_modules = {name: getattr(transformer, name) for name in VACE_MODULES}
    own_checkpointing = transformer.gradient_checkpointing
    own_function = transformer.__dict__.get("_gradient_checkpointing_func")
    for name in VACE_MODULES:
        setattr(transformer, name, getattr(side_network, name))
    if side_network.gradient_checkpointing:
        # The main blocks take the hints, so their activations count for the side network too.
        transformer._gradient_checkpointing_func = side_network._gradient_checkpointing_func
        transformer.gradient_checkpointing = True
    try:
        yield transformer
    finally:
        for name, module in own_modules.items():
            setattr(transformer, name, module)
        transformer.gradient_checkpointing = own_checkpointing
        if own_function is not None:
            transformer._gradient_checkpointing_func = own_function


def transformer_with_vace_part(
    transformer: WanVACETransformer3DModel, side_network: WanVACESideNetwork
) -> WanVACETransformer3DModel:
    """A stock ``WanVACETransformer3DModel`` made of ``transformer``'s modules with
    ``side_network``'s VACE part: it shares every module with the two, no weight is copied.
    What ``WanVACEPipeline`` runs to sample with a trained side network."""
    check_side_fits_main(transformer, side_network)
    with torch.device("meta"):
        joined = WanVACETransformer3DModel.from_config(transformer.config)
    for name, module in transformer.named_children():
        setattr(joined, name, module)
    for name, parameter in transformer.named_parameters(recurse=False):
        setattr(joined, name, parameter)
    for name, buffer in transformer.named_buffers(recurse=False):
        joined.register_buffer(name, buffer)
    for name in VACE_MODULES:
        setattr(joined, name, getattr(side_network, name))
    return joined


def transformer_call(transformer, x_t, timesteps, context: Context, control, scale: float):
    """One ``WanVACETransformer3DModel`` prediction, every hint scaled by ``scale``."""
    dtype = transformer.dtype
    scales = torch.full((len(transformer.config.vace_layers),), float(scale), device=x_t.device)
    return transformer(
        hidden_states=x_t.to(dtype),
        timestep=timesteps,
        encoder_hidden_states=context.encoder_hidden_states.to(dtype),
        control_hidden_states=control.to(transformer.vace_patch_embedding.weight.dtype),
        control_hidden_states_scale=scales.to(dtype),
        return_dict=False,
    )[0]


def transformer_alone(transformer, x_t, timesteps, context: Context) -> torch.Tensor:
    """The transformer without control: its own VACE part on a zero control, scale 0."""
    channels = transformer.config.vace_in_channels
    control = x_t.new_zeros(x_t.shape[0], channels, *x_t.shape[2:])
    return transformer_call(transformer, x_t, timesteps, context, control, 0.0)


# ----------------------------------------------------------------------------- the branch


class WanVACEBranch(DualBranch):
    """Frozen ``WanVACETransformer3DModel`` + trainable :class:`WanVACESideNetwork`, as
    ``WanVACEPipeline`` runs the pair.

    ``context.encoder_hidden_states``: the UMT5 text states (B, L, text_dim). ``x_t``: latent
    videos (B, C, f, h, w). ``condition``: VACE control latents (B, vace_in_channels, f, h, w)
    (:meth:`WanVACEFamily.encode_condition`). Timesteps are 1000 s, as the transformer takes
    them.
    """

    side_network_class = WanVACESideNetwork

    main_network: WanVACETransformer3DModel
    side_network: WanVACESideNetwork

    def __init__(self, main_network: WanVACETransformer3DModel, side_network: WanVACESideNetwork):
        check_side_fits_main(main_network, side_network)
        super().__init__(main_network, side_network)

    @classmethod
    def from_main(
        cls,
        transformer: WanVACETransformer3DModel,
        side_network: WanVACESideNetwork | None = None,
    ) -> WanVACEBranch:
        """Wrap ``transformer``; with no side network, fine-tune a copy of its own VACE part
        (:meth:`WanVACESideNetwork.from_transformer`)."""
        if side_network is None:
            side_network = WanVACESideNetwork.from_transformer(transformer)
        return cls(transformer, side_network)

    @property
    def condition_channels(self) -> int:
        return self.side_network.config.vace_in_channels

    def check_inputs(self, x_t: torch.Tensor, condition: torch.Tensor | None = None) -> None:
        channels = self.main_network.config.in_channels
        if x_t.ndim != 5 or x_t.shape[1] != channels:
            raise ConfigError(
                f"Wan VACE denoises latent videos (batch, {channels}, frames, height, width); got "
                f"x_t of shape {tuple(x_t.shape)}."
            )
        patch = tuple(self.main_network.config.patch_size)
        if any(size % p for size, p in zip(x_t.shape[2:], patch)):
            raise ConfigError(
                f"the latent video's frames, height and width {tuple(x_t.shape[2:])} must be "
                f"multiples of the transformer's patch {patch}; pick a resolution that is a "
                "multiple of the model's (the VAE's factor times the patch)."
            )
        if condition is None:
            return
        if condition.ndim != 5 or condition.shape[1] != self.condition_channels:
            raise ConfigError(
                f"the condition must be VACE control latents (batch, {self.condition_channels}, "
                f"frames, height, width), got shape {tuple(condition.shape)}; encode the control "
                "video with the family's encode_condition."
            )
        if condition.shape[0] != x_t.shape[0]:
            raise ConfigError(
                f"got {condition.shape[0]} control videos for {x_t.shape[0]} samples; give one "
                "control video per sample."
            )
        if condition.shape[2] != x_t.shape[2]:
            raise ConfigError(
                f"the control video has {condition.shape[2]} latent frames but the sample has "
                f"{x_t.shape[2]}; give the control video as many frames as the clip."
            )
        if condition.shape[-2:] != x_t.shape[-2:]:
            raise ConfigError(
                f"the control video's latents are {tuple(condition.shape[-2:])} but the sample's "
                f"are {tuple(x_t.shape[-2:])}; give the control video the clip's height and width."
            )

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
        self.check_inputs(x_t, condition)
        with vace_part_in_place(self.main_network, self.side_network) as transformer:
            output = transformer_call(
                transformer, x_t, timesteps, context, condition, conditioning_scale
            )
        if conditioning_scale == 0:
            return prediction_without_residuals(output, with_prior, prior_rows)
        if not with_prior:
            return Prediction(output=output)
        prior = self.prior_on_rows(x_t, timesteps, context, prior_rows, output)
        return Prediction(output=output, prior=prior, prior_rows=prior_rows)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        """The transformer alone (see the module docstring)."""
        self.check_inputs(x_t)
        return transformer_alone(self.main_network, x_t, timesteps, context)

    def default_lisa_layer(self) -> str:
        return middle_vace_layer(self.side_network)

    def lisa_decoder(
        self, layer: str, sample_size: int | None = None, **shape
    ) -> VideoTokenScoreDecoder:
        """A :class:`VideoTokenScoreDecoder` from the control tokens at ``vace_k`` to the
        velocity of a latent video ``sample_size`` wide (Wan's transformer has no size of its
        own, so it must be given)."""
        ref = resolve_layer(self.side_network, layer)
        if not ref.reads_input:
            raise ConfigError(
                f"LISA on a Wan VACE side network reads the tokens entering a VACE block's "
                f"proj_out; layer {layer!r} is not one. Valid names: "
                f"{', '.join(name for name, _ in vace_aliases(self.side_network))}."
            )
        if sample_size is None:
            raise ConfigError(
                "the Wan VACE decoder needs the latent size it decodes to: pass sample_size "
                "(the training resolution divided by the VAE's factor) to lisa_for_branch."
            )
        width, grid = vace_feature_shape(self.side_network, ref, sample_size)
        config = self.main_network.config
        return VideoTokenScoreDecoder(
            width, config.out_channels, tuple(config.patch_size), grid_size=grid
        )


# ----------------------------------------------------------------------------- layouts


def vace_aliases(side_network: WanVACESideNetwork) -> list[tuple[str, int | None]]:
    """``vace_k`` for every VACE block, in forward order; every projection reads one width."""
    return [(f"vace_{k}", None) for k in range(len(side_network.vace_blocks))]


def middle_vace_layer(side_network: WanVACESideNetwork) -> str:
    """The input of the middle VACE block's projection, ``vace_{n // 2}`` of n blocks, and
    ``vace_0`` for one or two: with two, ``n // 2`` is the last block, whose output feeds only its
    projection."""
    count = len(side_network.vace_blocks)
    return "vace_0" if count <= 2 else f"vace_{count // 2}"


def vace_feature_shape(
    side_network: WanVACESideNetwork, ref: LayerRef, sample_size: int
) -> tuple[int, int]:
    """(token width, tokens per side) of the control tokens a VACE projection reads, for a
    latent video ``sample_size`` wide."""
    return ref.module.in_features, sample_size // side_network.config.patch_size[1]


register_layout(
    WanVACESideNetwork,
    NetworkLayout(
        projection_lists={"vace": "hint_projections"},
        default_layer=middle_vace_layer,
        blocks=vace_aliases,
        heavy_blocks=("vace_blocks",),
        feature_shape=vace_feature_shape,
    ),
)
register_layout(
    WanVACETransformer3DModel,
    # Its own VACE blocks compute the prior's (zero-scaled) hints.
    NetworkLayout(blocks=transformer_stack("blocks"), heavy_blocks=("blocks", "vace_blocks")),
)


# ----------------------------------------------------------------------------- the family


def flow_shift(scheduler) -> float:
    """The static shift of a Wan scheduler: ``FlowMatchEulerDiscreteScheduler.shift``, or the
    ``flow_shift`` of a scheduler that samples with flow sigmas (UniPC in Wan's folders)."""
    config = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if config.get("use_dynamic_shifting", False):
            raise ModelError(
                "this Wan scheduler shifts by resolution (use_dynamic_shifting); Wan VACE trains "
                "with a static shift: set use_dynamic_shifting false in scheduler_config.json."
            )
        return float(config.shift)
    if config.get("use_flow_sigmas", False) and config.get("prediction_type") == "flow_prediction":
        return float(config.flow_shift)
    raise ModelError(
        f"{type(scheduler).__name__} is not a flow-matching scheduler; a Wan folder's scheduler/ "
        "holds FlowMatchEulerDiscreteScheduler or UniPC with use_flow_sigmas and "
        "prediction_type flow_prediction."
    )


def temporal_factor(vae) -> int:
    """Frames per latent frame after the first (WanVACEPipeline's
    ``vae_scale_factor_temporal``)."""
    return 2 ** sum(vae.temperal_downsample)


def check_frames(vae, frames: int) -> None:
    """Refuse a clip length Wan's causal VAE cannot encode whole, naming the lengths it can."""
    temporal = temporal_factor(vae)
    if (frames - 1) % temporal:
        fit = max(frames - 1, 0) // temporal * temporal + 1
        raise ConfigError(
            f"Wan's VAE encodes {temporal}k + 1 frames (1, {temporal + 1}, {2 * temporal + 1}, "
            f"...), got {frames}; use --num_frames {fit} (or {fit + temporal})."
        )


class WanVACEFamily(Family):
    """Wan 2.1 VACE pipelines: a ``WanVACETransformer3DModel``, Wan's causal video VAE and a UMT5
    text encoder, from diffusers ``WanVACEPipeline`` folders and hub ids."""

    name = "wan_vace"
    network_class = WanVACETransformer3DModel
    network_folder = "transformer"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    pipeline_prefixes = ("WanVACE",)
    side_networks = {"controlnet": WanVACEBranch}
    condition_in_latent_space = True
    default_objective = "flow"
    latent_flow_recipe = True
    takes_video = True

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        """A WanVACEPipeline folder or hub id (transformer/, vae/, scheduler/, and text_encoder/
        with tokenizer/ or neither: without them the model is conditioned on a null text)."""
        from .encoders import PipelinePrompts

        pipe = load_pipeline_parts(
            WanVACEPipeline,
            name,
            revision,
            variant,
            allow_pickle,
            optional=("text_encoder", "tokenizer", "transformer_2"),
        )
        if pipe.transformer is None or pipe.transformer_2 is not None:
            raise ModelError(
                f"{name!r} is not a one-transformer Wan VACE pipeline (transformer/ alone); "
                "Wan 2.2's two-expert VACE pipelines are not supported."
            )
        if (pipe.text_encoder is None) != (pipe.tokenizer is None):
            raise ModelError(
                f"{name!r} has a text encoder without a tokenizer or the reverse; give both "
                "text_encoder/ and tokenizer/, or neither."
            )
        if pipe.text_encoder is not None and not is_ftfy_available():
            raise ConfigError(
                "Wan's prompt encoding (diffusers' WanVACEPipeline) cleans prompts with ftfy, "
                "which is not installed: pip install 'lisa-control[wan]' (or ftfy)."
            )
        check_vae_fits_transformer(pipe.vae, pipe.transformer)
        return MainModel(
            main_network=pipe.transformer,
            scheduler=pipe.scheduler,
            family=self,
            vae=pipe.vae,
            resolution=DEFAULT_RESOLUTION,
            source=name,
            objective="flow",
            prompt_encoder=(
                None if pipe.text_encoder is None else PipelinePrompts(pipe, self.encode_prompts)
            ),
        )

    def encode_prompts(self, pipeline, captions: list[str], device) -> Context:
        """UMT5 states through the pipeline's ``encode_prompt``, zero-padded to its length."""
        embeds, _ = pipeline.encode_prompt(
            prompt=list(captions),
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=device,
        )
        return Context(encoder_hidden_states=embeds)

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        """One zero text state per video."""
        states = torch.zeros(batch, 1, network.config.text_dim, device=device, dtype=dtype)
        return Context(encoder_hidden_states=states)

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        return transformer_alone(network, x_t, timesteps, context)

    # -- the VAE: videos of 4k + 1 frames, per-channel normalisation, VACE control latents

    def vae_scale_factor(self, vae) -> int:
        """WanVACEPipeline's ``vae_scale_factor_spatial``."""
        return 2 ** len(vae.temperal_downsample)

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of videos (B, 3, F, H, W) in [-1, 1], F = 4k + 1, sampled from the VAE."""
        if pixels.ndim != 5:
            raise ConfigError(
                f"Wan's VAE encodes videos (batch, 3, frames, height, width), got shape "
                f"{tuple(pixels.shape)}."
            )
        check_frames(vae, pixels.shape[2])
        return vae.encode(pixels).latent_dist.sample()

    def normalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """(latents - latents_mean) / latents_std per channel, in fp32 and back, as the Wan
        pipelines normalise them."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return ((latents.float() - mean) * inverse_std).to(latents.dtype)

    def denormalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize_latents`, in the latents' dtype: divided by the
        reciprocal of ``latents_std`` and shifted by ``latents_mean``, the arithmetic of
        WanVACEPipeline's decoding, so that decoded frames equal its own."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
        like = dict(device=latents.device, dtype=latents.dtype)
        return latents / inverse_std.to(**like) + mean.to(**like)

    def sample_shape(
        self, model: MainModel, height: int, width: int, frames: int | None = None
    ) -> tuple[int, ...]:
        """(C, f, h, w) of the latents of ``frames``-frame clips: the causal VAE makes
        f = (frames - 1) / 4 + 1 latent frames (see the module docstring)."""
        if model.is_pixel_space:
            return super().sample_shape(model, height, width, frames)
        if frames is None:
            raise ConfigError(
                "Wan VACE generates videos, and the conditions are still images; give condition "
                "videos (video files, animated GIFs or a conditioning_video column)."
            )
        check_frames(model.vae, frames)
        latent_frames = (frames - 1) // temporal_factor(model.vae) + 1
        factor = model.vae_scale_factor
        return (model.sample_channels, latent_frames, height // factor, width // factor)

    def encode_condition(self, vae, condition: torch.Tensor) -> torch.Tensor:
        """Control videos (B, 3, F, H, W) in [0, 1] as VACE control latents
        (B, 2 z + s^2, f, h, w), as ``WanVACEPipeline(video=...)`` builds them without a mask or
        reference images (see the module docstring)."""
        if condition.ndim != 5 or condition.shape[1] != 3:
            raise ConfigError(
                f"the control must be RGB videos (batch, 3, frames, height, width) in [0, 1], got "
                f"shape {tuple(condition.shape)}."
            )
        check_frames(vae, condition.shape[2])
        video = (condition * 2 - 1).to(vae.dtype)

        def latents(pixels):
            return self.normalize_latents(vae, vae.encode(pixels).latent_dist.mode())

        inactive, reactive = latents(torch.zeros_like(video)), latents(video)
        b, _, f, h, w = reactive.shape
        cell = self.vae_scale_factor(vae) ** 2
        mask = reactive.new_ones(b, cell, f, h, w)
        return torch.cat([inactive, reactive, mask], dim=1)

    def latent_condition_channels(self, model: MainModel) -> int:
        return 2 * model.vae.config.z_dim + self.vae_scale_factor(model.vae) ** 2

    def resolution_multiple(self, model: MainModel) -> int:
        """The VAE's factor times the transformer's patch, as WanVACEPipeline checks sizes."""
        return model.vae_scale_factor * model.main_network.config.patch_size[1]

    # -- objective and sampling

    def training_objective(
        self, model: MainModel, name: str, timestep_sampler=None, weighting=None
    ):
        """Flux's recipe with the Wan scheduler's shift (see the module docstring)."""
        if self.uses_own_flow_recipe(model, name):
            refuse_weighting(weighting)
            return PreconditionedFlowObjective(
                shift=flow_shift(model.scheduler),
                num_timesteps=model.scheduler.config.num_train_timesteps,
                precondition_outputs=False,
            )
        return super().training_objective(model, name, timestep_sampler, weighting)

    def inference_schedule(self, model: MainModel, scheduler, height: int, width: int, steps):
        """Latent Wan models sample with their own scheduler, as WanVACEPipeline does."""
        if model.is_pixel_space:
            return scheduler, None
        return copy.deepcopy(model.scheduler), None

    def guidance(self, model: MainModel, guidance_scale: float | None):
        if not model.has_text:
            return 1.0, None
        return (DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale), None

    def stock_pipeline(self, model: MainModel, side_network, scheduler):
        """``WanVACEPipeline`` with the side network's VACE part (:func:`wan_vace_pipeline`)
        for latent models with a text encoder, behind :class:`StockWanVACEPipeline`; without
        one the pipeline cannot encode prompts and the project's sampler is the reference.
        ``scheduler`` is left aside: Wan samples with the model's own, as
        :meth:`inference_schedule` says."""
        if model.is_pixel_space or model.prompt_encoder is None:
            return None
        return StockWanVACEPipeline(wan_vace_pipeline(model, side_network))


def check_vae_fits_transformer(vae: AutoencoderKLWan, transformer: WanVACETransformer3DModel):
    """Refuse a VAE whose control latents do not have the transformer's VACE width."""
    if not isinstance(vae, AutoencoderKLWan):
        raise ModelError(f"a Wan VACE model needs an AutoencoderKLWan, got {type(vae).__name__}.")
    cell = 2 ** len(vae.temperal_downsample)
    channels = 2 * vae.config.z_dim + cell**2
    if channels != transformer.config.vace_in_channels:
        raise ModelError(
            f"the VAE makes {channels}-channel VACE control latents (2 x {vae.config.z_dim} "
            f"latent channels + {cell}x{cell} mask) but the transformer takes "
            f"{transformer.config.vace_in_channels} (vace_in_channels); pair the transformer "
            "with its own VAE."
        )


def wan_vace_pipeline(
    model: MainModel, side_network: WanVACESideNetwork, scheduler=None
) -> WanVACEPipeline:
    """diffusers' ``WanVACEPipeline`` running ``model`` with ``side_network``'s VACE part (shared,
    not copied), and ``scheduler`` (default the model's own)."""
    prompts = model.prompt_encoder
    return WanVACEPipeline(
        tokenizer=None if prompts is None else prompts.pipe.tokenizer,
        text_encoder=None if prompts is None else prompts.pipe.text_encoder,
        vae=model.vae,
        scheduler=scheduler if scheduler is not None else copy.deepcopy(model.scheduler),
        transformer=transformer_with_vace_part(model.main_network, side_network),
    )


class StockWanVACEPipeline:
    """diffusers' ``WanVACEPipeline`` behind the call
    :class:`~lisa_control.eval.generate.SideNetworkSampler` makes of a stock pipeline:
    ``(prompts, image=control videos (N, 3, F, H, W) in [0, 1], num_inference_steps,
    guidance_scale, latents (N, C, f, h, w), output_type)``, returning ``.images`` as
    (N, F, H, W, 3). Each video is one pipeline call, ``video=`` its control (the whole clip
    conditioned, no mask or reference image) with its own row of ``latents``, so it draws what
    a call for that video alone draws."""

    def __init__(self, pipeline: WanVACEPipeline):
        self.pipeline = pipeline

    def to(self, device) -> StockWanVACEPipeline:
        self.pipeline = self.pipeline.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def __call__(
        self, prompts, image, num_inference_steps, guidance_scale, latents, output_type="np"
    ):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        videos = []
        for row, prompt in enumerate(prompts):
            control = image[row]  # (3, F, H, W)
            num_frames, height, width = control.shape[1:]
            output = self.pipeline(
                prompt,
                video=control.transpose(0, 1)[None],  # (1, F, 3, H, W), as the pipeline reads it
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents[row : row + 1],
                output_type=output_type,
            ).frames
            videos.append(output)
        if output_type == "latent":
            return SimpleNamespace(images=torch.cat(videos))
        return SimpleNamespace(images=np.concatenate([np.asarray(v) for v in videos]))
