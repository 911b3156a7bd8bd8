"""``lisa sample`` for video models (AnimateDiff, Wan VACE): condition videos in, animations out.

Conditions are video files (``.mp4`` through PyAV, animated ``.gif``/``.webp``) or a
``metadata.jsonl`` whose condition-video column (``--conditioning_video_column``) names files or
folders of frames, with the caption column as the prompt. Each is cut to the model's resolution
frame by frame; ``--num_frames`` takes the first F frames of each (default: all, the same count
for every condition; Wan VACE takes 4k + 1). Noise is seeded per condition as for images
(``eval/generate.py``), with as many latent frames as the family's VAE makes of the clip.

Outputs: ``--output_dir`` gets ``NAME.gif`` per sample (``NAME_K.gif`` with ``--num_images``
K > 1), ``grid.gif`` (the animated grid: condition | samples, one row per condition) and
``grid_frames.png`` (the frame sheet: one line of frames per video of the grid); ``--output``
names the sheet (a ``.png``) and the animation beside it (``.gif``), or the reverse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import ConfigError


def output_paths(output: str) -> tuple[Path, Path]:
    """(GIF, frame sheet) for ``--output``: ``x.gif`` -> (x.gif, x_frames.png); anything else
    -> (its .gif sibling, itself)."""
    path = Path(output)
    if path.suffix.lower() == ".gif":
        return path, path.with_name(f"{path.stem}_frames.png")
    return path.with_suffix(".gif"), path


def generate_videos(args, prompts_for, default_output: str) -> Path:
    """``lisa sample`` with condition videos; returns the animated grid's path. ``prompts_for``
    and ``default_output`` are ``cli.sample``'s (passed in: that module imports this one)."""
    from ..eval.generate import SideNetworkSampler
    from ..eval.video import (
        condition_video_tensors,
        read_condition_videos,
        save_gif,
        video_to_uint8,
        write_animation,
    )
    from ..families.loading import load_main_model

    num_frames = getattr(args, "num_frames", None)
    if num_frames is not None and num_frames < 1:
        raise ConfigError(f"--num_frames must be >= 1, got {num_frames}.")
    # ``lisa sample`` parses --controlnet as a list (several compose); video side networks are
    # not composed, so it holds one here.
    controlnet = args.controlnet
    if isinstance(controlnet, (list, tuple)):
        if len(controlnet) != 1:
            raise ConfigError(
                f"condition videos take one --controlnet, got {len(controlnet)}; video side "
                "networks are not composed."
            )
        controlnet = controlnet[0]
    column = getattr(args, "conditioning_video_column", "conditioning_video")
    videos = read_condition_videos(args.image, column, args.caption_column or None)
    prompts = prompts_for(videos, args.prompt)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_main_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    if not model.family.takes_video:
        raise ConfigError(
            f"the conditions are videos but the main network ({model.family.name}) generates "
            "images; pass a video model (AnimateDiff, Wan VACE) or still condition images."
        )
    resolution = args.resolution or model.resolution
    model.check_resolution(resolution)
    sampler = SideNetworkSampler(
        model,
        controlnet,
        args.side_network,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        device=device,
        allow_pickle=args.allow_pickle,
    )
    tensors = condition_video_tensors(videos, resolution, sampler.condition_channels, num_frames)
    sampler.check_conditions(tensors)
    fps = getattr(args, "fps", None) or 8
    rows = [[c] for c in video_to_uint8(tensors, signed=False)]
    out_dir = Path(args.output_dir) if args.output_dir else None
    for k in range(args.num_images):
        samples = sampler(tensors, prompts, seed=args.seed, draw=k, batch_size=args.batch_size)
        for row, video, frames in zip(rows, videos, video_to_uint8(samples)):
            row.append(frames)
            if out_dir is not None:
                name = video.name if args.num_images == 1 else f"{video.name}_{k}"
                save_gif([_image(f) for f in frames], out_dir / f"{name}.gif", fps)
    written = []
    if out_dir is not None:
        written += write_animation(rows, out_dir / "grid.gif", out_dir / "grid_frames.png", fps)
    if args.output or out_dir is None:
        written += write_animation(rows, *output_paths(args.output or default_output), fps)
    count = len(videos) * args.num_images
    where = f"{count} video(s) in {out_dir} and " if out_dir is not None else ""
    print(f"wrote {where}{', '.join(map(str, written))}")
    return written[-2]  # the last animation written


def _image(frame):
    from PIL import Image

    return Image.fromarray(frame)
