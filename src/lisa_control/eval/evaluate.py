"""``lisa eval`` as a library function: sample a test split with one side network or a series
of checkpoints (batched, each condition's noise seeded by (seed, index)) and score the samples.

Test splits:

* an embedded task (``task``, or the task a pixel model's ``lisa_model.json`` names): the
  ``num_conditions`` held-out conditions that validation and the convergence benchmark score
  (:func:`~lisa_control.eval.validation.held_out_task_samples`), scored by the same function
  (:func:`~lisa_control.eval.validation.score_task_samples`, the task's fidelity metric);
* user data (``test_data_dir``): a folder with a ``metadata.jsonl`` (image, conditioning image and
  caption columns, as ``lisa train`` reads; a ``test/`` sub-folder holding one is used too),
  read by :class:`~lisa_control.data.folder.ControlDataset` (centre crops at the resolution);
  with an ``extractor`` the condition is re-extracted from every sample and compared with the
  given one, and from every real test image too (``reference_*``: how well the extractor itself
  reproduces the given conditions, the ceiling of the sample score).

Further metrics: a Fréchet distance (features of the project's feature network, see
``eval/feature_distance.py``, trained on the task's renders or on the test images; or Inception
features with ``inception_weights``) to the task's reference renders or the real test images,
and a CLIP score with a local CLIP folder.

Video side networks (a main network whose family ``takes_video``, such as AnimateDiff) are
evaluated by the same steps on clips: conditions (N, C, F, R, R) and samples (N, 3, F, R, R).
The test split is a video task's held-out clips (``pose_video``: per-frame PCK, temporal
consistency, motion error) or a folder whose ``metadata.jsonl`` names videos and condition
videos (read by :class:`~lisa_control.data.video_folder.VideoControlDataset`, ``num_frames``
frames per clip); the Fréchet distance is the task-feature video Fréchet distance
(``video_frechet_distance``, see ``eval/video_features.py``); an extractor and the CLIP score
are taken frame by frame and averaged over each clip's frames.

Several side networks (``--controlnet A B``, a folder holding several, or the checkpoints of a
run that trained one per condition) are composed as ``lisa sample`` composes them, each with its
``conditioning_scale`` and guidance window, and scored on a task with one condition per network
(``pose_segmentation``): the task's metrics of the composed samples (PCK, mIoU, their mean
``fidelity``), and with ``each_alone`` every network's samples alone and its interference
(``<name>_interference``). Which network takes which condition, and the interference, are
:mod:`lisa_control.eval.composition`'s.

Outputs in ``output_dir``: ``eval.json`` (command, settings, test split, metrics, per-condition
scores, and the per-checkpoint metrics of a series; for a composition also ``composition``, each
network's name, path, metric, scale and window, and with ``each_alone`` its scores ``alone``),
``samples.png`` (condition(s) | sample [| each network alone] | real image [| re-extracted
condition] per row; for videos ``samples.gif``, those rows animated, and ``samples_frames.png``,
each clip's frames side by side), and for a series ``samples-step-N.png`` (``.gif`` and
``_frames.png``), ``curve.json`` and ``curve.png`` (the metric against the training step, with
the first step that reaches ``threshold``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CheckpointError, ConfigError, DataError, ModelError
from ..core.files import write_text_atomically
from ..data.multi import DEFAULT_COLUMN, condition_columns
from .composition import SideNetworkFolder, networks_in
from .curves import find_checkpoints, plot_curve, steps_to_threshold
from .images import image_grid, to_uint8
from .video import DEFAULT_FPS

DEFAULT_TASK_CONDITIONS = 64
# Frames per clip of a video test folder when neither --num_frames nor the run sets it (what
# `lisa train` takes from a video folder).
DEFAULT_NUM_FRAMES = 8
# Metrics where smaller is better; every other one is better when larger.
LOWER_IS_BETTER = {
    "frechet_distance",
    "video_frechet_distance",
    "depth_mae",
    "joint_error",
    "motion_error",
}
# User images are scaled down to at most this size for the feature network (it pools globally,
# so any size works; this bounds its training cost on large photos).
FEATURE_MAX_SIZE = 128


@dataclass
class EvalConfig:
    """What ``lisa eval`` does; the CLI flags of the same names. ``controlnet`` (one folder or
    several, composed) or ``checkpoints`` names the side network(s); ``task`` or
    ``test_data_dir`` the test split (neither: the task the main model names). Unset model
    settings (``side_network``, ``pretrained_model_name_or_path``, ``task``, ``resolution``) are
    taken from the training run's ``config.json`` above the checkpoints or the side network,
    when there is one. Several side networks (``conditioning_scale``, ``control_guidance_*``,
    ``each_alone``) are described in :mod:`lisa_control.eval.composition`."""

    output_dir: str
    controlnet: str | list[str] | None = None
    checkpoints: list[str] | None = None
    side_network: str | None = None
    pretrained_model_name_or_path: str | None = None
    task: str | None = None
    test_data_dir: str | None = None
    split: str = "test"
    image_column: str = "image"
    conditioning_image_column: str | list[str] = "conditioning_image"
    caption_column: str | None = "text"
    num_conditions: int | None = None
    resolution: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float | None = None
    conditioning_scale: float | list[float] | None = None
    control_guidance_start: float | list[float] | None = None
    control_guidance_end: float | list[float] | None = None
    each_alone: bool = False
    batch_size: int = 8
    seed: int = 0
    extractor: str | None = None
    extractor_weights: str | None = None
    edge_low_threshold: float = 100.0
    edge_high_threshold: float = 200.0
    edge_tolerance: int = 1
    frechet: bool = True
    inception_weights: str | None = None
    feature_train_steps: int = 1500
    feature_pool: int | None = None
    feature_reference_size: int = 1024
    clip_model: str | None = None
    threshold: float | None = None
    curve_metric: str | None = None
    sheet_rows: int = 16
    num_frames: int | None = None
    video_column: str = "video"
    conditioning_video_column: str = "conditioning_video"
    fps_column: str = "fps"
    frame_stride: int = 1
    frame_rate: float | None = None
    allow_pickle: bool = False
    device: str | None = None
    command: str | None = None


@dataclass
class TestSplit:
    """Conditions to sample and what scores the samples.

    ``conditions`` (N, C, R, R) in [0, 1], or for several side networks a list of such, one
    per network in their order (``condition_names``); ``real`` (N, 3, R, R) in [-1, 1], the
    images the conditions belong to; ``indices`` seed each condition's noise. Video splits hold
    clips: (N, C, F, R, R) and (N, 3, F, R, R)."""

    kind: str  # "task" or "folder"
    conditions: torch.Tensor | list[torch.Tensor]
    prompts: list[str]
    names: list[str]
    indices: list[int]
    real: torch.Tensor
    info: dict = field(default_factory=dict)
    task: object = None
    task_samples: list | None = None
    condition_names: list[str] | None = None

    @property
    def condition_batches(self) -> list[torch.Tensor]:
        """The conditions as a list, one batch per side network."""
        return [self.conditions] if torch.is_tensor(self.conditions) else list(self.conditions)

    @property
    def video(self) -> bool:
        return self.condition_batches[0].ndim == 5


# ----------------------------------------------------------------------------- checks


def check_config(cfg: EvalConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if (cfg.controlnet is None) == (not cfg.checkpoints):
        raise ConfigError(
            "pass one of --controlnet DIR (a side network) or --checkpoints 'OUT/checkpoint-*' "
            "(a training run's checkpoints)."
        )
    if cfg.task and cfg.test_data_dir:
        raise ConfigError(
            "pass --task NAME (an embedded task's held-out conditions) or --test_data_dir DIR "
            "(your test split), not both."
        )
    positive = ("num_inference_steps", "batch_size", "feature_train_steps",
                "feature_reference_size", "sheet_rows", "frame_stride")  # fmt: skip
    for flag in positive:
        value = getattr(cfg, flag)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{flag} must be a whole number >= 1, got {value!r}.")
    for flag in ("num_conditions", "num_frames", "feature_pool"):
        value = getattr(cfg, flag)
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"--{flag} must be >= 1, got {value}.")
    if cfg.frame_rate is not None:
        from ..data.video_folder import fps_problem

        if fps_problem(cfg.frame_rate):
            raise ConfigError(
                f"--frame_rate must be a positive number (frames per second), got "
                f"{cfg.frame_rate!r}."
            )
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}.")
    if cfg.extractor and not cfg.test_data_dir:
        raise ConfigError(
            "--extractor scores user data (--test_data_dir DIR); an embedded task is scored by "
            "its own metric."
        )
    if cfg.test_data_dir:
        test_data_source(cfg.test_data_dir)
    for folder in controlnet_folders(cfg):
        if not Path(folder).expanduser().is_dir():
            raise ModelError(
                f"--controlnet {folder} is not a folder; pass a side network folder "
                "(OUTPUT_DIR/controlnet or OUTPUT_DIR/checkpoint-N/side_network), or several."
            )
    columns = condition_columns(cfg.conditioning_image_column)
    if len(columns) == 1:
        cfg.conditioning_image_column = columns[0]
    elif cfg.test_data_dir:
        raise ConfigError(
            f"--conditioning_image_column {' '.join(columns)}: a --test_data_dir split is scored "
            "with one side network and one condition column; composed side networks are scored "
            "on a task with one condition per network (--task pose_segmentation)."
        )


def controlnet_folders(cfg: EvalConfig) -> list[str]:
    """``--controlnet`` as a list (one folder or several)."""
    if cfg.controlnet is None:
        return []
    return [cfg.controlnet] if isinstance(cfg.controlnet, (str, Path)) else list(cfg.controlnet)


def given_columns(cfg: EvalConfig) -> list[str] | None:
    """The conditions ``--conditioning_image_column`` names, or None when left at its default."""
    columns = condition_columns(cfg.conditioning_image_column)
    return None if columns == [DEFAULT_COLUMN] else columns


@dataclass
class Target:
    """The side network(s) of one evaluation: one, or several composed; the step and folder of
    the checkpoint they come from (None: not a checkpoint)."""

    networks: list[SideNetworkFolder]
    step: int | None = None
    checkpoint: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return [n.path for n in self.networks]


def targets_of(cfg: EvalConfig) -> list[Target]:
    """What ``--controlnet`` (its folders' networks, composed when several) or
    ``--checkpoints`` (each checkpoint's networks, the same names in every one) names."""
    if cfg.controlnet is not None:
        networks = [n for folder in controlnet_folders(cfg) for n in networks_in(Path(folder))]
        return [Target(networks)]
    targets = [
        Target(networks_in(side.path, "--checkpoints"), side.step, side.checkpoint)
        for side in find_checkpoints(list(cfg.checkpoints))
    ]
    first = [n.condition for n in targets[0].networks]
    for target in targets[1:]:
        names = [n.condition for n in target.networks]
        if names != first:
            raise CheckpointError(
                f"{target.checkpoint} holds the side networks {_listing(names)} but "
                f"{targets[0].checkpoint} {_listing(first)}; pass the checkpoints of one run."
            )
    return targets


def _listing(names: list) -> str:
    return ", ".join(str(n) if n is not None else "(one)" for n in names)


def fill_from_run(cfg: EvalConfig, run: dict, path: Path | None, notes: list[str]) -> None:
    """Unset model settings from the training run's config (never the test split)."""
    taken = []
    for key in ("side_network", "pretrained_model_name_or_path", "resolution", "num_frames"):
        if getattr(cfg, key) is None and run.get(key) is not None:
            setattr(cfg, key, run[key])
            taken.append(f"{key}={run[key]}")
    if cfg.task is None and cfg.test_data_dir is None and run.get("task"):
        cfg.task = run["task"]
        taken.append(f"task={run['task']}")
    if taken:
        notes.append(f"from {path}: {', '.join(taken)}")
    cfg.side_network = cfg.side_network or "controlnet"


# ----------------------------------------------------------------------------- test splits


def task_split(task, count: int, seed: int) -> TestSplit:
    """The held-out conditions of an embedded task, as validation draws them; their captions are
    the prompts (models without text, such as the shipped ones, get the null context from them,
    as validation does). A video task's are clips, channels first: (C, F, R, R). A view of a
    task with several conditions (``task.conditions``) gives one batch per condition, in its
    order."""
    from .composition import condition_batch
    from .validation import HELD_OUT_SEED, held_out_task_samples

    samples = held_out_task_samples(task, count, seed)
    names = None
    if isinstance(samples[0].condition, dict):
        names = list(task.conditions)
        conditions = [condition_batch(samples, name) for name in names]
    else:
        conditions = torch.stack(
            [torch.from_numpy(s.condition).movedim(-1, 0).float() / 255 for s in samples]
        )
    real = torch.stack(
        [torch.from_numpy(s.image.astype(np.float32)).movedim(-1, 0) / 127.5 - 1 for s in samples]
    )
    return TestSplit(
        kind="task",
        conditions=conditions,
        prompts=[s.caption for s in samples],
        names=[str(i) for i in range(count)],
        indices=list(range(count)),
        real=real,
        info={
            "kind": "task",
            "task": task.name,
            "resolution": task.resolution,
            "held_out_seed": HELD_OUT_SEED + seed,
            "num_conditions": count,
            **({"conditions": names} if names else {}),
            **({"num_frames": task.frames} if getattr(task, "frames", None) else {}),
        },
        task=task,
        task_samples=samples,
        condition_names=names,
    )


def test_data_source(path: str) -> Path:
    """The folder of a test split: ``path`` itself, or its ``test/`` sub-folder when only that
    holds a ``metadata.jsonl``."""
    from ..data.folder import METADATA_FILE

    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(
            f"--test_data_dir {path} does not exist; pass the folder of your test split (a "
            "metadata.jsonl with image, conditioning_image and text columns, paths relative to "
            "it)"
        )
    if not folder.is_dir():
        raise DataError(f"--test_data_dir {path} is a file; pass the folder that holds it")
    if not (folder / METADATA_FILE).is_file() and (folder / "test" / METADATA_FILE).is_file():
        return folder / "test"
    return folder


def folder_split(
    cfg: EvalConfig, resolution: int, channels: int, multiple: int, video: bool = False
) -> TestSplit:
    """The rows of a test folder (all, or ``num_conditions`` of them chosen with the seed, in
    their order), centre-cropped as in training; with ``video``, clips of a folder naming videos
    and condition videos (``num_frames`` frames each, default 8)."""
    from ..data.folder import METADATA_FILE

    source = test_data_source(cfg.test_data_dir)
    try:
        dataset = _test_dataset(cfg, source, resolution, channels, multiple, video)
    except DataError as err:
        raise DataError(
            f"no usable test split in --test_data_dir {cfg.test_data_dir}: {err}"
        ) from None
    total = len(dataset)
    indices = list(range(total))
    if cfg.num_conditions is not None and cfg.num_conditions < total:
        chosen = np.random.default_rng(cfg.seed).permutation(total)[: cfg.num_conditions]
        indices = sorted(int(i) for i in chosen)
    items, problems = [], []
    for i in indices:  # every unusable item is named at once
        try:
            items.append(dataset[i])
        except DataError as err:
            problems.append(str(err))
    if problems:
        from ..data.folder import _listing

        raise DataError(
            f"--test_data_dir {cfg.test_data_dir}: {len(problems)} of {len(indices)} test items "
            f"cannot be used: {_listing(problems)}"
        )
    names = [str(i) for i in indices]
    metadata = source / METADATA_FILE
    if video:
        from .conditions import unique_names

        cells = [dataset.record(i).get(cfg.conditioning_video_column) for i in indices]
        if all(isinstance(c, str) for c in cells):
            names = unique_names([Path(c).stem for c in cells], reserved=())
    elif metadata.is_file():
        from .conditions import metadata_conditions, unique_names

        rows = metadata_conditions(metadata, cfg.conditioning_image_column, None)
        if len(rows) == total:
            names = unique_names([rows[i].path.stem for i in indices], reserved=())
    info = {
        "kind": "folder",
        "path": str(source),
        "rows": total,
        "num_conditions": len(indices),
        "selection_seed": cfg.seed if len(indices) < total else None,
    }
    if video:
        info.update(num_frames=dataset.num_frames, frame_stride=dataset.frame_stride,
                    frame_rate=dataset.frame_rate)  # fmt: skip
    return TestSplit(
        kind="folder",
        conditions=torch.stack([item["conditioning_pixel_values"] for item in items]),
        prompts=[item["caption"] for item in items],
        names=names,
        indices=indices,
        real=torch.stack([item["pixel_values"] for item in items]),
        info=info,
    )


def _test_dataset(cfg: EvalConfig, source: Path, resolution, channels, multiple, video: bool):
    """The dataset that reads the test folder: clips for a video model, images otherwise."""
    if video:
        from ..data.video_folder import VideoControlDataset

        return VideoControlDataset(
            source,
            resolution=resolution,
            num_frames=cfg.num_frames or DEFAULT_NUM_FRAMES,
            frame_stride=cfg.frame_stride,
            frame_rate=cfg.frame_rate,
            video_column=cfg.video_column,
            conditioning_video_column=cfg.conditioning_video_column,
            caption_column=cfg.caption_column,
            fps_column=cfg.fps_column,
            condition_channels=channels,
            seed=cfg.seed,
            resolution_multiple=multiple,
            split=cfg.split,
        )
    from ..data.folder import ControlDataset

    return ControlDataset(
        source,
        resolution=resolution,
        image_column=cfg.image_column,
        conditioning_image_column=cfg.conditioning_image_column,
        caption_column=cfg.caption_column,
        condition_channels=channels,
        seed=cfg.seed,
        resolution_multiple=multiple,
        split=cfg.split,
    )


# ----------------------------------------------------------------------------- scoring


class FrechetScorer:
    """Fréchet distance of samples to the split's real images (the task's reference renders for
    an embedded task), on one set of features prepared once for every checkpoint. Video splits
    get the task-feature video Fréchet distance (``video_frechet_distance``): the frame network
    trained on the frames of the task's clips (or of the real test clips), its features pooled
    with their frame-to-frame changes (``eval/video_features.py``)."""

    def __init__(self, split: TestSplit, cfg: EvalConfig, device, inception=None):
        self.info: dict = {}
        self.inception = inception
        self.network = None
        self.key = "video_frechet_distance" if split.video else "frechet_distance"
        if inception is not None:
            self.real = split.real
            if split.task is not None:
                from .feature_distance import REFERENCE_SEED, render

                self.real = render(split.task, REFERENCE_SEED, cfg.feature_reference_size)
            self.info = {"features": "inception_v3", "backend": "torchmetrics",
                         "reference_size": len(self.real)}  # fmt: skip
            return
        if split.task is not None:
            from .feature_distance import TaskFeatureDistance

            distance = TaskFeatureDistance(
                split.task,
                reference_size=cfg.feature_reference_size,
                train_steps=cfg.feature_train_steps,
                pool=cfg.feature_pool,
                device=device,
            ).prepare()
            self.network, self.accuracy = distance.network, distance.accuracy
            self.reference = distance.reference_features()
            what = f"renders of task {split.task.name}"
        else:
            from .feature_distance import fit_feature_network

            real = _feature_size(split.real)
            self.network, self.accuracy = fit_feature_network(
                real, None, steps=cfg.feature_train_steps, device=device
            )
            self.reference = self._features(split.real)
            what = "the real test clips" if split.video else "the real test images"
        self.info = {
            "features": f"task feature network trained on {what}",
            "feature_train_steps": cfg.feature_train_steps,
            "feature_accuracy": self.accuracy,
            "reference_size": len(self.reference),
        }
        if split.video:
            self.info["features"] = (
                f"task-feature video Fréchet distance (not FVD): frame features of a network "
                f"trained on the frames of {what}, pooled with their frame-to-frame speed and "
                "acceleration"
            )
            self.info["num_frames"] = split.real.shape[2]

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        from .feature_distance import network_features

        return network_features(self.network, _feature_size(images))

    def __call__(self, images: torch.Tensor) -> dict:
        if self.inception is not None:
            return {"frechet_distance": self.inception(self.real, images)}
        from .metrics import frechet_from_features

        value, backend = frechet_from_features(self.reference, self._features(images))
        self.info["backend"] = backend
        if backend != "torchmetrics":
            self.info["note"] = "torchmetrics is not installed: the project's own Fréchet formula"
        return {self.key: value}


def _feature_size(images: torch.Tensor) -> torch.Tensor:
    """Images (or every frame of videos) larger than FEATURE_MAX_SIZE scaled down (antialiased)
    for the feature network."""
    size = max(images.shape[-2:])
    if size <= FEATURE_MAX_SIZE:
        return images
    if images.ndim == 5:
        from .video_features import to_frames

        n, f = images.shape[0], images.shape[2]
        frames = _feature_size(to_frames(images))
        return frames.reshape(n, f, *frames.shape[1:]).transpose(1, 2)
    scale = FEATURE_MAX_SIZE / size
    out = (round(images.shape[-2] * scale), round(images.shape[-1] * scale))
    return torch.nn.functional.interpolate(
        images.float(), size=out, mode="bilinear", antialias=True, align_corners=False
    )


class Scorer:
    """Every metric of one split: fidelity (task metric or extractor), Fréchet, CLIP."""

    def __init__(
        self,
        split: TestSplit,
        cfg: EvalConfig,
        device,
        notes: list[str],
        extractor=None,
        inception=None,
    ):
        self.split = split
        self.extractor = extractor
        self.reference: dict[str, float] = {}  # the extractor's scores on the real images
        if split.task is not None:
            self.metric = split.task.metric_name
            self.higher_is_better = True
        elif extractor is not None:
            self.metric = self.extractor.metric_name
            self.higher_is_better = self.extractor.higher_is_better
            given = _pictures(split.conditions, signed=False)
            scores = self.extractor.compare(self.extractor.extract(_pictures(split.real)), given)
            self.reference = {f"reference_{k}": float(np.mean(v)) for k, v in scores.items()}
        else:
            self.metric, self.higher_is_better = None, True
            notes.append("no condition fidelity: pass --extractor NAME to score user data by it")
        self.frechet = None
        if cfg.frechet:
            if len(split.indices) < 2:
                notes.append("no Fréchet distance: it needs at least 2 conditions")
            else:
                self.frechet = FrechetScorer(split, cfg, device, inception)
        self.clip = None
        if cfg.clip_model:
            if any(p.strip() for p in split.prompts):
                from .metrics import ClipScore

                self.clip = ClipScore(cfg.clip_model, device)
            else:
                notes.append("no CLIP score: the test split has no prompts")
        if self.metric is None:
            self.metric = self.frechet.key if self.frechet else "clip_score" if self.clip else None
            self.higher_is_better = self.metric not in LOWER_IS_BETTER

    def __call__(self, images: torch.Tensor) -> tuple[dict, list[dict], np.ndarray | None]:
        """(metrics, per-condition scores, re-extracted conditions or None) of samples (N, 3,
        R, R) in [-1, 1], one per condition in the split's order. Video samples (N, 3, F, R, R):
        an extractor and the CLIP score run on every frame, a clip's score is the mean over its
        frames, and the re-extracted conditions are clips (N, F, ...)."""
        split = self.split
        metrics: dict[str, float] = {}
        per_condition: list[dict] = [
            {"index": i, "name": n, "prompt": p}
            for i, n, p in zip(split.indices, split.names, split.prompts)
        ]
        extracted = None
        if split.task is not None:
            from .validation import score_task_samples

            metrics.update(score_task_samples(split.task, images, split.task_samples))
            for k, row in enumerate(per_condition):
                single = split.task.fidelity(images[k : k + 1], split.task_samples[k : k + 1])
                row.update(single)
        elif self.extractor is not None:
            extracted = self.extractor.extract(_pictures(images))
            scores = self.extractor.compare(extracted, _pictures(split.conditions, signed=False))
            scores = {k: _per_sample(v, len(images)) for k, v in scores.items()}
            metrics.update({k: float(np.mean(v)) for k, v in scores.items()})
            for k, row in enumerate(per_condition):
                row.update({name: float(v[k]) for name, v in scores.items()})
            metrics.update(self.reference)
            if split.video:
                extracted = extracted.reshape(len(images), -1, *extracted.shape[1:])
        if self.frechet is not None:
            metrics.update(self.frechet(images))
        if self.clip is not None:
            frames = images.shape[2] if split.video else 1
            prompts = [p for p in split.prompts for _ in range(frames)]
            clip = _per_sample(self.clip(_pictures(images), prompts), len(images))
            metrics["clip_score"] = float(clip.mean())
            for k, row in enumerate(per_condition):
                row["clip_score"] = float(clip[k])
        return metrics, per_condition, extracted


def _pictures(samples: torch.Tensor, signed: bool = True) -> np.ndarray:
    """uint8 pictures (M, H, W, 3) of images (N, C, H, W), or of every frame of videos
    (N, C, F, H, W), video by video (M = N * F)."""
    if samples.ndim == 5:
        from .video import video_to_uint8

        frames = video_to_uint8(samples, signed)
        return frames.reshape(-1, *frames.shape[2:])
    return to_uint8(samples, signed)


def _per_sample(scores: np.ndarray, count: int) -> np.ndarray:
    """Per-picture scores (M,) as one per sample (``count``,): the mean over each video's
    frames (M = count * F), the scores themselves for images."""
    return np.asarray(scores, dtype=np.float64).reshape(count, -1).mean(axis=1)


def sample_rows(
    split: TestSplit, images: torch.Tensor, extracted, rows: int, alone=()
) -> list[list]:
    """condition(s) | sample [| each side network's sample alone] | real image [| condition
    re-extracted from the sample] for the first ``rows`` conditions: uint8 images (H, W, 3), or
    clips (F, H, W, 3) for videos."""
    from .video import video_to_uint8

    n = min(rows, len(split.indices))
    pictures = video_to_uint8 if split.video else to_uint8
    columns = [
        *(pictures(c[:n], signed=False) for c in split.condition_batches),
        pictures(images[:n]),
        *(pictures(a[:n]) for a in alone),
        pictures(split.real[:n]),
    ]
    if extracted is not None:
        columns.append(extracted[:n])
    return [[c[i] for c in columns] for i in range(n)]


def write_samples(
    split: TestSplit, images, extracted, rows: int, stem: Path, fps: float, alone=()
) -> None:
    """The sample sheet of :func:`sample_rows`: ``<stem>.png`` for images; for videos
    ``<stem>.gif`` (the rows animated at ``fps``) and ``<stem>_frames.png`` (each clip's frames
    side by side, one line per clip)."""
    grid = sample_rows(split, images, extracted, rows, alone)
    if split.video:
        from .video import write_animation

        write_animation(grid, stem.with_suffix(".gif"), f"{stem}_frames.png", fps)
    else:
        image_grid(grid).save(stem.with_suffix(".png"))


# ----------------------------------------------------------------------------- the run


def check_video_settings(cfg: EvalConfig, model, inception) -> None:
    """Refuse settings that do not fit the kind of main network: video flags for an image
    model, Inception features for videos."""
    if model.family.takes_video:
        if inception is not None:
            raise ConfigError(
                "--inception_weights scores images, but this main network makes videos; drop it "
                "(videos are scored by the task-feature video Fréchet distance)."
            )
        return
    if cfg.num_frames is not None:
        raise ConfigError(
            f"--num_frames is for video models, but the main network ({model.family.name}) makes "
            "images; drop it."
        )


def task_for_model(name: str, model, resolution: int, num_frames: int | None):
    """The embedded task ``name`` at ``resolution`` (with ``num_frames`` frames per clip for a
    video task), refused when it renders images for a video model or the reverse."""
    from ..data.tasks import get_task
    from .feature_distance import is_video_task

    task = get_task(name, resolution=resolution)
    video_task = is_video_task(task)
    if video_task != model.family.takes_video:
        makes = "videos" if model.family.takes_video else "images"
        raise ConfigError(
            f"--task {name} renders {'videos' if video_task else 'images'} but the main network "
            f"({model.family.name}) makes {makes}; pass a task of its kind (pose_video for video "
            "models; pose, edges, ... for image models)."
        )
    if video_task and num_frames is not None:
        task = get_task(name, resolution=resolution, frames=num_frames)
    return task


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (interference: smaller is)."""
    from .composition import INTERFERENCE

    return metric not in LOWER_IS_BETTER and not metric.endswith(INTERFERENCE)


class Samplers:
    """The samplers of one ``lisa eval``: one side network, several composed (each with its
    scale and window) or one of several alone, sharing the frozen encoders. A side network that
    does not fit the main network is refused in one line that names it."""

    def __init__(self, model, cfg: EvalConfig, device):
        from .composition import composition_controls

        self.model, self.cfg, self.device = model, cfg, device
        # Without a scale or a window a single network samples as a plain side network (the
        # stock pipeline's defaults); with them, as a composition of one.
        self.controlled = composition_controls(cfg)
        self.last = None

    def __call__(self, networks: list[SideNetworkFolder], controls: list[dict]):
        from .generate import SideNetworkSampler

        paths = [str(n.path) for n in networks]
        several = len(paths) > 1
        settings = {}
        if self.controlled:
            settings = {key: [c[key] for c in controls] if several else controls[0][key]
                        for key in controls[0]}  # fmt: skip
        try:
            sampler = SideNetworkSampler(
                self.model,
                paths if several else paths[0],
                self.cfg.side_network,
                num_inference_steps=self.cfg.num_inference_steps,
                guidance_scale=self.cfg.guidance_scale,
                device=self.device,
                allow_pickle=self.cfg.allow_pickle,
                encoders=self.last.encoders if self.last is not None else None,
                **settings,
            )
        except ModelError as err:
            raise self._unfitting(networks) or err from None
        self.last = sampler
        return sampler

    def _unfitting(self, networks: list[SideNetworkFolder]) -> ConfigError | None:
        """The refusal of the first network that its family's branch says does not fit the
        main network (None: the error was another one)."""
        from ..families import branch_class
        from ..families.loading import load_side_network

        cls = branch_class(self.model.family, self.cfg.side_network)
        for network in networks:
            try:
                side = load_side_network(
                    str(network.path), self.cfg.allow_pickle, cls.side_network_class
                )
            except (ModelError, OSError, ValueError):
                continue  # not this network's fit: the original error stands
            try:
                cls(self.model.main_network, side)
            except ModelError as err:
                detail = str(err).split(". ")[0]
                return ConfigError(
                    f"side network {network.path} was not built for the main network "
                    f"{self.model.source} ({detail}); pass the --pretrained_model_name_or_path it "
                    "was trained on, and compose side networks trained on one main network."
                )
        return None


def evaluate(cfg: EvalConfig, progress: bool = False) -> dict:
    """Run ``lisa eval``; returns what it writes to ``eval.json`` (plus ``"images"``: the
    samples of the last side network or composition, (N, 3, R, R) in [-1, 1], or videos
    (N, 3, F, R, R), not written). Every refusal comes before anything is written."""
    from ..families.loading import load_main_model
    from . import composition

    check_config(cfg)
    notes: list[str] = []
    targets = targets_of(cfg)
    networks = targets[0].networks
    composed = len(networks) > 1
    if cfg.pretrained_model_name_or_path is None:
        composition.check_one_main_network(networks)
    fill_from_run(cfg, networks[0].run, networks[0].run_path, notes)
    controls = composition.network_settings(cfg, len(networks))
    if cfg.each_alone and not composed:
        raise ConfigError(
            "--each_alone scores each of several composed side networks alone; pass several "
            "(--controlnet A B, or a run that trained several)."
        )
    if composed and cfg.test_data_dir:
        raise ConfigError(
            f"{len(networks)} side networks are composed, but a --test_data_dir split has one "
            "condition per image; score a composition on a task with one condition per network "
            "(--task pose_segmentation)."
        )
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # What needs optional packages or files is checked before the models are loaded.
    extractor = inception = None
    if cfg.extractor:
        from .extractors import make_extractor

        extractor = make_extractor(
            cfg.extractor,
            cfg.extractor_weights,
            low=cfg.edge_low_threshold,
            high=cfg.edge_high_threshold,
            tolerance=cfg.edge_tolerance,
        )
    if cfg.inception_weights and cfg.frechet:
        from .metrics import InceptionFID

        inception = InceptionFID(cfg.inception_weights, device)
    model = load_main_model(
        cfg.pretrained_model_name_or_path, cfg.task, allow_pickle=cfg.allow_pickle
    )
    resolution = int(cfg.resolution or model.resolution)
    model.check_resolution(resolution)
    video = model.family.takes_video
    check_video_settings(cfg, model, inception)
    task_name = cfg.task or (None if cfg.test_data_dir else model.task)
    task = conditions = None
    if task_name and not cfg.test_data_dir:
        task = task_for_model(task_name, model, resolution, cfg.num_frames)
        conditions = composition.network_conditions(networks, given_columns(cfg), task)
        if conditions is not None:
            task = task.with_conditions(conditions)
    samplers = Samplers(model, cfg, device)
    sampler = samplers(networks, controls)
    if cfg.test_data_dir:
        split = folder_split(
            cfg, resolution, sampler.condition_channels, model.resolution_multiple, video
        )
    elif task is not None:
        split = task_split(task, cfg.num_conditions or DEFAULT_TASK_CONDITIONS, cfg.seed)
    else:
        raise ConfigError(
            "no test split: pass --test_data_dir DIR (a folder with metadata.jsonl: image, "
            "conditioning_image and text columns) or --task NAME (an embedded task)."
        )
    sampler.check_conditions(split.conditions)
    scorer = Scorer(split, cfg, device, notes, extractor, inception)
    if cfg.curve_metric:
        scorer.metric = cfg.curve_metric
        scorer.higher_is_better = higher_is_better(cfg.curve_metric)
    series = cfg.checkpoints is not None
    if series and scorer.metric is None:
        raise ConfigError(
            "a checkpoint series needs a metric for its curve: pass --extractor NAME, "
            "--clip_model DIR, or keep the Fréchet distance on."
        )
    metric_of = composition.condition_metrics(task, conditions) if composed else {}

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fps = cfg.frame_rate or DEFAULT_FPS
    results = []
    images = per_condition = None
    alone_scores: dict[str, dict] = {}
    for k, target in enumerate(targets):
        if k > 0:
            sampler = samplers(target.networks, controls)
        sample = dict(indices=split.indices, seed=cfg.seed, batch_size=cfg.batch_size,
                      progress=progress)  # fmt: skip
        images = sampler(split.conditions, split.prompts, **sample)
        metrics, per_condition, extracted = scorer(images)
        alone_images, alone_scores = [], {}
        if cfg.each_alone:
            batches = split.condition_batches
            for j, (name, network) in enumerate(zip(conditions, target.networks)):
                alone = samplers([network], [controls[j]])(batches[j], split.prompts, **sample)
                alone_scores[name] = scorer(alone)[0]
                alone_images.append(alone)
            metrics.update(composition.interference(alone_scores, metrics, metric_of))
        if series:
            write_samples(split, images, extracted, cfg.sheet_rows,
                          out / f"samples-step-{target.step}", fps, alone_images)  # fmt: skip
        if k == len(targets) - 1:
            write_samples(split, images, extracted, cfg.sheet_rows, out / "samples", fps,
                          alone_images)  # fmt: skip
        record = {"step": target.step, "metrics": metrics}
        if composed:
            record["paths"] = {name: str(p) for name, p in zip(conditions, target.paths)}
            if cfg.each_alone:
                record["alone"] = alone_scores
        else:
            record["path"] = str(target.paths[0])
        results.append(record)
        if progress or series:
            shown = " ".join(f"{m} {v:.4g}" for m, v in metrics.items())
            label = " + ".join(conditions) if composed else target.paths[0]
            print(f"{'step ' + str(target.step) if series else label}: {shown}", flush=True)
    if scorer.metric is not None and scorer.metric not in results[-1]["metrics"]:
        raise ConfigError(
            f"--curve_metric {scorer.metric!r} is not among the metrics: "
            f"{', '.join(results[-1]['metrics'])}."
        )

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("command", "output_dir")}
    paths = [[str(p) for p in t.paths] if composed else str(t.paths[0]) for t in targets]
    settings.update(
        resolution=resolution,
        model=model.source,
        family=model.family.name,
        device=str(device),
        side_network_paths=paths,
    )
    if scorer.extractor is not None:
        settings["extractor_settings"] = scorer.extractor.settings()
    report = {
        "command": cfg.command,
        "settings": settings,
        "data": split.info,
        "metric": scorer.metric,
        "higher_is_better": scorer.higher_is_better,
        "metrics": results[-1]["metrics"],
        "per_condition": per_condition,
        "frechet": scorer.frechet.info if scorer.frechet is not None else None,
        "notes": notes,
    }
    if composed:
        report["composition"] = [
            {"name": name, "path": str(path), "metric": metric_of[name], **control}
            for name, path, control in zip(conditions, targets[-1].paths, controls)
        ]
        if cfg.each_alone:
            report["alone"] = alone_scores
    if series:
        report["checkpoints"] = results
        report["curve"] = write_curve(out, results, scorer, cfg.threshold)
    write_text_atomically(out / "eval.json", json.dumps(report, indent=2, default=_jsonable))
    return {**report, "images": images}


def write_curve(out: Path, results: list[dict], scorer: Scorer, threshold: float | None) -> dict:
    """``curve.json`` and ``curve.png`` of the headline metric over a checkpoint series."""
    metric = scorer.metric
    points = [(r["step"], r["metrics"].get(metric)) for r in results]
    reached = steps_to_threshold(points, threshold, scorer.higher_is_better)
    curve = {
        "metric": metric,
        "higher_is_better": scorer.higher_is_better,
        "threshold": threshold,
        "steps_to_threshold": reached,
        "steps": [s for s, _ in points],
        "values": [v for _, v in points],
        "points": [{"step": r["step"], **r["metrics"]} for r in results],
    }
    write_text_atomically(out / "curve.json", json.dumps(curve, indent=2, default=_jsonable))
    plot_curve(points, metric, out / "curve.png", threshold, reached)
    return {"file": str(out / "curve.json"), "steps_to_threshold": reached}


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
