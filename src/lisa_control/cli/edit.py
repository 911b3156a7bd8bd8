"""``lisa edit``: restore or edit images with a pretrained diffusion or flow model (CODE, or the
SDEdit baseline), optionally guided by a trained side network and its condition.

Every input image gives one output of the same file name in ``--output_dir``, plus a sheet PNG
with one row per input: input | output (clean | corrupted | output with ``--corruption``; the
condition before the output with ``--condition``). Images are edited at their own size unless
``--resolution`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SHEET_ROWS = 64  # the sheet shows the first inputs only


def build_parser() -> argparse.ArgumentParser:
    from ..editing import code as c
    from ..editing.corruptions import available_corruptions

    p = argparse.ArgumentParser(prog="lisa edit", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders of them")
    p.add_argument("--output_dir", required=True, help="one output per input, same file name")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="embedded:NAME, a `lisa pretrain` folder, a diffusers folder or hub id "
                   "(Stable Diffusion, SD3, Flux, DDPM/DDIM UNet2DModel pipelines)")  # fmt: skip
    p.add_argument("--task", default=None, help="embedded task whose shipped main network to use")
    p.add_argument("--method", choices=["code", "sdedit"], default="code")
    p.add_argument("--t0", type=float, default=c.DEFAULT_T0,
                   help="latent time in (0, 1]: shallow for noise and blur, deeper for fog and "
                   "contrast (the authors' default latent is 0.2: index 100 of 500)")  # fmt: skip
    p.add_argument("--eta", type=float, default=1.7, help="confidence interval width (CODE)")
    p.add_argument("--langevin_steps", type=int, default=c.DEFAULT_LANGEVIN_STEPS,
                   help="noisy Langevin updates at t0 (0: plain ODE editing)")  # fmt: skip
    p.add_argument(
        "--step_size",
        type=float,
        default=c.DEFAULT_STEP_SIZE,
        help="base Langevin step, times 100^(1 - t0); the authors sweep 1e-5 .. 2e-3",
    )
    p.add_argument("--anneal_stages", type=int, default=c.DEFAULT_ANNEAL_STAGES)
    p.add_argument("--anneal_factor", type=float, default=c.DEFAULT_ANNEAL_FACTOR)
    p.add_argument("--clip_encode", action=argparse.BooleanOptionalAction, default=True,
                   help="confidence-based clipping while encoding (CODE)")  # fmt: skip
    p.add_argument(
        "--clip_decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dynamic thresholding of the predicted x0 while correcting and decoding",
    )
    p.add_argument("--threshold_quantile", type=float, default=0.98)
    p.add_argument("--threshold_max", type=float, default=1.3)
    p.add_argument("--num_inference_steps", type=int, default=c.DEFAULT_INFERENCE_STEPS,
                   help="grid spacing in steps over the whole diffusion; round(t0 x this) steps "
                   "are taken each way")  # fmt: skip
    p.add_argument("--encode_noise", type=float, default=c.ENCODE_NOISE)
    p.add_argument("--sdedit_sampler", choices=["ancestral", "ddim"], default="ancestral")
    p.add_argument("--latent_bound", type=float, default=None,
                   help="latent models: the bound B of the scaled latents, which turns the "
                   "clipping and thresholding on (off without it)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--controlnet", default=None, help="a trained side network folder (diffusers)")
    p.add_argument("--side_network", choices=["controlnet", "t2i_adapter"], default="controlnet")
    p.add_argument("--condition", nargs="+", default=None,
                   help="condition images: one per input, one for all, or a folder with the "
                   "inputs' file names")  # fmt: skip
    p.add_argument("--conditioning_scale", type=float, default=1.0)
    p.add_argument(
        "--corruption",
        default=None,
        help=f"corrupt the inputs first: {', '.join(available_corruptions())}",
    )
    p.add_argument("--severity", type=int, default=3, help="corruption severity, 1..5")
    p.add_argument("--prompt", nargs="+", default=None, help="for models with text encoders")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize (shorter side) and centre-crop inputs to this size")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sheet", default=None, help="the before/after sheet (default OUT/sheet.png)")
    p.add_argument("--allow_pickle", action="store_true")
    p.add_argument("--device", default=None)
    return p


# ----------------------------------------------------------------------------- files


def list_images(entries: list[str], what: str = "input") -> list[Path]:
    """Image files named directly or found (not recursively) in folders, in the given order,
    each folder sorted by name."""
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
            if not found:
                raise DataError(
                    f"no images in {what} folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})."
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{what} {path} does not exist; pass image files or a folder of them.")
    return files


def _pixels(image, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """A PIL RGB image resized (bilinear) to height x width, as (C, H, W) in [0, 1]."""
    from PIL import Image

    from ..data.images import to_channels

    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(to_channels(image, channels), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_inputs(files: list[Path], model, resolution: int | None) -> list[torch.Tensor]:
    """Each input as (3, H, W) in [-1, 1], refusing sizes the model cannot take."""
    from ..data.images import load_image, to_image_tensor
    from ..editing.models import check_image_size

    if resolution is not None:
        model.check_resolution(resolution, "--resolution")
        check_image_size(model, resolution, resolution, "--resolution")
    images = []
    for path in files:
        image = load_image(path, role="image")
        if resolution is not None:
            images.append(to_image_tensor(image, resolution))
            continue
        check_image_size(model, image.height, image.width, f"input {path.name}")
        images.append(_pixels(image, image.height, image.width) * 2 - 1)
    return images


def load_conditions(entries: list[str], inputs: list[Path], images, channels: int):
    """One condition (C, H, W) in [0, 1] per input, at the input's size."""
    from ..data.images import load_image

    if len(entries) == 1 and Path(entries[0]).expanduser().is_dir():
        folder = Path(entries[0]).expanduser()
        paths = []
        for path in inputs:
            match = folder / path.name
            if not match.is_file():
                raise DataError(
                    f"no condition for input {path.name}: {match} does not exist (a condition "
                    "folder holds one image per input, with the input's file name)."
                )
            paths.append(match)
    else:
        paths = list_images(entries, "condition")
        if len(paths) == 1:
            paths = paths * len(inputs)
        if len(paths) != len(inputs):
            raise ConfigError(
                f"give one condition, one per input ({len(inputs)}), or a folder of conditions "
                f"named as the inputs; got {len(paths)}."
            )
    conditions = []
    for path, image in zip(paths, images):
        height, width = image.shape[-2:]
        conditions.append(_pixels(load_image(path), height, width, channels))
    return conditions


