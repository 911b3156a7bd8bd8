"""``lisa sample``: generate with a trained side network. No decoder is involved: the saved side
network is a plain ControlNet. Stable Diffusion models go through diffusers' stock
``StableDiffusionControlNetPipeline``; pixel-space models through ``sampling.sample``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa sample", description=__doc__.split("\n")[0])
    p.add_argument("--controlnet", required=True, help="a side network folder (diffusers)")
    p.add_argument(
        "--side_network",
        choices=["controlnet", "t2i_adapter"],
        default="controlnet",
        help="what kind of side network --controlnet holds (as in `lisa train`)",
    )
    p.add_argument("--image", required=True, nargs="+", help="condition image(s)")
    p.add_argument("--prompt", nargs="+", default=[""])
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--task", default=None, help="embedded task whose shipped main network to use")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images", type=int, default=1, help="samples per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_pickle", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default="samples.png", help="PNG grid: condition | samples")
    return p


def generate(args) -> Path:
    from diffusers import ControlNetModel

    from .branches import branch_class
    from .data.images import load_image, to_condition_tensor
    from .loading import load_main_model, load_side_network
    from .validation import evaluation_scheduler, image_grid, to_uint8

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    cls = branch_class(model.family, args.side_network)
    if not model.is_pixel_space and cls.side_network_class is not ControlNetModel:
        raise ConfigError(
            "`lisa sample` runs latent models through the stock StableDiffusionControlNetPipeline, "
            "so it takes a ControlNet for a Stable Diffusion UNet; use diffusers' own pipeline "
            f"for a {args.side_network} on a {model.family} model."
        )
    controlnet = load_side_network(args.controlnet, args.allow_pickle, cls.side_network_class)
    branch = cls(model.main_network, controlnet).to(device).eval()
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.image):
        raise ConfigError("give one --prompt, or as many as --image.")
    resolution = model.resolution
    conditions = torch.stack([to_condition_tensor(load_image(p), resolution) for p in args.image])
    if conditions.shape[1] != branch.condition_channels:
        raise ConfigError(
            f"the condition images have {conditions.shape[1]} channels but the side network "
            f"expects {branch.condition_channels}."
        )
    rows = [[c] for c in to_uint8(conditions, signed=False)]
    generator = torch.Generator("cpu").manual_seed(args.seed)
    if model.is_pixel_space:
        from .encoders import FrozenEncoders
        from .sampling import init_noise_sigma, sample

        scheduler = evaluation_scheduler(model.scheduler)
        null = FrozenEncoders(model, device).null_context(len(prompts))
        for _ in range(args.num_images):
            shape = (len(prompts), model.sample_channels, resolution, resolution)
            latents = torch.randn(shape, generator=generator).to(device)
            x = sample(
                branch,
                conditions.to(device),
                null,
                scheduler,
                num_inference_steps=args.num_inference_steps,
                latents=latents * init_noise_sigma(scheduler),
            )
            for row, img in zip(rows, to_uint8(x)):
                row.append(img)
    else:
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.main_network,
            controlnet=controlnet,
            scheduler=evaluation_scheduler(model.scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(device)
        for _ in range(args.num_images):
            images = pipe(
                prompts,
                image=conditions.to(device),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
                output_type="np",
            ).images
            for row, img in zip(rows, (images * 255).round().astype("uint8")):
                row.append(img)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out)
    print(f"wrote {out}")
    return out


def main(argv=None) -> None:
    generate(build_parser().parse_args(argv))
