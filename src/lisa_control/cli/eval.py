"""``lisa eval``: sample a test split with a trained side network (or every checkpoint of a run)
and score the samples: condition fidelity (an embedded task's own metric, or a condition
re-extracted from each sample), a Fréchet distance and, with a local CLIP model, a CLIP score.
Writes eval.json, samples.png (video models: samples.gif and samples_frames.png) and, for a
checkpoint series, curve.json and curve.png.

Several side networks (``--controlnet A B``, or a run that trained one per condition) are
composed as ``lisa sample`` composes them and scored on a task with one condition per network
(pose_segmentation: PCK of the figure, mIoU of the background, their mean ``fidelity``);
``--each_alone`` also scores each network alone and reports the interference it suffers from
the others (its condition's metric alone minus composed).

  lisa eval --controlnet OUT/controlnet --task pose --output_dir eval/
  lisa eval --checkpoints 'OUT/checkpoint-*' --test_data_dir test/ --extractor edges \\
      --pretrained_model_name_or_path MODEL --threshold 0.6 --output_dir eval/
  lisa eval --checkpoints 'VIDEO_RUN/checkpoint-*' --task pose_video --output_dir eval/
  lisa eval --checkpoints JOINT_RUN --each_alone --output_dir eval/
  lisa eval --controlnet POSE_RUN SEG_RUN --conditioning_scale 1.0 0.8 --each_alone \\
      --task pose_segmentation --output_dir eval/
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..families import side_network_kinds
from .sample import add_composition_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lisa eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    _side_network_arguments(p)
    _data_arguments(
        p.add_argument_group("test split (one of; neither: the task the main model names)")
    )
    _video_arguments(p.add_argument_group("video models (AnimateDiff)"))
    _sampling_arguments(p.add_argument_group("sampling"))
    _metric_arguments(p.add_argument_group("metrics"))
    p.add_argument("--sheet_rows", type=int, default=16, help="rows of samples.png")
    p.add_argument("--allow_pickle", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _side_network_arguments(p) -> None:
    which = p.add_argument_group("side networks (one of)")
    which.add_argument(
        "--controlnet",
        nargs="+",
        default=None,
        help="a side network folder (diffusers), a folder holding several (a joint run's "
        "controlnet/) or a `lisa train` output folder; several folders are composed (their "
        "residuals summed, as `lisa sample --controlnet A B`)",
    )
    which.add_argument(
        "--checkpoints",
        nargs="+",
        default=None,
        help="checkpoint folders of a `lisa train` run: a quoted glob such as "
        "'OUT/checkpoint-*', folders, or the run's output folder; each is evaluated and the "
        "metric plotted against the step (a run that trained several side networks: all of "
        "them composed)",
    )
    add_composition_flags(p.add_argument_group("several side networks"))
    p.add_argument(
        "--each_alone",
        action="store_true",
        help="several side networks: also sample each alone (its scale and window kept) and "
        "report NAME_interference, its condition's metric alone minus composed",
    )
    p.add_argument(
        "--side_network",
        choices=side_network_kinds(),
        default=None,
        help="what kind of side network it is (default: the run's, else controlnet)",
    )
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="main model (default: the run's config.json beside the checkpoints, else the "
        "shipped model of --task)",
    )


def _data_arguments(data) -> None:
    data.add_argument(
        "--task", default=None, help="an embedded task: its held-out conditions and metric"
    )
    data.add_argument(
        "--test_data_dir",
        default=None,
        help="a folder with metadata.jsonl (image, conditioning_image, text), or whose test/ "
        "sub-folder has one, or a `datasets` folder (see --split)",
    )
    data.add_argument("--split", default="test", help="split of a `datasets` folder")
    data.add_argument("--image_column", default="image")
    data.add_argument(
        "--conditioning_image_column",
        nargs="+",
        default=["conditioning_image"],
        help="metadata column of the condition images; with a task of several conditions, the "
        "condition each side network takes, in the networks' order (default: the ones they "
        "were trained on, else the task's in order)",
    )
    data.add_argument(
        "--caption_column", default="text", help="prompts; '' for a split without captions"
    )
    data.add_argument(
        "--num_conditions",
        type=int,
        default=None,
        help="conditions to sample (default: 64 held-out ones for a task; every row of a "
        "folder, else this many rows chosen with --seed)",
    )


def _video_arguments(video) -> None:
    video.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="frames per clip (default: the run's --num_frames, else the task's, else 8)",
    )
    video.add_argument("--video_column", default="video", help="metadata column of the test videos")
    video.add_argument(
        "--conditioning_video_column",
        default="conditioning_video",
        help="metadata column of the condition videos",
    )
    video.add_argument(
        "--frame_stride", type=int, default=1, help="take every n-th frame of a test video"
    )
    video.add_argument(
        "--frame_rate",
        type=float,
        default=None,
        help="sample test videos at this rate (frames per second), from each row's --fps_column; "
        "also the rate of the written GIFs (default 8)",
    )
    video.add_argument("--fps_column", default="fps", help="metadata column of the frame rates")


def _sampling_arguments(gen) -> None:
    gen.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    gen.add_argument("--num_inference_steps", type=int, default=20)
    gen.add_argument("--guidance_scale", type=float, default=None)
    gen.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="conditions sampled together (same noise per condition)",
    )
    gen.add_argument("--seed", type=int, default=0, help="seeds each condition's noise")


def _metric_arguments(score) -> None:
    score.add_argument(
        "--extractor",
        choices=["edges", "pose", "depth", "segmentation"],
        default=None,
        help="re-extract the condition from each sample (user data): edges built in; pose, "
        "depth and segmentation need controlnet_aux and its weights",
    )
    score.add_argument(
        "--extractor_weights",
        default=None,
        help="controlnet_aux annotator weights: a local copy of lllyasviel/Annotators (pose, "
        "depth) or of ybelkada/segment-anything (segmentation)",
    )
    score.add_argument("--edge_low_threshold", type=float, default=100.0)
    score.add_argument("--edge_high_threshold", type=float, default=200.0)
    score.add_argument(
        "--edge_tolerance", type=int, default=1, help="pixels an edge may be off and still count"
    )
    score.add_argument(
        "--no_frechet", action="store_true", help="skip the Fréchet distance (and its training)"
    )
    score.add_argument(
        "--inception_weights",
        default=None,
        help="FID Inception weights as a local file: Inception FID through torchmetrics "
        "(needs torchmetrics and torch-fidelity) instead of the task feature network",
    )
    score.add_argument(
        "--feature_train_steps",
        type=int,
        default=1500,
        help="training steps of the feature network the Fréchet distance uses",
    )
    score.add_argument(
        "--feature_pool",
        type=int,
        default=None,
        help="task renders it trains on (tasks; default 4096 images or 512 clips)",
    )
    score.add_argument(
        "--feature_reference_size",
        type=int,
        default=1024,
        help="task renders (clips for a video task) the samples are compared with (tasks; user "
        "data: the test images or clips)",
    )
    score.add_argument("--clip_model", default=None, help="a local CLIP folder: CLIP score")
    score.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="checkpoint series: report the first step whose metric reaches this value",
    )
    score.add_argument(
        "--curve_metric",
        default=None,
        help="the metric of the curve and threshold (default: the fidelity metric, else the "
        "Fréchet distance)",
    )


def config_from_args(args, argv) -> object:
    from ..eval.evaluate import EvalConfig

    values = vars(args).copy()
    progress = values.pop("progress")
    values["frechet"] = not values.pop("no_frechet")
    values["caption_column"] = values["caption_column"] or None
    for flag in ("controlnet", "conditioning_image_column", "conditioning_scale",
                 "control_guidance_start", "control_guidance_end"):  # fmt: skip
        if values[flag] is not None and len(values[flag]) == 1:
            values[flag] = values[flag][0]  # one value: as the library takes it
    values["command"] = "lisa eval " + shlex.join(argv)
    return EvalConfig(**values), progress


def main(argv=None) -> None:
    from ..eval.evaluate import evaluate

    argv = list(sys.argv[2:] if argv is None else argv)
    cfg, progress = config_from_args(build_parser().parse_args(argv), argv)
    report = evaluate(cfg, progress=progress)
    metrics = report["metrics"]
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(shown)
    for name, scores in report.get("alone", {}).items():
        print(f"{name} alone: " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    if report.get("curve"):
        reached = report["curve"]["steps_to_threshold"]
        if cfg.threshold is not None:
            print(
                f"{report['metric']} reaches {cfg.threshold:g} at step {reached}"
                if reached is not None
                else f"{report['metric']} never reaches {cfg.threshold:g}"
            )
    print(f"wrote {cfg.output_dir}/eval.json")
