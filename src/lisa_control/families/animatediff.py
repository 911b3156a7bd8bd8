"""The AnimateDiff family: diffusers ``UNetMotionModel`` main networks (a ``UNet2DConditionModel``
with a ``MotionAdapter``'s temporal attention after every resnet) with a per-frame
``ControlNetModel`` or a ``SparseControlNetModel`` side network.

Samples are videos (B, C, F, H, W), as diffusers' AnimateDiff pipelines hold their latents. The
main network takes them whole, with the text context once per frame (B*F, L, D), and flattens
them to frames internally in batch-major order: row ``b * F + f`` is frame f of video b.

``controlnet`` (:class:`AnimateDiffControlNetBranch`), as ``AnimateDiffControlNetPipeline`` runs
it: an image ControlNet over the (B*F) flattened frames, each with its own condition frame, the
sample's timestep and the per-frame text context; its residuals, one row per frame, go into the
UNetMotionModel as they are.

``sparse_controlnet`` (:class:`AnimateDiffSparseControlNetBranch`), as
``AnimateDiffSparseControlNetPipeline`` runs it: SparseCtrl takes the video's condition with the
frames that carry none zeroed, plus a one-channel mask (1 on conditioned frames), and has motion
modules of its own, so that the control spreads to the unconditioned frames. Which frames are
conditioned: ``frame_indices`` at inference (all frames by default), a random subset per sample
in training (see :class:`AnimateDiffSparseControlNetBranch`).

The prior is the same no-grad UNetMotionModel call without residuals. LISA hooks a zero
projection of either side network (``down_k``/``mid``, as on images); the feature there is
per frame (B*F, C, h, w), and :class:`FrameScoreDecoder` decodes each frame and lays the result
out as the video (B, C, F, H, W) that the LISA target has.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    MotionAdapter,
    SparseControlNetModel,
    UNet2DConditionModel,
    UNetMotionModel,
)

from ..core.branch import Context, DualBranch, Prediction
from ..core.errors import ConfigError, ModelError
from ..core.hooks import NetworkLayout, register_layout, resolve_layer
from ..regularizers.decoders import ScoreDecoder, controlnet_feature_shape
from .base import Family, MainModel
from .loading import check_weight_files
from .unet import CONDITION_EMBEDDING_CHANNELS, default_controlnet_layer, unet_blocks

# ----------------------------------------------------------------------------- layouts of videos


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), row ``b * F + f`` = frame f of video b: the order in
    which UNetMotionModel and the AnimateDiff pipelines flatten videos."""
    if video.ndim != 5:
        raise ModelError(
            f"expected a video (batch, channels, frames, height, width), got shape "
            f"{tuple(video.shape)}."
        )
    b, c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def from_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The inverse of :func:`to_frames`: (B*F, C, H, W) -> (B, C, F, H, W)."""
    bf, c, h, w = frames.shape
    if bf % num_frames:
        raise ModelError(f"{bf} frames do not split into videos of {num_frames} frames.")
    return frames.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def per_frame_states(states: torch.Tensor, batch: int, num_frames: int) -> torch.Tensor:
    """Text states once per frame (B*F, L, D), as the pipelines pass them: states given per
    video (B, L, D) are repeated frame by frame (``repeat_interleave``); per-frame states pass."""
    if states.shape[0] == batch * num_frames and num_frames > 1:
        return states
    if states.shape[0] != batch:
        raise ModelError(
            f"the text context has batch {states.shape[0]}; expected {batch} (one per video) or "
            f"{batch * num_frames} (one per frame)."
        )
    return states.repeat_interleave(num_frames, dim=0)


def frame_timesteps(timesteps, batch: int, num_frames: int):
    """The sample's timestep for each of its frames: a scalar stays a scalar (the networks
    broadcast it); (B,) becomes (B*F,)."""
    if not torch.is_tensor(timesteps) or timesteps.ndim == 0 or timesteps.numel() == 1:
        return timesteps
    if timesteps.shape[0] != batch:
        raise ModelError(f"got {timesteps.shape[0]} timesteps for {batch} videos.")
    return timesteps.repeat_interleave(num_frames)


class FrameScoreDecoder(ScoreDecoder):
    """A :class:`ScoreDecoder` over per-frame features: decodes the (B*F, C, h, w) feature a
    side network's zero projection reads, frame by frame with its sample's timestep, and returns
    the prediction as the video (B, C_out, F, H, W). B is the number of timesteps."""

    def forward(self, feature: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        timesteps = timesteps.reshape(-1)
        batch = timesteps.shape[0]
        if feature.shape[0] % batch:
            raise ModelError(
                f"a feature of {feature.shape[0]} frames does not split into {batch} videos."
            )
        num_frames = feature.shape[0] // batch
        decoded = super().forward(feature, timesteps.repeat_interleave(num_frames))
        return from_frames(decoded, num_frames)


# ----------------------------------------------------------------------------- the two parts


def _same_dtype(module, like):
    """``module`` in ``like``'s dtype (cast only when they differ)."""
    return module if module.dtype == like.dtype else module.to(like.dtype)


