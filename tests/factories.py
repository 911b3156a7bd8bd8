"""Small things tests build: a random tiny pixel-space main model folder and an image folder
with metadata.jsonl, both made in code (no hub, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_pixel_model(folder: Path, resolution: int = 16, task: str | None = None) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lisa_control.loading import save_pixel_model
    from lisa_control.model_configs import tiny_unet

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        **tiny_unet(sample_size=resolution, block_out_channels=(16, 32), cross_attention_dim=16,
                    layers_per_block=1, attention_head_dim=8, norm_num_groups=8)
    )
    save_pixel_model(folder, unet, DDPMScheduler(num_train_timesteps=1000), resolution, task)
    return folder


def make_image_folder(folder: Path, n: int = 8, size: int = 16, seed: int = 0) -> Path:
    """Images whose condition is their own thresholded brightness, captions 'item k'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        cond = ((img.mean(-1, keepdims=True) > 127) * 255).astype(np.uint8).repeat(3, -1)
        Image.fromarray(img).save(folder / f"img{k}.png")
        Image.fromarray(cond).save(folder / f"cond{k}.png")
        lines.append({"image": f"img{k}.png", "conditioning_image": f"cond{k}.png",
                      "text": f"item {k}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder
