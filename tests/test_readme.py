"""The README's Python snippet runs as written, on a small UNet with Stable Diffusion's layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Use it from your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_trains_a_controlnet_with_lisa():
    import lisa_control

    torch.manual_seed(0)
    # SD's layout shrunk: four blocks of two layers, so down_5 exists; 4 latent channels at 64.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    names = {
        **{name: getattr(lisa_control, name) for name in lisa_control.__all__},
        "torch": torch,
        "unet": unet,
        "noise_scheduler": DDPMScheduler(),
        "latents": torch.randn(1, 4, 64, 64),
        "text_embeddings": torch.randn(1, 3, 8),
        "control_image": torch.rand(1, 3, 512, 512),
    }
    exec(readme_snippet(), names)
    loss, optimizer, lisa = names["loss"], names["optimizer"], names["lisa"]
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert lisa.decoder.out.weight.grad.abs().sum() > 0
    before = lisa.decoder.out.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, lisa.decoder.out.weight)