_MOTION_TO_IMAGE = {
    "CrossAttnDownBlockMotion": "CrossAttnDownBlock2D",
    "DownBlockMotion": "DownBlock2D",
    "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D",
    "UpBlockMotion": "UpBlock2D",
}


def image_unet_of(unet: UNetMotionModel) -> UNet2DConditionModel:
    """The ``UNet2DConditionModel`` that ``unet`` extends: its weights without the motion
    modules (what ``UNetMotionModel.from_unet2d`` joins with a :class:`MotionAdapter`)."""
    config = unet.config
    if config.get("addition_embed_type") or config.get("encoder_hid_dim_type"):
        raise ModelError(
            "this UNetMotionModel has added embeddings (SDXL-style); the animatediff family takes "
            "SD1.x/2.x-style motion UNets."
        )
    image = UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple(_MOTION_TO_IMAGE[b] for b in config.down_block_types),
        up_block_types=tuple(_MOTION_TO_IMAGE[b] for b in config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        downsample_padding=config.downsample_padding,
        mid_block_scale_factor=config.mid_block_scale_factor,
        act_fn=config.act_fn,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        # UNet2DConditionModel's attention_head_dim is its number of heads (a diffusers naming
        # quirk that from_unet2d relies on too).
        attention_head_dim=config.num_attention_heads,
        use_linear_projection=config.use_linear_projection,
        time_cond_proj_dim=config.time_cond_proj_dim,
    )
    state = {k: v for k, v in unet.state_dict().items() if "motion_modules" not in k}
    image.load_state_dict(state)
    return _same_dtype(image, unet)


def motion_adapter_for(unet: UNetMotionModel) -> MotionAdapter:
    """The :class:`MotionAdapter` holding ``unet``'s motion modules (what an AnimateDiff pipeline
    folder stores in ``motion_adapter/``)."""
    config = unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config.block_out_channels),
        motion_layers_per_block=config.layers_per_block,
        motion_transformer_layers_per_block=config.temporal_transformer_layers_per_block,
        motion_transformer_layers_per_mid_block=config.temporal_transformer_layers_per_mid_block,
        motion_num_attention_heads=config.motion_num_attention_heads,
        motion_norm_num_groups=config.norm_num_groups,
        motion_max_seq_length=config.motion_max_seq_length,
        use_motion_mid_block=config.use_motion_mid_block,
    )
    adapter.load_state_dict({k: v for k, v in unet.state_dict().items() if "motion_modules" in k})
    return _same_dtype(adapter, unet)


# Config keys that must agree between a UNetMotionModel and a side network meant to drive it.
_MATCHING_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def check_side_fits_main(unet: UNetMotionModel, side) -> None:
    """Refuse a side network that was not built for this motion UNet, naming the first
    mismatch."""
    for key in _MATCHING_KEYS:
        a, b = unet.config.get(key), side.config.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            raise ModelError(
                f"the side network does not fit the main network: {key} is {b!r} in the "
                f"{type(side).__name__} but {a!r} in the UNetMotionModel. Build the side network "
                "from this UNet (omit --controlnet_model_name_or_path)."
            )


def _embedding_channels(condition_downscale: int) -> tuple[int, ...]:
    if condition_downscale not in CONDITION_EMBEDDING_CHANNELS:
        raise ModelError(
            f"condition_downscale must be one of {sorted(CONDITION_EMBEDDING_CHANNELS)}, "
            f"got {condition_downscale!r}."
        )
    return CONDITION_EMBEDDING_CHANNELS[condition_downscale]


def sparse_controlnet_from_unet(
    unet: UNetMotionModel, conditioning_channels: int = 3, condition_downscale: int = 8
) -> SparseControlNetModel:
    """A SparseCtrl encoder shaped after ``unet``, with its input convolution, time embedding,
    down blocks (motion modules included, where the shapes agree) and mid block copied from it;
    the condition embedding takes images at ``condition_downscale`` times the sample size (the
    full embedding, not the RGB variant's VAE latents), and all zero projections start at zero."""
    config = unet.config
    side = SparseControlNetModel(
        in_channels=config.in_channels,
        conditioning_channels=conditioning_channels,
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        down_block_types=tuple(config.down_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        downsample_padding=config.downsample_padding,
        mid_block_scale_factor=config.mid_block_scale_factor,
        act_fn=config.act_fn,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        temporal_transformer_layers_per_block=config.temporal_transformer_layers_per_block,
        attention_head_dim=config.num_attention_heads,
        num_attention_heads=config.num_attention_heads,
        use_linear_projection=config.use_linear_projection,
        conditioning_embedding_out_channels=_embedding_channels(condition_downscale),
        motion_max_seq_length=config.motion_max_seq_length,
        motion_num_attention_heads=config.motion_num_attention_heads,
        concat_conditioning_mask=True,
        use_simplified_condition_embedding=False,
    )
    for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
        source = getattr(unet, name).state_dict()
        target = getattr(side, name)
        own = target.state_dict()
        # SparseCtrl's motion modules attend twice to themselves less than the UNet's
        # (temporal_double_self_attention=False) and its mid block has none: copy what is shared.
        target.load_state_dict(
            {k: v for k, v in source.items() if k in own and own[k].shape == v.shape},
            strict=False,
        )
    return _same_dtype(side, unet)


# ----------------------------------------------------------------------------- branches


class _MotionBranch(DualBranch):
    """What both side networks share: the per-frame text context, the main call and the prior,
    and LISA's per-frame decoder."""

    condition_at_pixel_level = True
    main_network: UNetMotionModel

    def __init__(self, main_network: UNetMotionModel, side_network):
        check_side_fits_main(main_network, side_network)
        super().__init__(main_network, side_network)

    @property
    def condition_channels(self) -> int:
        return self.side_network.config.conditioning_channels

    def _check_video(self, x_t, condition=None) -> None:
        if x_t.ndim != 5:
            raise ModelError(
                f"the animatediff family denoises videos (batch, channels, frames, height, "
                f"width); got x_t of shape {tuple(x_t.shape)}."
            )
        longest = self.main_network.config.motion_max_seq_length
        if x_t.shape[2] > longest:
            raise ModelError(
                f"the motion modules of this UNetMotionModel take at most {longest} frames, got "
                f"{x_t.shape[2]}; use shorter clips (--num_frames)."
            )
        if condition is None:
            return
        if condition.ndim != 5 or condition.shape[2] != x_t.shape[2]:
            raise ModelError(
                f"the condition must be a video (batch, channels, frames, height, width) with "
                f"the sample's {x_t.shape[2]} frames; got shape {tuple(condition.shape)}."
            )
        if condition.shape[1] != self.condition_channels:
            raise ModelError(
                f"the condition has {condition.shape[1]} channels but the side network expects "
                f"{self.condition_channels}; convert the condition frames or build the side "
                f"network with conditioning_channels={condition.shape[1]}."
            )

    def _context(self, context: Context, x_t, dtype) -> torch.Tensor:
        states = context.encoder_hidden_states.to(dtype=dtype)
        return per_frame_states(states, x_t.shape[0], x_t.shape[2])

    def main_call(self, x_t, timesteps, context: Context, down=None, mid=None) -> torch.Tensor:
        dtype = self.main_network.dtype
        extra = {}
        if down is not None:
            extra = dict(
                down_block_additional_residuals=[r.to(dtype) for r in down],
                mid_block_additional_residual=mid.to(dtype),
            )
        return self.main_network(
            x_t.to(dtype),
            timesteps,
            encoder_hidden_states=self._context(context, x_t, dtype),
            return_dict=False,
            **extra,
        )[0]

    def side_residuals(self, x_t, timesteps, context, condition, conditioning_scale=1.0):
        raise NotImplementedError

    def forward(
        self, x_t, timesteps, context: Context, condition, with_prior=False, conditioning_scale=1.0
    ) -> Prediction:
        self._check_video(x_t, condition)
        down, mid = self.side_residuals(x_t, timesteps, context, condition, conditioning_scale)
        output = self.main_call(x_t, timesteps, context, down, mid)
        prior = self.prior(x_t, timesteps, context) if with_prior else None
        return Prediction(output=output, prior=prior)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        """The UNetMotionModel alone: the same call without residuals."""
        self._check_video(x_t)
        return self.main_call(x_t, timesteps, context)

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> ScoreDecoder:
        """A :class:`FrameScoreDecoder` from the per-frame feature at ``layer`` to the UNet's
        prediction, laid out as the video."""
        return FrameScoreDecoder.for_layer(
            self.side_network,
            resolve_layer(self.side_network, layer),
            out_channels=self.main_network.config.out_channels,
            sample_size=sample_size or self.main_network.config.sample_size,
            **shape,
        )


class AnimateDiffControlNetBranch(_MotionBranch):
    """Frozen UNetMotionModel + an image ``ControlNetModel`` run on every frame, as
    ``AnimateDiffControlNetPipeline`` runs it."""

    side_network_class = ControlNetModel
    side_network: ControlNetModel

    @classmethod
    def from_main(
        cls,
        unet: UNetMotionModel,
        controlnet: ControlNetModel | None = None,
        conditioning_channels: int = 3,
        condition_downscale: int = 8,
    ) -> AnimateDiffControlNetBranch:
        """Wrap ``unet``; with no ``controlnet``, make one from the UNet's image weights
        (``ControlNetModel.from_unet`` of :func:`image_unet_of`). ``condition_downscale``: the
        ratio of condition to sample resolution (8 for SD latents, 1 for pixel models)."""
        if controlnet is None:
            controlnet = ControlNetModel.from_unet(
                image_unet_of(unet),
                conditioning_channels=conditioning_channels,
                conditioning_embedding_out_channels=_embedding_channels(condition_downscale),
            )
        return cls(unet, controlnet)

    def side_residuals(self, x_t, timesteps, context, condition, conditioning_scale=1.0):
        """The ControlNet over the flattened frames: x_t and the condition to (B*F, C, H, W),
        each frame with its sample's timestep and the text context repeated per frame."""
        dtype = self.side_network.dtype
        batch, num_frames = x_t.shape[0], x_t.shape[2]
        down, mid = self.side_network(
            to_frames(x_t.to(dtype)),
            frame_timesteps(timesteps, batch, num_frames),
            encoder_hidden_states=self._context(context, x_t, dtype),
            controlnet_cond=to_frames(condition.to(dtype)),
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return down, mid


class AnimateDiffSparseControlNetBranch(_MotionBranch):
    """Frozen UNetMotionModel + a ``SparseControlNetModel``, as
    ``AnimateDiffSparseControlNetPipeline`` runs it.

    The condition is given for every frame (B, C, F, H, W); the branch keeps the frames it
    conditions on and zeroes the others, with a mask (B, 1, F, H, W) that is 1 on kept frames.
    Which frames: the ``frame_indices`` argument of ``forward`` if given; else, in training mode
    with ``random_training_frames``, a random subset per sample (k ~ U{1..F} frames, then k
    distinct frames uniformly), drawn from the global CPU generator, so that a resumed run draws
    the same subsets; else the branch's ``frame_indices`` (``None``: every frame).
    """

    side_network_class = SparseControlNetModel
    side_network: SparseControlNetModel

    def __init__(
        self,
        main_network: UNetMotionModel,
        side_network: SparseControlNetModel,
        frame_indices: Sequence[int] | None = None,
        random_training_frames: bool = True,
    ):
        if side_network.config.use_simplified_condition_embedding:
            raise ModelError(
                "this SparseControlNetModel takes VAE latents of the condition frames "
                "(use_simplified_condition_embedding, SparseCtrl's RGB variant); the animatediff "
                "branch feeds condition images. Use a SparseCtrl with the full condition "
                "embedding (scribble/sketch style) or build a new one."
            )
        super().__init__(main_network, side_network)
        self.frame_indices = None if frame_indices is None else [int(i) for i in frame_indices]
        self.random_training_frames = random_training_frames

    @classmethod
    def from_main(
        cls,
        unet: UNetMotionModel,
        side_network: SparseControlNetModel | None = None,
        conditioning_channels: int = 3,
        condition_downscale: int = 8,
        frame_indices: Sequence[int] | None = None,
        random_training_frames: bool = True,
    ) -> AnimateDiffSparseControlNetBranch:
        """Wrap ``unet``; with no side network, make one (:func:`sparse_controlnet_from_unet`)."""
        if side_network is None:
            side_network = sparse_controlnet_from_unet(
                unet, conditioning_channels, condition_downscale
            )
        return cls(unet, side_network, frame_indices, random_training_frames)

    def frame_mask(self, condition: torch.Tensor, frame_indices=None) -> torch.Tensor:
        """(B, F) with 1.0 on the frames conditioned on (see the class docstring)."""
        batch, num_frames = condition.shape[0], condition.shape[2]
        if frame_indices is None and self.training and self.random_training_frames:
            counts = torch.randint(1, num_frames + 1, (batch,))
            order = torch.rand(batch, num_frames).argsort(dim=1)
            # Frame order[b, r] is kept when its rank r is below the sample's count.
            keep = torch.arange(num_frames)[None] < counts[:, None]
            mask = torch.zeros(batch, num_frames).scatter(1, order, keep.float())
            return mask.to(condition.device)
        indices = frame_indices if frame_indices is not None else self.frame_indices
        mask = torch.zeros(batch, num_frames, device=condition.device)
        if indices is None:
            return mask + 1
        indices = [int(i) for i in indices]
        if not indices or any(not -num_frames <= i < num_frames for i in indices):
            raise ConfigError(
                f"frame indices {indices} do not name frames of a {num_frames}-frame video."
            )
        mask[:, indices] = 1
        return mask

    def sparse_condition(self, condition, frame_indices=None):
        """(condition with unconditioned frames zeroed, mask (B, 1, F, H, W)), the two inputs
        ``prepare_sparse_control_conditioning`` makes in the pipeline."""
        mask = self.frame_mask(condition, frame_indices)
        b, _, f, h, w = condition.shape
        mask = mask.to(condition.dtype)[:, None, :, None, None].expand(b, 1, f, h, w)
        return condition * mask, mask

    def side_residuals(
        self, x_t, timesteps, context, condition, conditioning_scale=1.0, frame_indices=None
    ):
        dtype = self.side_network.dtype
        sparse, mask = self.sparse_condition(condition.to(dtype), frame_indices)
        down, mid = self.side_network(
            x_t.to(dtype),
            timesteps,
            encoder_hidden_states=self._context(context, x_t, dtype),
            controlnet_cond=sparse,
            conditioning_mask=mask,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return down, mid

    def forward(
        self,
        x_t,
        timesteps,
        context: Context,
        condition,
        with_prior=False,
        conditioning_scale=1.0,
        frame_indices=None,
    ) -> Prediction:
        if frame_indices is None:
            return super().forward(
                x_t, timesteps, context, condition, with_prior, conditioning_scale
            )
        self._check_video(x_t, condition)
        down, mid = self.side_residuals(
            x_t, timesteps, context, condition, conditioning_scale, frame_indices
        )
        output = self.main_call(x_t, timesteps, context, down, mid)
        prior = self.prior(x_t, timesteps, context) if with_prior else None
        return Prediction(output=output, prior=prior)


# The blocks of a SparseCtrl encoder are a ControlNet's: conv_in, down blocks with one zero
# projection per resnet and downsampler, a mid block with its own.
register_layout(
    SparseControlNetModel,
    NetworkLayout(
        projection_lists={"down": "controlnet_down_blocks"},
        single_projections={"mid": "controlnet_mid_block"},
        default_layer=default_controlnet_layer,
        blocks=unet_blocks,
        heavy_blocks=("down_blocks", "mid_block", "controlnet_cond_embedding"),
        feature_shape=controlnet_feature_shape,
    ),
)
register_layout(
    UNetMotionModel,
    NetworkLayout(blocks=unet_blocks, heavy_blocks=("down_blocks", "up_blocks", "mid_block")),
)


# ----------------------------------------------------------------------------- stock pipelines


class StockVideoPipeline:
    """diffusers' ``AnimateDiffControlNetPipeline`` or ``AnimateDiffSparseControlNetPipeline``
    behind the call :class:`~lisa_control.eval.generate.SideNetworkSampler` makes of an image
    pipeline: ``(prompts, image=conditions (N, C, F, H, W), num_inference_steps,
    guidance_scale, latents (N, C, F, h, w), output_type)``, returning ``.images`` as
    (N, F, H, W, 3). The pipelines take one conditioning video per call, so the N videos run
    one after another, each with its own row of ``latents``. A SparseCtrl pipeline gets the
    frames at ``frame_indices`` (default all) and those indices."""

    def __init__(self, pipeline, frame_indices: Sequence[int] | None = None):
        self.pipeline = pipeline
        self.frame_indices = None if frame_indices is None else list(frame_indices)

    def to(self, device) -> StockVideoPipeline:
        self.pipeline = self.pipeline.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    @property
    def sparse(self) -> bool:
        return isinstance(self.pipeline.controlnet, SparseControlNetModel)

    def __call__(
        self,
        prompts,
        image,
        num_inference_steps,
        guidance_scale,
        latents,
        output_type="np",
        **kwargs,
    ):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        videos = []
        for row, prompt in enumerate(prompts):
            video = image[row]  # (C, F, H, W) in [0, 1]
            num_frames, height, width = video.shape[1:]
            indices = list(range(num_frames)) if self.frame_indices is None else self.frame_indices
            # The ControlNet pipeline takes a list of (C, H, W) frames; SparseCtrl's checks each
            # list entry as an image batch, so it gets (1, C, H, W) ones.
            if self.sparse:
                frames = [video[None, :, f] for f in indices]
            else:
                frames = [video[:, f] for f in range(num_frames)]
            extra = {"controlnet_frame_indices": indices} if self.sparse else {}
            with warnings.catch_warnings():
                # The (1, C, H, W) list SparseCtrl's checks require is deprecated by the image
                # processor that then stacks it; the result is the same.
                warnings.filterwarnings("ignore", "Passing `image` as a list of 4d", FutureWarning)
                output = self.pipeline(
                    prompt,
                    num_frames=num_frames,
                    height=height,
                    width=width,
                    conditioning_frames=frames,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    latents=latents[row : row + 1],
                    output_type=output_type,
                    **extra,
                    **kwargs,
                ).frames
            videos.append(output if output_type == "latent" else np.asarray(output))
        if output_type == "latent":
            return SimpleNamespace(images=torch.cat(videos))
        return SimpleNamespace(images=np.concatenate(videos))


# ----------------------------------------------------------------------------- the family


class AnimateDiffFamily(Family):
    """AnimateDiff motion UNets: SD1.x-style latent models from diffusers AnimateDiff folders
    (``unet/`` and ``motion_adapter/`` as ``AnimateDiffPipeline.save_pretrained`` writes them),
    and pixel-space ``UNetMotionModel`` folders with ``lisa_model.json``."""

    name = "animatediff"
    network_class = UNetMotionModel
    network_folder = "unet"
    scheduler_class = DDPMScheduler
    pipeline_prefixes = ("AnimateDiff",)
    pretrain_architecture = "motion_unet"
    takes_video = True
    side_networks = {
        "controlnet": AnimateDiffControlNetBranch,
        "sparse_controlnet": AnimateDiffSparseControlNetBranch,
    }

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        """An AnimateDiff pipeline folder or hub id: vae/, text_encoder/, tokenizer/,
        scheduler/, and unet/ holding either the joined ``UNetMotionModel`` or the image
        ``UNet2DConditionModel``, joined here with motion_adapter/."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel

        local = Path(name)
        if local.is_dir():
            for sub in ("unet", "vae"):
                check_weight_files(local / sub, allow_pickle)
        kw = dict(revision=revision, use_safetensors=not allow_pickle)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, subfolder="tokenizer", revision=revision
            )
            text_encoder = CLIPTextModel.from_pretrained(
                name, subfolder="text_encoder", revision=revision, variant=variant
            )
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
            unet_class = UNetMotionModel.load_config(name, subfolder="unet", revision=revision)
            if unet_class.get("_class_name") == "UNetMotionModel":
                unet = UNetMotionModel.from_pretrained(
                    name, subfolder="unet", variant=variant, **kw
                )
            else:
                if local.is_dir():
                    check_weight_files(local / "motion_adapter", allow_pickle)
                image_unet = UNet2DConditionModel.from_pretrained(
                    name, subfolder="unet", variant=variant, **kw
                )
                adapter = MotionAdapter.from_pretrained(
                    name, subfolder="motion_adapter", variant=variant, **kw
                )
                unet = UNetMotionModel.from_unet2d(image_unet, adapter)
            scheduler = DDPMScheduler.from_pretrained(
                name, subfolder="scheduler", revision=revision
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load an AnimateDiff model from {name!r}: {first}. Pass a diffusers "
                "AnimateDiff folder with unet/ (a UNetMotionModel, or a UNet2DConditionModel "
                "beside motion_adapter/), vae/, text_encoder/, tokenizer/ and scheduler/."
            ) from None
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return MainModel(
            main_network=unet,
            scheduler=scheduler,
            family=self,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            resolution=(unet.config.sample_size or 64) * scale,
            source=name,
            objective=scheduler.config.prediction_type,
        )

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        """One zero token of the cross-attention width per video (repeated per frame by the
        branches)."""
        tokens = torch.zeros(batch, 1, network.config.cross_attention_dim, device=device)
        return Context(encoder_hidden_states=tokens.to(dtype))

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        states = per_frame_states(context.encoder_hidden_states, x_t.shape[0], x_t.shape[2])
        return network(x_t, timesteps, encoder_hidden_states=states, return_dict=False)[0]

    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, F, H, W) through the image VAE frame by frame, as latents
        (B, C, F, h, w)."""
        if pixels.ndim != 5:
            return super().encode_images(vae, pixels)
        latents = vae.encode(to_frames(pixels)).latent_dist.sample()
        return from_frames(latents, pixels.shape[2])

    def decode_images(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Latent videos (B, C, F, h, w) through the image VAE frame by frame, as videos
        (B, 3, F, H, W)."""
        if latents.ndim != 5:
            return super().decode_images(vae, latents)
        frames = super().decode_images(vae, to_frames(latents))
        return from_frames(frames, latents.shape[2])

    def stock_pipeline(self, model: MainModel, side_network, scheduler):
        """``AnimateDiffControlNetPipeline`` / ``AnimateDiffSparseControlNetPipeline`` for latent
        models with a text encoder, behind :class:`StockVideoPipeline`."""
        if model.is_pixel_space or model.text_encoder is None:
            return None
        from diffusers import AnimateDiffControlNetPipeline, AnimateDiffSparseControlNetPipeline

        pipeline_class = (
            AnimateDiffSparseControlNetPipeline
            if isinstance(side_network, SparseControlNetModel)
            else AnimateDiffControlNetPipeline
        )
        pipeline = pipeline_class(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.main_network,
            motion_adapter=None,
            controlnet=side_network,
            scheduler=scheduler,
        )
        return StockVideoPipeline(pipeline)
