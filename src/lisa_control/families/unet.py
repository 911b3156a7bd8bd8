"""The UNet family: diffusers ``UNet2DConditionModel`` main networks (SD1.x, SD2.x, SDXL and the
shipped pixel-space UNets) with a ``ControlNetModel`` side network (here) or a ``T2IAdapter``
(``t2i_adapter.py``).

The ControlNet reads (x_t, t, text, condition) and returns one residual per UNet skip connection
plus one for the mid block; the UNet adds them. The prior is the same UNet call without them.
Since the residuals enter only after the down path, a step that needs both predictions runs the
down path once and the up path twice (see ``unet_split``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

from ..core.branch import Context, DualBranch, Prediction, prediction_without_residuals
from ..core.errors import ConfigError, ModelError
from ..core.hooks import NetworkLayout, register_layout, resolve_layer, zero_projection_names
from ..regularizers.decoders import ScoreDecoder, controlnet_feature_shape
from . import unet_split
from .base import Family, MainModel
from .loading import check_weight_files
from .t2i_adapter import T2IAdapterBranch

# Config keys that must agree between a UNet and a ControlNet meant to drive it.
_MATCHING_KEYS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "down_block_types",
    "addition_embed_type",
)


def check_side_fits_main(unet: UNet2DConditionModel, controlnet: ControlNetModel) -> None:
    """Refuse a ControlNet that was not built for this UNet, naming the first mismatch."""
    for key in _MATCHING_KEYS:
        a, b = unet.config.get(key), controlnet.config.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            raise ModelError(
                f"the side network does not fit the main network: {key} is {b!r} in the "
                f"ControlNet but {a!r} in the UNet. Build the side network from this UNet "
                "(omit --controlnet_model_name_or_path, or use ControlNetModel.from_unet)."
            )


# The condition encoder halves resolution once per entry after the first: diffusers' default
# for SD (8x) and shallower stacks for models whose condition is at sample resolution.
CONDITION_EMBEDDING_CHANNELS = {1: (32,), 2: (16, 32), 4: (16, 32, 96), 8: (16, 32, 96, 256)}


class UNetControlNetBranch(DualBranch):
    """Frozen UNet + ControlNet.

    Args:
        shared_encoder_prior: for ``forward(..., with_prior=True)``, compute the UNet's
            embeddings, down blocks and mid block once, without gradient, and run only the up
            path twice (controlled, and under ``no_grad`` for the prior) instead of a second
            full UNet pass. The same operations on the same tensors, so the same results (bitwise
            in the fp32 tests). It falls back to the full passes where that would not hold: a
            gradient through the down path (x_t, the context or a main-network weight requires
            grad) or something on the UNet's top-level call (hooks, a compile wrapper).
        batched_prior: run the two up paths as one 2B-batch call (see
            ``unet_split.decode_with_prior``); needs ``shared_encoder_prior``. Equal up to the
            kernels' summation order; more backward work, so off unless a benchmark says so.

    With ``prior_rows`` (k rows) the prior is computed for those rows only: the shared-encoder
    path decodes the prior's up path on the k rows of the shared encoding (a B + k call when
    batched), the full path runs the UNet on the k rows.
    """

    side_network_class = ControlNetModel
    condition_at_pixel_level = True

    main_network: UNet2DConditionModel
    side_network: ControlNetModel

    def __init__(
        self,
        main_network: UNet2DConditionModel,
        side_network: ControlNetModel,
        shared_encoder_prior: bool = True,
        batched_prior: bool = False,
    ):
        check_side_fits_main(main_network, side_network)
        if batched_prior and not shared_encoder_prior:
            raise ConfigError(
                "batched_prior=True batches the two up paths of the shared-encoder prior; it "
                "needs shared_encoder_prior=True."
            )
        super().__init__(main_network, side_network)
        self.shared_encoder_prior = shared_encoder_prior
        self.batched_prior = batched_prior

    @classmethod
    def from_main(
        cls,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | None = None,
        conditioning_channels: int = 3,
        condition_downscale: int = 8,
        shared_encoder_prior: bool = True,
        batched_prior: bool = False,
    ) -> UNetControlNetBranch:
        """Wrap ``unet``; with no ``controlnet``, make one from the UNet's weights (the paper's
        and diffusers' initialisation).

        ``condition_downscale`` is the ratio of condition to sample resolution: 8 for SD latents
        (512 px condition, 64 latent), 1 for pixel-space models. The last two flags are the
        constructor's.
        """
        if controlnet is None:
            if condition_downscale not in CONDITION_EMBEDDING_CHANNELS:
                raise ModelError(
                    f"condition_downscale must be one of {sorted(CONDITION_EMBEDDING_CHANNELS)}, "
                    f"got {condition_downscale!r}."
                )
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_channels=conditioning_channels,
                conditioning_embedding_out_channels=CONDITION_EMBEDDING_CHANNELS[
                    condition_downscale
                ],
            )
        return cls(
            unet,
            controlnet,
            shared_encoder_prior=shared_encoder_prior,
            batched_prior=batched_prior,
        )

    @property
    def condition_channels(self) -> int:
        return self.side_network.config.conditioning_channels

    def _main_kwargs(self, context: Context, dtype):
        ctx = context.to(dtype=dtype)
        return dict(
            encoder_hidden_states=ctx.encoder_hidden_states,
            added_cond_kwargs=ctx.added_cond_kwargs,
        )

    def side_residuals(self, x_t, timesteps, context: Context, condition, conditioning_scale=1.0):
        side_dtype = self.side_network.dtype
        down, mid = self.side_network(
            x_t.to(side_dtype),
            timesteps,
            controlnet_cond=condition.to(side_dtype),
            conditioning_scale=conditioning_scale,
            return_dict=False,
            **self._main_kwargs(context, side_dtype),
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
        prior_rows=None,
    ) -> Prediction:
        if condition.shape[1] != self.condition_channels:
            raise ModelError(
                f"the condition has {condition.shape[1]} channels but the side network expects "
                f"{self.condition_channels}; convert the condition images or build the side "
                f"network with conditioning_channels={condition.shape[1]}."
            )
        if with_prior and self.shared_encoder_prior and self._can_share_encoder(x_t, context):
            return self._forward_shared_encoder(
                x_t, timesteps, context, condition, conditioning_scale, prior_rows
            )
        residuals = self.side_residuals(x_t, timesteps, context, condition, conditioning_scale)
        return self.main_with(x_t, timesteps, context, residuals, with_prior, prior_rows)

    def _can_share_encoder(self, x_t, context: Context) -> bool:
        """Whether the split forward gives the full passes' results here.

        Not when running the down path without autograd would drop a gradient (the inputs or a
        main-network parameter require grad), nor when something acts on the main network's
        top-level call, which the split forward bypasses by calling its blocks: a
        ``torch.compile`` wrapper, accelerate's offload hooks, forward (pre-)hooks.
        """
        main = self.main_network
        if not isinstance(main, UNet2DConditionModel) or hasattr(main, "_hf_hook"):
            return False
        if main._forward_hooks or main._forward_pre_hooks:
            return False
        if not torch.is_grad_enabled():
            return True
        inputs = [x_t, context.encoder_hidden_states, *(context.added_cond_kwargs or {}).values()]
        if any(torch.is_tensor(v) and v.requires_grad for v in inputs):
            return False
        return not any(p.requires_grad for p in main.parameters())

    def _forward_shared_encoder(
        self, x_t, timesteps, context: Context, condition, conditioning_scale, prior_rows=None
    ) -> Prediction:
        return self._shared_encoder_pass(
            x_t,
            timesteps,
            context,
            lambda: self.side_residuals(x_t, timesteps, context, condition, conditioning_scale),
            prior_rows,
        )

    def _shared_encoder_pass(
        self, x_t, timesteps, context: Context, get_residuals, prior_rows=None
    ) -> Prediction:
        """The controlled prediction and the prior of ``prior_rows`` through one shared down
        path; ``get_residuals()`` gives the (down, mid) residuals, asked for after the prior."""
        main_dtype = self.main_network.dtype
        no_rows = prior_rows is not None and prior_rows.numel() == 0
        batched = self.batched_prior and not no_rows
        with torch.no_grad():
            encoding = unet_split.encode(
                self.main_network,
                x_t.to(main_dtype),
                timesteps,
                **self._main_kwargs(context, main_dtype),
            )
            # The prior first: its up-path activations are freed before the side network and the
            # controlled up path build their autograd graphs, which keeps the peak lower.
            prior = None
            if not (batched or no_rows):
                prior = unet_split.decode(self.main_network, encoding.select(prior_rows))
        down, mid = get_residuals()
        down = [r.to(main_dtype) for r in down]
        mid = mid.to(main_dtype)
        if batched:
            output, prior = unet_split.decode_with_prior(
                self.main_network, encoding, down, mid, prior_rows=prior_rows
            )
        else:
            output = unet_split.decode(self.main_network, encoding, down, mid)
        if no_rows:
            prior = output.detach().new_empty((0, *output.shape[1:]))
        return Prediction(output=output, prior=prior, prior_rows=prior_rows)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context: Context) -> torch.Tensor:
        """The main network alone, as one full pass (the reference the shared path matches)."""
        main_dtype = self.main_network.dtype
        return self.main_network(
            x_t.to(main_dtype),
            timesteps,
            return_dict=False,
            **self._main_kwargs(context, main_dtype),
        )[0]

    # -- composition (``families/composition.py``): residuals of one side network, then one
    # main pass with the residuals of several summed.

    def check_condition(self, x_t, condition) -> None:
        """Refuse a condition whose channels or size do not fit the side network."""
        if condition.ndim != 4 or condition.shape[1] != self.condition_channels:
            raise ModelError(
                f"the condition must have shape (B, {self.condition_channels}, H, W) for this "
                f"ControlNet, got {tuple(condition.shape)}."
            )
        downscale = 2 ** (len(self.side_network.config.conditioning_embedding_out_channels) - 1)
        expected = tuple(s * downscale for s in x_t.shape[-2:])
        if tuple(condition.shape[-2:]) != expected:
            raise ModelError(
                f"the condition is {tuple(condition.shape[-2:])} but this ControlNet needs "
                f"{expected}: {downscale}x the sample's resolution."
            )

    def residuals(self, x_t, timesteps, context: Context, condition, scale=1.0):
        """(down residuals, mid residual) of the side network, times ``scale``."""
        self.check_condition(x_t, condition)
        return self.side_residuals(x_t, timesteps, context, condition, scale)

    def main_with(
        self, x_t, timesteps, context: Context, residuals, with_prior=False, prior_rows=None
    ):
        """The UNet with ``residuals`` (``None``: without any), and the prior of the batch rows
        ``prior_rows`` (None: every row) when asked; the prior shares the down path as in
        :meth:`forward`."""
        if residuals is None:
            output = self.prior(x_t, timesteps, context)
            return prediction_without_residuals(output, with_prior, prior_rows)
        main_dtype = self.main_network.dtype
        down = [r.to(main_dtype) for r in residuals[0]]
        mid = residuals[1].to(main_dtype)
        if with_prior and self.shared_encoder_prior and self._can_share_encoder(x_t, context):
            return self._shared_encoder_pass(
                x_t, timesteps, context, lambda: (down, mid), prior_rows
            )
        output = self.main_network(
            x_t.to(main_dtype),
            timesteps,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **self._main_kwargs(context, main_dtype),
        )[0]
        if not with_prior:
            return Prediction(output=output)
        prior = self.prior_on_rows(x_t, timesteps, context, prior_rows, output)
        return Prediction(output=output, prior=prior, prior_rows=prior_rows)

    def lisa_decoder(self, layer: str, sample_size: int | None = None, **shape) -> ScoreDecoder:
        """A :class:`ScoreDecoder` from the feature at ``layer`` to the UNet's prediction."""
        return ScoreDecoder.for_layer(
            self.side_network,
            resolve_layer(self.side_network, layer),
            out_channels=self.main_network.config.out_channels,
            sample_size=sample_size or self.main_network.config.sample_size,
            **shape,
        )


