"""``lisa sample``: generate with a trained side network. No decoder is involved: the saved side
network is a plain ControlNet. ControlNets on Stable Diffusion UNets go through diffusers' stock
``StableDiffusionControlNetPipeline``; every other pair (pixel-space models, SD3 and Flux
ControlNets, T2I-Adapters) through ``sampling.sample``, with the condition and prompts encoded as
in training and validation (see ``eval/generate.py``).

Conditions are image files, folders (every image in them, sorted) or ``metadata.jsonl`` files
(the conditioning-image column, with the caption column as the prompt). Each condition's noise
comes from its own generator seeded by (seed, index), so ``--batch_size`` does not change the
images (beyond the float rounding of batched kernels). ``--output_dir`` gets one PNG per sample,
named after its condition file, and ``grid.png``; ``--output`` writes the grid alone (condition
| samples, one row per condition). Condition videos (video files, animated GIFs, or a
metadata.jsonl with a condition-video column) go to video models and come back as animated GIFs
and frame sheets (``cli/sample_video.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..families import side_network_kinds

DEFAULT_OUTPUT = "samples.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa sample", description=__doc__.split("\n")[0])
    p.add_argument("--controlnet", required=True, help="a side network folder (diffusers)")
    p.add_argument(
        "--side_network",
        choices=side_network_kinds(),
        default="controlnet",
        help="what kind of side network --controlnet holds (as in `lisa train`)",
    )
    p.add_argument(
        "--image",
        required=True,
        nargs="+",
        help="condition image file(s), folder(s) of condition images (all, sorted by name), or "
        "a metadata.jsonl (or a folder holding one) whose conditioning-image column gives the "
        "conditions and whose caption column gives the prompts",
    )
    p.add_argument(
        "--conditioning_image_column",
        default="conditioning_image",
        help="metadata.jsonl column of the condition images (as in `lisa train`)",
    )
    p.add_argument(
        "--caption_column",
        default="text",
        help="metadata.jsonl column of the prompts (as in `lisa train`)",
    )
    p.add_argument(
        "--conditioning_video_column",
        default="conditioning_video",
        help="metadata.jsonl column of condition videos, for video models (see sample_video.py)",
    )
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="video models: frames taken from each condition video (default all)",
    )
    p.add_argument("--fps", type=float, default=8, help="video models: frame rate of the GIFs")
    p.add_argument(
        "--prompt",
        nargs="+",
        default=None,
        help="one prompt for all conditions, or one per condition; replaces metadata captions "
        "(default: the captions, else empty)",
    )
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--task", default=None, help="embedded task whose shipped main network to use")
    p.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the model's own)"
    )
    p.add_argument("--num_inference_steps", type=int, default=20, help="denoising steps (>= 1)")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance for models with text encoders (default 7.5); for Flux, "
        "the distilled guidance its transformer embeds (default 3.5); unused without text",
    )
    p.add_argument("--num_images", type=int, default=1, help="samples per condition")
    p.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="conditions sampled together; each condition's noise does not depend on it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_pickle", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--output",
        default=None,
        help=f"PNG grid: condition | samples (default {DEFAULT_OUTPUT} when --output_dir is not "
        "given)",
    )
    p.add_argument(
        "--output_dir",
        default=None,
        help="folder for one PNG per sample, named after its condition file (NAME.png, or "
        "NAME_K.png with --num_images K > 1), and the grid grid.png",
    )
    return p


def check_args(args) -> None:
    """Refuse counts that cannot work, before any model is loaded."""
    for flag in ("num_inference_steps", "num_images", "batch_size"):
        value = getattr(args, flag)
        if value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}.")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}.")


def prompts_for(conditions, prompts: list[str] | None) -> list[str]:
    """One prompt per condition: ``--prompt`` (one for all, or one each), else each
    condition's own caption, else ""."""
    if prompts is None:
        return [c.prompt or "" for c in conditions]
    if len(prompts) == 1:
        return prompts * len(conditions)
    if len(prompts) != len(conditions):
        raise ConfigError(
            f"give one --prompt, or as many as conditions ({len(conditions)}); got {len(prompts)}."
        )
    return list(prompts)


def sample_file_name(name: str, k: int, num_images: int) -> str:
    return f"{name}.png" if num_images == 1 else f"{name}_{k}.png"


def generate(args) -> Path:
    """Run ``lisa sample``; returns the grid's path."""
    from PIL import Image

    from ..eval.conditions import load_condition_tensors, read_conditions
    from ..eval.generate import SideNetworkSampler
    from ..eval.images import image_grid, to_uint8
    from ..families.loading import load_main_model

    check_args(args)
    from ..eval.video import names_videos

    if names_videos(args.image, args.conditioning_video_column):
        from .sample_video import generate_videos

        return generate_videos(args, prompts_for, DEFAULT_OUTPUT)
    conditions = read_conditions(
        args.image, args.conditioning_image_column, args.caption_column or None
    )
    prompts = prompts_for(conditions, args.prompt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    resolution = args.resolution or model.resolution
    model.check_resolution(resolution)
    sampler = SideNetworkSampler(
        model,
        args.controlnet,
        args.side_network,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        device=device,
        allow_pickle=args.allow_pickle,
    )
    tensors = load_condition_tensors(conditions, resolution, sampler.condition_channels)
    sampler.check_conditions(tensors)
    rows = [[c] for c in to_uint8(tensors, signed=False)]
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(args.num_images):
        images = to_uint8(
            sampler(tensors, prompts, seed=args.seed, draw=k, batch_size=args.batch_size)
        )
        for row, condition, image in zip(rows, conditions, images):
            row.append(image)
            if out_dir is not None:
                name = sample_file_name(condition.name, k, args.num_images)
                Image.fromarray(image).save(out_dir / name)
    grid = image_grid(rows)
    written = []
    if out_dir is not None:
        grid.save(out_dir / "grid.png")
        written.append(out_dir / "grid.png")
    if args.output or out_dir is None:
        out = Path(args.output or DEFAULT_OUTPUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        written.append(out)
    count = len(conditions) * args.num_images
    where = f"{count} sample(s) in {out_dir} and " if out_dir is not None else ""
    print(f"wrote {where}{', '.join(map(str, written))}")
    return written[-1]


def main(argv=None) -> None:
    generate(build_parser().parse_args(argv))
