"""``lisa pretrain``: train a small pixel-space main network from scratch on a task's images or
your own.

This is how the project makes the frozen "foundation" networks its embedded default and
benchmarks start from, since no pretrained model can be downloaded here. The network is a
diffusers ``UNet2DConditionModel`` (``--architecture unet``, DDPM eps or v objective) or a tiny
``SD3Transformer2DModel`` flow DiT (``--architecture dit``, rectified flow), conditioned on a
constant null text context, so every ControlNet tool works on it unchanged. The images of several
tasks can be mixed (``--task edges,segmentation``) to make one network serve them all. A video
task (``--task pose_video``) trains an AnimateDiff ``UNetMotionModel`` on its clips
(``--architecture motion_unet``, the default there); ``--init_from embedded:pose`` gives it the
shipped image UNet's spatial layers and new motion modules, and ``--motion_modules_only`` trains
only those, as AnimateDiff does.

Instead of a task, ``--train_data_dir`` (a folder of images, with or without metadata.jsonl) or
``--dataset_name`` (a Hugging Face dataset, or a folder ``datasets`` reads) trains on your own
images, unconditionally. With ``--text_encoder`` (a CLIP text model folder) and
``--caption_column`` the UNet learns the captions, and the saved model holds the text encoder.

Writes ``output_dir/model`` (a folder ``lisa train --pretrained_model_name_or_path`` takes, EMA
weights), ``loss_log.jsonl``, ``curve.jsonl`` (realism of samples vs step), ``samples/step-N.png``
(videos: ``step-N.gif`` and ``step-N_frames.png``) and ``training_curve.png``.
"""

from __future__ import annotations

import argparse

from ..training.pretrain import pretrain


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default=None, help="task name, or several joined by commas (or give data)"
    )
    p.add_argument(
        "--train_data_dir",
        default=None,
        help="a folder of your images: plain image files, or metadata.jsonl naming them",
    )
    p.add_argument(
        "--dataset_name", default=None, help="a Hugging Face dataset, or a folder datasets reads"
    )
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--image_column", default="image", help="the images' column in the data")
    p.add_argument("--max_train_samples", type=int, default=None, help="use this many images")
    p.add_argument(
        "--text_encoder",
        default=None,
        help="a CLIP text model folder (with its tokenizer) to train on captions; it is saved "
        "with the model",
    )
    p.add_argument(
        "--caption_column", default=None, help="the captions' column (default: text); needs "
        "--text_encoder"
    )  # fmt: skip
    p.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=None,
        help="captions replaced by the empty one, for classifier-free guidance (default 0.1)",
    )
    _network_arguments(p)
    _training_arguments(p)
    p.add_argument("--device", default=None)
    p.add_argument("--output_dir", required=True)
    return p


def _network_arguments(p) -> None:
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[48, 96, 96])
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--cross_attention_dim", type=int, default=32)
    p.add_argument(
        "--architecture",
        choices=["unet", "dit", "motion_unet"],
        default=None,
        help="default: motion_unet (a UNetMotionModel) for video tasks, unet otherwise",
    )
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="frames per clip of a video task (default: the task's, 8 for pose_video)",
    )
    p.add_argument(
        "--motion_modules_only",
        action="store_true",
        help="train only a motion UNet's motion modules, keeping its spatial layers (those of "
        "--init_from) as they are",
    )
    p.add_argument(
        "--objective",
        choices=["epsilon", "v_prediction", "flow"],
        default=None,
        help="default: epsilon for unet, flow for dit",
    )
    p.add_argument("--dit_layers", type=int, default=6)
    p.add_argument("--dit_heads", type=int, default=4)
    p.add_argument("--dit_head_dim", type=int, default=32)


def _training_arguments(p) -> None:
    p.add_argument(
        "--train_size", type=int, default=20_000, help="task images rendered once (--task)"
    )
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--regularizer", choices=["none", "layersync"], default="none")
    p.add_argument("--layersync_pairs", default=None)
    p.add_argument("--layersync_weight", type=float, default=0.2)
    p.add_argument("--sample_every", type=int, default=500)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument(
        "--feature_distance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also score samples by the task-feature Fréchet distance (not Inception FID; "
        "--task only); default: on with CUDA, off on CPU, where training its feature network "
        "takes minutes",
    )
    p.add_argument("--feature_network_steps", type=int, default=1500)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time_budget_s", type=float, default=None, help="stop (and save) after this long"
    )
    p.add_argument(
        "--save_dtype", choices=["fp32", "fp16"], default="fp32", help="fp16 halves the file"
    )
    p.add_argument(
        "--init_from",
        default=None,
        help="continue from a main network `lisa pretrain` wrote (a folder, or embedded:TASK for "
        "a shipped one); its own architecture and objective replace the size flags",
    )
    p.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the network's blocks (GPU; the first steps take longer)",
    )
    p.add_argument("--torch_compile_backend", default="inductor")


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The flags that reproduce ``args`` (what the saved model records as its command)."""
    negatable = {
        a.dest for a in build_parser()._actions if isinstance(a, argparse.BooleanOptionalAction)
    }
    parts = []
    for key, value in vars(args).items():
        if value is None or key == "output_dir":
            continue
        if isinstance(value, bool):
            if value or key in negatable:
                parts.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            parts += [f"--{key}", *map(str, value)]
        else:
            parts += [f"--{key}", str(value)]
    return parts


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    pretrain(args, command="lisa pretrain " + " ".join(_argv_of(args)))