# ----------------------------------------------------------------------------- layouts


def unet_blocks(network) -> list[tuple[str, int | None]]:
    """Down blocks, mid block and up blocks in forward order, with their output widths."""
    widths = list(network.config.block_out_channels)
    blocks = [(f"down_blocks.{k}", widths[k]) for k in range(len(network.down_blocks))]
    if getattr(network, "mid_block", None) is not None:
        blocks.append(("mid_block", widths[-1]))
    reversed_widths = widths[::-1]
    up_blocks = getattr(network, "up_blocks", None) or []
    blocks.extend((f"up_blocks.{k}", reversed_widths[k]) for k in range(len(up_blocks)))
    return blocks


def default_controlnet_layer(controlnet) -> str:
    """The authors' ``down_5`` where it exists, else the middle zero projection."""
    names = zero_projection_names(controlnet)
    return "down_5" if "down_5" in names else names[len(names) // 2]


register_layout(
    UNet2DConditionModel,
    NetworkLayout(blocks=unet_blocks, heavy_blocks=("down_blocks", "up_blocks", "mid_block")),
)
register_layout(
    ControlNetModel,
    NetworkLayout(
        projection_lists={"down": "controlnet_down_blocks"},
        single_projections={"mid": "controlnet_mid_block"},
        default_layer=default_controlnet_layer,
        blocks=unet_blocks,
        heavy_blocks=("down_blocks", "mid_block", "controlnet_cond_embedding"),
        feature_shape=controlnet_feature_shape,
    ),
)


# ----------------------------------------------------------------------------- the family


class UNetFamily(Family):
    """Stable Diffusion UNets (latent, CLIP text) and the pixel-space UNets of ``lisa pretrain``."""

    name = "unet"
    network_class = UNet2DConditionModel
    network_folder = "unet"
    pretrain_architecture = "unet"
    side_networks = {"controlnet": UNetControlNetBranch, "t2i_adapter": T2IAdapterBranch}

    scheduler_class = DDPMScheduler

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel

        local = Path(name)
        if local.is_dir():
            for sub in ("unet", "vae"):
                check_weight_files(local / sub, allow_pickle)
        kw = dict(revision=revision, use_safetensors=not allow_pickle)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer", revision=revision)
            text_encoder = CLIPTextModel.from_pretrained(
                name, subfolder="text_encoder", revision=revision, variant=variant
            )
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
            unet = UNet2DConditionModel.from_pretrained(
                name, subfolder="unet", variant=variant, **kw
            )
            scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=revision)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load a Stable Diffusion model from {name!r}: {first}. Pass a diffusers "
                "folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/, or a hub id "
                "reachable from this machine."
            ) from None
        resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        return MainModel(
            main_network=unet,
            scheduler=scheduler,
            family=self,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            resolution=resolution,
            source=name,
            objective=scheduler.config.prediction_type,
        )

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        """One zero token of the cross-attention width."""
        tokens = torch.zeros(batch, 1, network.config.cross_attention_dim, device=device)
        return Context(encoder_hidden_states=tokens.to(dtype))

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        return network(
            x_t,
            timesteps,
            encoder_hidden_states=context.encoder_hidden_states,
            added_cond_kwargs=context.added_cond_kwargs,
            return_dict=False,
        )[0]

    def stock_pipeline(self, model: MainModel, side_network, scheduler):
        """``StableDiffusionControlNetPipeline`` for latent models with a ControlNet, or with a
        list of them (the pipeline composes them in a ``MultiControlNetModel``)."""
        several = isinstance(side_network, (list, tuple))
        networks = list(side_network) if several else [side_network]
        if model.is_pixel_space or not all(isinstance(n, ControlNetModel) for n in networks):
            return None
        from diffusers import StableDiffusionControlNetPipeline

        return StableDiffusionControlNetPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.main_network,
            controlnet=side_network,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