def _check_outputs(files: list[Path], out: Path, sheet: Path) -> None:
    names = [p.name for p in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"inputs share file names ({', '.join(duplicates[:3])}); outputs are written under "
            "the input's name, so give inputs with distinct names."
        )
    targets = {(out / n).resolve() for n in names}
    if any(p.resolve() in targets for p in files):
        raise ConfigError(
            f"--output_dir {out} would overwrite the inputs; write the outputs to another folder."
        )
    if sheet.resolve() in targets:
        raise ConfigError(f"the sheet {sheet} has an input's name; pass --sheet another path.")


# ----------------------------------------------------------------------------- the command


def _settings(args) -> dict:
    common = dict(
        t0=args.t0,
        num_inference_steps=args.num_inference_steps,
        clip_decode=args.clip_decode,
        threshold=(args.threshold_quantile, args.threshold_max),
        data_bound=args.latent_bound,
    )
    if args.method == "sdedit":
        return common | {"stochastic": args.sdedit_sampler == "ancestral"}
    return common | dict(
        eta=args.eta,
        langevin_steps=args.langevin_steps,
        step_size=args.step_size,
        anneal_stages=args.anneal_stages,
        anneal_factor=args.anneal_factor,
        clip_encode=args.clip_encode,
        encode_noise=args.encode_noise,
    )


def edit(args) -> Path:
    """Check the settings and inputs, load the model, restore every input, write the outputs."""
    settings = _check_args(args)
    files = list_images(args.input)
    if args.prompt and len(args.prompt) not in (1, len(files)):
        raise ConfigError(f"give one --prompt, or one per input ({len(files)}).")
    out = Path(args.output_dir).expanduser()
    sheet_path = Path(args.sheet).expanduser() if args.sheet else out / "sheet.png"
    _check_outputs(files, out, sheet_path)
    model, branch = _load_models(args)
    images = load_inputs(files, model, args.resolution)
    clean = None
    if args.corruption is not None:
        from ..editing.corruptions import corrupt

        clean = images
        images = [
            corrupt(x[None], args.corruption, args.severity, seed=args.seed + i)[0]
            for i, x in enumerate(images)
        ]
    conditions = None
    if branch is not None:
        channels = 3 if model.condition_in_latent_space else branch.condition_channels
        conditions = load_conditions(args.condition, files, images, channels)
    outputs = _restore(args, settings, model, branch, images, conditions)
    _write(files, out, sheet_path, outputs, images, clean, conditions)
    return out


