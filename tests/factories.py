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

    from lisa_control.families.loading import save_pixel_model
    from lisa_control.zoo.unet import tiny_unet

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=resolution,
            block_out_channels=(16, 32),
            cross_attention_dim=16,
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=8,
        )
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
        lines.append(
            {"image": f"img{k}.png", "conditioning_image": f"cond{k}.png", "text": f"item {k}"}
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_clip(folder: Path, model_cls, **config):
    """A CLIP text encoder of class ``model_cls`` (hidden size 16) and its tokenizer, built from
    a vocabulary of single characters written to ``folder``."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )
    settings = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=16) | config  # fmt: skip
    return model_cls(CLIPTextConfig(vocab_size=len(vocab), **settings)), tokenizer


def tiny_vae(**config):
    """An AutoencoderKL with 8x down-sampling and 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
        **config,
    )


def make_sd_model(folder: Path) -> Path:
    """A complete, tiny Stable Diffusion folder (VAE with 8x down-sampling, CLIP text encoder
    and a tokenizer from a vocabulary of single characters)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lisa_control.zoo.unet import tiny_unet

    torch.manual_seed(2)
    text_encoder, tokenizer = tiny_clip(folder, CLIPTextModel)
    vae = tiny_vae()
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=8,
            in_channels=4,
            block_out_channels=(16, 32),
            cross_attention_dim=16,
            layers_per_block=1,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def make_sd3_model(folder: Path) -> Path:
    """A complete, tiny Stable Diffusion 3 folder: two CLIP encoders with projections (their
    pooled outputs make the 32-d pooled vector, their hidden states the 32-d tokens), no T5
    (the pipeline then uses zeros, as SD3 allows), a shifting 8x VAE and a shift-3 scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from lisa_control.zoo.flow import tiny_flow_dit_config

    torch.manual_seed(4)
    text_encoder, tokenizer = tiny_clip(folder, CLIPTextModelWithProjection, projection_dim=16,
                                        num_hidden_layers=2)  # fmt: skip
    text_encoder_2, tokenizer_2 = tiny_clip(folder, CLIPTextModelWithProjection,
                                            projection_dim=16, num_hidden_layers=2)  # fmt: skip
    vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
    transformer = SD3Transformer2DModel(
        **tiny_flow_dit_config(sample_size=8, in_channels=4, num_layers=2,
                               num_attention_heads=2, attention_head_dim=8)
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def make_flux_model(folder: Path) -> Path:
    """A complete, tiny Flux.1 folder: CLIP (pooled, 16-d), T5 (16-d tokens; a Unigram tokenizer
    of single characters), a guidance-distilled transformer, a shifting 8x VAE with 4 latent
    channels, and Flux's dynamically shifting scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from lisa_control.zoo.flow import tiny_flux_transformer

    torch.manual_seed(5)
    clip, clip_tokenizer = tiny_clip(folder, CLIPTextModel)
    pieces = ["<pad>", "</s>", "<unk>", *CHARS]
    unigram = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = T5TokenizerFast(
        tokenizer_object=unigram, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_ids=0, model_max_length=32,
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
    ))  # fmt: skip
    vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
    transformer = tiny_flux_transformer(
        latent_channels=4, num_layers=1, num_single_layers=1, context_dim=16, pooled_dim=16,
        guidance_embeds=True,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(folder / "model")
    return folder / "model"
