"""``lisa sample``: generate with a trained side network. No decoder is involved: the saved side
network is a plain ControlNet. ControlNets on Stable Diffusion UNets go through diffusers' stock
``StableDiffusionControlNetPipeline``; every other pair (pixel-space models, SD3 and Flux
ControlNets, T2I-Adapters) through ``sampling.sample``, with the condition and prompts encoded as
in training and validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..core.errors import ConfigError


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
    p.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the model's own)"
    )
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance for models with text encoders (default 7.5); for Flux, "
        "the distilled guidance its transformer embeds (default 3.5); unused without text",
    )
    p.add_argument("--num_images", type=int, default=1, help="samples per condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_pickle", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default="samples.png", help="PNG grid: condition | samples")
    return p


def generate(args) -> Path:
    from ..families import branch_class
    from ..data.images import load_image, to_condition_tensor
    from ..families.loading import load_main_model, load_side_network
    from ..eval.images import image_grid, to_uint8

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    cls = branch_class(model.family, args.side_network)
    controlnet = load_side_network(args.controlnet, args.allow_pickle, cls.side_network_class)
    branch = cls(model.main_network, controlnet).to(device).eval()
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.image):
        raise ConfigError("give one --prompt, or as many as --image.")
    resolution = args.resolution or model.resolution
    model.check_resolution(resolution)
    conditions = torch.stack([to_condition_tensor(load_image(p), resolution) for p in args.image])
    # SD3 and Flux ControlNets take the VAE latent of an RGB image, checked when it is encoded
    if not model.condition_in_latent_space and conditions.shape[1] != branch.condition_channels:
        raise ConfigError(
            f"the condition images have {conditions.shape[1]} channels but the side network "
            f"expects {branch.condition_channels}."
        )
    rows = [[c] for c in to_uint8(conditions, signed=False)]
    generator = torch.Generator("cpu").manual_seed(args.seed)
    from ..eval.validation import evaluation_scheduler

    pipeline = model.family.stock_pipeline(
        model, controlnet, evaluation_scheduler(model.scheduler)
    )
    if pipeline is not None:
        samples = _stock_pipeline_samples(args, model, pipeline, prompts, conditions, generator)
    else:
        samples = _branch_samples(args, model, branch, prompts, conditions, generator, device)
    for images in samples:
        for row, img in zip(rows, images):
            row.append(img)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out)
    print(f"wrote {out}")
    return out


def _branch_samples(args, model, branch, prompts, conditions, generator, device):
    """uint8 images, one (N, H, W, 3) array per ``--num_images``, through ``sampling.sample``."""
    from ..families.encoders import FrozenEncoders
    from ..eval.sampling import decode, init_noise_sigma, sample
    from ..eval.images import to_uint8
    from ..eval.validation import inference_schedule

    encoders = FrozenEncoders(model, device)
    size = conditions.shape[-1] // model.vae_scale_factor
    scheduler, schedule = inference_schedule(model, size, size, args.num_inference_steps)
    cfg_scale, embedded_guidance = model.family.guidance(model, args.guidance_scale)
    context = encoders.prompt_context(prompts)
    if embedded_guidance is not None:
        context.extra["guidance"] = embedded_guidance
    negative = encoders.prompt_context([""] * len(prompts)) if cfg_scale > 1 else None
    side_conditions = encoders.encode_condition(conditions)
    for _ in range(args.num_images):
        shape = (len(prompts), model.sample_channels, size, size)
        latents = torch.randn(shape, generator=generator).to(device)
        x = sample(
            branch,
            side_conditions,
            context,
            scheduler,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=cfg_scale,
            negative_context=negative,
            latents=latents * init_noise_sigma(scheduler),
            schedule=schedule,
        )
        yield to_uint8(decode(model.vae, x).float().cpu())


def _stock_pipeline_samples(args, model, pipeline, prompts, conditions, generator):
    """uint8 images per ``--num_images`` from the family's stock diffusers pipeline."""
    device = next(pipeline.controlnet.parameters()).device
    pipeline = pipeline.to(device)
    cfg_scale, _ = model.family.guidance(model, args.guidance_scale)
    for _ in range(args.num_images):
        images = pipeline(
            prompts,
            image=conditions.to(device),
            num_inference_steps=args.num_inference_steps,
            guidance_scale=cfg_scale,
            generator=generator,
            output_type="np",
        ).images
        yield (images * 255).round().astype("uint8")


def main(argv=None) -> None:
    generate(build_parser().parse_args(argv))
