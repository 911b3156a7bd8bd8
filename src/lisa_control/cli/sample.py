"""``lisa sample``: generate with a trained side network. No decoder is involved: the saved side
network is a plain ControlNet. Pairs with a diffusers pipeline of their own (ControlNets on
Stable Diffusion UNets; AnimateDiff and Wan VACE models with a text encoder) go through it; every
other pair (pixel-space models, SD3 and Flux ControlNets, T2I-Adapters, video models without
text) through ``sampling.sample``, with the condition and prompts encoded as in training and
validation (see ``eval/generate.py``).

Conditions are image files, folders (every image in them, sorted) or ``metadata.jsonl`` files
(the conditioning-image column, with the caption column as the prompt). Each condition's noise
comes from its own generator seeded by (seed, index), so ``--batch_size`` does not change the
images (beyond the float rounding of batched kernels). ``--output_dir`` gets one PNG per sample,
named after its condition file, and ``grid.png``; ``--output`` writes the grid alone (condition
| samples, one row per condition). Condition videos (video files, animated GIFs, or a
metadata.jsonl with a condition-video column) go to video models and come back as animated GIFs
and frame sheets (``cli/sample_video.py``).

Several side networks compose (``--controlnet A B``): their residuals are summed, each times its
``--conditioning_scale`` and inside its ``--control_guidance_start`` / ``--control_guidance_end``
window, as diffusers' multi-ControlNet pipelines do; ``--image`` then gives one condition per
network for each sample, in the networks' order (``a.png b.png``, two folders paired by name
order, or a metadata.jsonl with one ``--conditioning_image_column`` per network). Video side
networks take one network, without scale or window.
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
    p.add_argument(
        "--controlnet",
        required=True,
        nargs="+",
        help="a side network folder (diffusers), or several to compose (their residuals summed)",
    )
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
        "conditions and whose caption column gives the prompts; with N side networks, N values "
        "per sample in the networks' order (files, or folders paired by name order)",
    )
    p.add_argument(
        "--conditioning_image_column",
        default=["conditioning_image"],
        nargs="+",
        help="metadata.jsonl column of the condition images (as in `lisa train`); one per side "
        "network with several",
    )
    add_composition_flags(p)
    p.add_argument(
        "--caption_column",
        default="text",
        help="metadata.jsonl column of the prompts (as in `lisa train`)",
    )
    add_video_flags(p)
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
        help="classifier-free guidance for models with text encoders (default 7.5; Wan VACE 5); "
        "for Flux, the distilled guidance its transformer embeds (default 3.5); unused without "
        "text",
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
    add_output_flags(p)
    return p


def add_composition_flags(p: argparse.ArgumentParser) -> None:
    """Each side network's scale and guidance window (several side networks, or one)."""
    p.add_argument(
        "--conditioning_scale",
        type=float,
        nargs="+",
        default=None,
        help="multiplies each side network's residuals: one number, or one per network (default 1)",
    )
    p.add_argument(
        "--control_guidance_start",
        type=float,
        nargs="+",
        default=None,
        help="fraction of the steps after which each side network starts acting: one number, "
        "or one per network (default 0; diffusers' meaning)",
    )
    p.add_argument(
        "--control_guidance_end",
        type=float,
        nargs="+",
        default=None,
        help="fraction of the steps after which each side network stops acting: one number, or "
        "one per network (default 1)",
    )


