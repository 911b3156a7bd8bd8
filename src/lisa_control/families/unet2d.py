"""The unconditional UNet family: diffusers ``UNet2DModel`` pipelines (DDPM, DDIM, PNDM, e.g.
``google/ddpm-ema-celebahq-256``). They take no text and no side network; editing (``lisa edit``)
and sampling use their prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..core.branch import Context
from ..core.errors import ModelError
from .base import Family, MainModel
from .loading import check_weight_files


class UNet2DFamily(Family):
    """``UNet2DModel`` with its DDPM-family scheduler; no side networks."""

    name = "unet2d"
    network_class = UNet2DModel
    network_folder = "unet"
    scheduler_class = DDPMScheduler
    pipeline_prefixes = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")

    def load_pipeline(self, name: str, revision=None, variant=None, allow_pickle=False):
        """A :class:`MainModel` from a DDPM/DDIM/PNDM pipeline folder or hub id."""
        local = Path(name).expanduser()
        if local.is_dir():
            check_weight_files(local / "unet", allow_pickle)
        try:
            unet = UNet2DModel.from_pretrained(
                str(local) if local.is_dir() else name,
                subfolder="unet",
                revision=revision,
                variant=variant,
                use_safetensors=not allow_pickle,
            )
            config = DDPMScheduler.load_config(
                str(local) if local.is_dir() else name, subfolder="scheduler", revision=revision
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load a UNet2DModel pipeline from {name!r}: {first}. Pass a folder with "
                "unet/ and scheduler/ (as DDPMPipeline.save_pretrained writes), or a hub id."
            ) from None
        scheduler = DDPMScheduler.from_config(config)
        size = unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return MainModel(
            main_network=unet,
            scheduler=scheduler,
            family=self,
            resolution=int(size),
            source=name,
            objective=scheduler.config.prediction_type,
        )

    def resolution_multiple(self, model: MainModel) -> int:
        """One halving per block after the first."""
        return 2 ** (len(model.main_network.config.block_out_channels) - 1)

    def null_context(self, network, batch: int, device=None, dtype=torch.float32) -> Context:
        """An empty token list: the network takes no context."""
        return Context(encoder_hidden_states=torch.zeros(batch, 0, 1, device=device, dtype=dtype))

    def predict(self, network, x_t, timesteps, context: Context) -> torch.Tensor:
        return network(x_t, timesteps, return_dict=False)[0]