def _check_args(args) -> dict:
    """The method's keyword settings, after every flag was checked."""
    from ..editing import check_settings
    from ..editing.corruptions import check_corruption

    check_settings(
        t0=args.t0,
        eta=args.eta,
        langevin_steps=args.langevin_steps,
        step_size=args.step_size,
        anneal_stages=args.anneal_stages,
        anneal_factor=args.anneal_factor,
        threshold=(args.threshold_quantile, args.threshold_max),
        num_inference_steps=args.num_inference_steps,
        encode_noise=args.encode_noise,
        data_bound=args.latent_bound,
    )
    if args.corruption is not None:
        check_corruption(args.corruption, args.severity)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if (args.controlnet is None) != (args.condition is None):
        raise ConfigError("--controlnet and --condition go together: pass both or neither.")
    return _settings(args)


def _load_models(args):
    """(the main model on the device, the branch with the side network or None)."""
    from ..editing.models import load_edit_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_edit_model(
        args.pretrained_model_name_or_path, args.task, allow_pickle=args.allow_pickle
    )
    model.main_network.to(device).eval()
    if model.vae is not None:
        model.vae.to(device).eval()
    if not model.is_pixel_space and args.latent_bound is None and args.method == "code":
        print("latent model: confidence clipping and x0 thresholding are off (latents have no "
              "fixed range); pass --latent_bound B to turn them on.")  # fmt: skip
    if args.controlnet is None:
        return model, None
    from ..families import branch_class
    from ..families.loading import load_side_network

    cls = branch_class(model.family, args.side_network)
    side = load_side_network(args.controlnet, args.allow_pickle, cls.side_network_class)
    return model, cls(model.main_network, side).to(device).eval()


def _restore(args, settings, model, branch, images, conditions) -> list[torch.Tensor]:
    """The method's output per input, in input order, batched among equally sized images."""
    from ..editing import METHODS

    method = METHODS[args.method]
    generator = torch.Generator("cpu").manual_seed(args.seed)
    outputs: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), args.batch_size):
            chunk = indices[start : start + args.batch_size]
            batch = torch.stack([images[i] for i in chunk])
            extra = {}
            if branch is not None:
                extra = dict(
                    branch=branch,
                    condition=torch.stack([conditions[i] for i in chunk]),
                    conditioning_scale=args.conditioning_scale,
                )
            prompts = None
            if args.prompt:
                prompts = [args.prompt[i] for i in chunk] if len(args.prompt) > 1 else args.prompt
            restored = method(model, batch, generator=generator, prompts=prompts, **settings,
                              **extra)  # fmt: skip
            for i, y in zip(chunk, restored.cpu()):
                outputs[i] = y
    return outputs


def _write(files, out, sheet_path, outputs, images, clean, conditions) -> None:
    """One output per input under its name (the corrupted inputs under corrupted/) and the
    before/after sheet."""
    from PIL import Image

    from ..eval.images import image_grid, to_uint8

    out.mkdir(parents=True, exist_ok=True)
    if clean is not None:
        (out / "corrupted").mkdir(exist_ok=True)
    rows = []
    for i, path in enumerate(files):
        output = to_uint8(outputs[i][None])[0]
        _save(output, out / path.name)
        row = [to_uint8(images[i][None])[0]]
        if clean is not None:
            _save(row[0], out / "corrupted" / path.name)
            row.insert(0, to_uint8(clean[i][None])[0])
        if conditions is not None:
            row.append(to_uint8(conditions[i][None], signed=False)[0])
        rows.append(row + [output])
    sheet_rows = rows[:SHEET_ROWS]
    height, width = sheet_rows[0][0].shape[:2]
    sheet_rows = [
        [
            img if img.shape[:2] == (height, width)
            else np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))
            for img in row
        ]
        for row in sheet_rows
    ]  # fmt: skip
    sheet_path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(sheet_rows).save(sheet_path)
    print(f"wrote {len(files)} images to {out} and the sheet {sheet_path}")


def _save(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(pixels)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def main(argv=None) -> None:
    edit(build_parser().parse_args(argv))