def add_video_flags(p: argparse.ArgumentParser) -> None:
    """Condition videos for video models (``cli/sample_video.py``)."""
    p.add_argument(
        "--conditioning_video_column",
        default="conditioning_video",
        help="metadata.jsonl column of condition videos, for video models (see sample_video.py)",
    )
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="video models: frames taken from each condition video (default all); Wan VACE "
        "takes 4k + 1 (5, 9, ...)",
    )
    p.add_argument("--fps", type=float, default=8, help="video models: frame rate of the GIFs")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Where the samples and the grid go."""
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


def check_args(args) -> None:
    """Refuse counts that cannot work, before any model is loaded."""
    for flag in ("num_inference_steps", "num_images", "batch_size"):
        value = getattr(args, flag)
        if value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}.")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}.")
    count = len(args.controlnet)
    for flag in ("conditioning_scale", "control_guidance_start", "control_guidance_end"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, count):
            raise ConfigError(
                f"--{flag} has {len(values)} values for {count} side network(s); give one, or "
                "one per network in their order."
            )
    if count == 1 and len(args.conditioning_image_column) != 1:
        raise ConfigError(
            "one side network reads one --conditioning_image_column; give several with several "
            "--controlnet folders."
        )


def check_video_args(args) -> None:
    """Refuse composition flags for condition videos: video side networks are not composed."""
    composing = [
        f"--{flag}"
        for flag in ("conditioning_scale", "control_guidance_start", "control_guidance_end")
        if getattr(args, flag, None) is not None
    ]
    if len(args.controlnet) > 1:
        composing.insert(0, f"{len(args.controlnet)} --controlnet folders")
    if composing:
        raise ConfigError(
            f"the conditions are videos, which take one side network without a scale or a "
            f"guidance window ({', '.join(composing)} given); video side networks are not "
            "composed."
        )


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
    from ..eval.generate import SideNetworkSampler
    from ..eval.video import names_videos
    from ..families.loading import load_main_model

    check_args(args)
    if names_videos(args.image, args.conditioning_video_column):
        check_video_args(args)
        from .sample_video import generate_videos

        return generate_videos(args, prompts_for, DEFAULT_OUTPUT)
    several = len(args.controlnet) > 1
    conditions, groups = read_condition_sources(args)
    prompts = prompts_for(conditions, args.prompt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    resolution = args.resolution or model.resolution
    model.check_resolution(resolution)
    sampler = SideNetworkSampler(
        model,
        args.controlnet if several else args.controlnet[0],
        args.side_network,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        device=device,
        allow_pickle=args.allow_pickle,
        conditioning_scale=_one_or_list(args.conditioning_scale),
        control_guidance_start=_one_or_list(args.control_guidance_start),
        control_guidance_end=_one_or_list(args.control_guidance_end),
    )
    per_network = condition_batches(sampler, groups, resolution)
    tensors = per_network if several else per_network[0]
    sampler.check_conditions(tensors)
    return write_samples(args, sampler, tensors, per_network, conditions, prompts)


def read_condition_sources(args) -> tuple[list, list[list]]:
    """(one condition per sample, the sample's conditions one per side network) from
    ``--image``; the first of each group names the sample and holds its caption."""
    from ..eval.conditions import read_condition_groups, read_conditions

    if len(args.controlnet) > 1:
        groups = read_condition_groups(
            args.image,
            len(args.controlnet),
            args.conditioning_image_column,
            args.caption_column or None,
        )
        return [group[0] for group in groups], groups
    conditions = read_conditions(
        args.image, args.conditioning_image_column[0], args.caption_column or None
    )
    return conditions, [[c] for c in conditions]


def condition_batches(sampler, groups: list[list], resolution: int) -> list:
    """One condition batch per side network, with that network's channels."""
    from ..eval.conditions import load_condition_tensors

    channels = sampler.condition_channels
    channels = channels if isinstance(channels, list) else [channels]
    return [
        load_condition_tensors([g[k] for g in groups], resolution, channels[k])
        for k in range(len(channels))
    ]


def write_samples(args, sampler, tensors, per_network, conditions, prompts) -> Path:
    """Sample ``--num_images`` per condition; write the PNGs and the grid (every network's
    condition, then the samples, one row per condition); returns the grid's path."""
    from PIL import Image

    from ..eval.images import image_grid, to_uint8

    shown = [to_uint8(t, signed=False) for t in per_network]
    rows = [[images[i] for images in shown] for i in range(len(conditions))]
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


def _one_or_list(values):
    """A flag's values as the sampler takes them: None, one number, or a list."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def main(argv=None) -> None:
    generate(build_parser().parse_args(argv))
