"""``lisa eval`` with several side networks composed: which networks a folder holds, which
condition of the task each takes, and how much each suffers from the others.

Side networks come from ``--controlnet`` folders or from a run's checkpoints. A folder is one side
network (a diffusers folder), a folder holding several, one per sub-folder (a joint run's
``controlnet/``, a checkpoint's ``side_network/``), or a ``lisa train`` output folder, which stands
for its ``controlnet/``. The networks of a folder are taken in the order their run trained them
(its ``--conditioning_image_column``, else its task's conditions), and the folders in the order
given.

Each network takes one condition of the task (``pose_segmentation``: ``pose`` and
``segmentation``), in the networks' order. The condition is the one ``--conditioning_image_column``
names for it, else the one its run trained it on (the sub-folder name of a joint run, the run's
column), else the task's conditions in their order when there is one network per condition.
A network named for one condition and given another is refused, as are conditions the task does
not render.

Each condition has its own metric, the metric of the task's view with that condition alone
(PCK of the figure for ``pose``, mIoU of the background for ``segmentation``). The interference
network k suffers from the others is

    interference_k = metric_k(samples of network k alone) - metric_k(samples of the composition)

(> 0: adding the others costs condition k fidelity), reported as ``<name>_interference``, as
``benchmarks/composition.py`` reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, ModelError

# A lisa train output folder's config.json; these keys mark it as one.
RUN_CONFIG = "config.json"
RUN_CONFIG_KEYS = {"pretrained_model_name_or_path", "side_network", "output_dir"}
# The folder a finished run saves its side network(s) to.
RUN_SIDE_NETWORKS = "controlnet"
# How far above a side-network folder its run's config.json may lie:
# RUN/checkpoint-N/side_network/<name> is three levels below RUN.
RUN_LEVELS = 3
# The key of a network's interference is its name with this suffix (``pose_interference``).
INTERFERENCE = "_interference"


@dataclass
class SideNetworkFolder:
    """One side network: its folder, the condition it takes when its run or folder name says
    (None: not known), and the config of the ``lisa train`` run it comes from ({}: none)."""

    path: Path
    condition: str | None = None
    run: dict = field(default_factory=dict)
    run_path: Path | None = None


# ----------------------------------------------------------------------------- runs


def read_run_config(folder: Path) -> dict | None:
    """The ``lisa train`` config in ``folder``, or None when it holds none."""
    try:
        data = json.loads((folder / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not RUN_CONFIG_KEYS <= data.keys():
        return None
    return data


def find_run(path: Path) -> tuple[dict, Path | None]:
    """(config, its path) of the run that a side-network folder belongs to: the nearest of the
    folder's parents, up to ``RUN_LEVELS`` above it, with a ``lisa train`` config; ({}, None)."""
    for folder in list(Path(path).parents)[:RUN_LEVELS]:
        run = read_run_config(folder)
        if run is not None:
            return run, folder / RUN_CONFIG
    return {}, None


def run_columns(run: dict) -> list[str]:
    """The conditions a run trained on, in its networks' order: its
    ``--conditioning_image_column`` (one name or several), else its task's conditions, else []."""
    from ..data.multi import DEFAULT_COLUMN, condition_columns

    columns = condition_columns(run.get("conditioning_image_column", DEFAULT_COLUMN))
    if columns != [DEFAULT_COLUMN]:
        return columns
    if run.get("task"):
        from ..data.tasks import get_task

        try:
            return list(getattr(get_task(run["task"]), "condition_names", ()))
        except ConfigError:
            return []
    return []


def is_side_network(folder: Path) -> bool:
    """A diffusers model folder (its config.json is a model's, not a run's)."""
    return (folder / "config.json").is_file() and read_run_config(folder) is None


def networks_in(path: Path, given_as: str = "--controlnet") -> list[SideNetworkFolder]:
    """The side networks of a folder (see the module docstring), each with the condition it
    was trained on when known."""
    path = Path(path).expanduser()
    own_run = read_run_config(path)
    if own_run is not None:  # a run's output folder stands for its saved side network(s)
        saved = path / RUN_SIDE_NETWORKS
        if not saved.is_dir():
            raise ModelError(
                f"{given_as} {path} is a `lisa train` output folder without {RUN_SIDE_NETWORKS}/ "
                "(the run has not finished); pass --checkpoints for its checkpoints."
            )
        path = saved
    run, run_path = find_run(path)
    columns = run_columns(run)
    if is_side_network(path):
        # A run of one network names its one condition.
        condition = columns[0] if len(columns) == 1 else None
        return [SideNetworkFolder(path, condition, run, run_path)]
    inside = sorted(p for p in path.iterdir() if p.is_dir() and is_side_network(p))
    if not inside:
        raise ModelError(
            f"{given_as} {path} holds no side network (no config.json, and no sub-folder with "
            "one); pass a side network folder, a folder of them (a joint run's controlnet/), or "
            "a `lisa train` output folder."
        )
    rank = {name: k for k, name in enumerate(columns)}
    inside.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    return [SideNetworkFolder(p, p.name, run, run_path) for p in inside]


def check_one_main_network(networks: list[SideNetworkFolder]) -> None:
    """Refuse side networks whose runs trained them on different main networks."""
    mains: dict[str, list[str]] = {}
    for network in networks:
        main = network.run.get("pretrained_model_name_or_path")
        if main is not None:
            mains.setdefault(_same_path(main), []).append(str(network.path))
    if len(mains) > 1:
        listing = "; ".join(f"{main}: {', '.join(paths)}" for main, paths in mains.items())
        raise ConfigError(
            f"the side networks were trained on different main networks ({listing}); compose "
            "side networks trained on one main network, or pass --pretrained_model_name_or_path "
            "if these name the same model."
        )


def _same_path(name: str) -> str:
    """A model folder's resolved path (so that two spellings of one folder agree), or a hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# ----------------------------------------------------------------------------- conditions


def network_conditions(networks: list[SideNetworkFolder], columns: list[str] | None, task):
    """The condition of the task each network takes, in the networks' order (see the module
    docstring); ``columns`` are the ones ``--conditioning_image_column`` names (None: not
    given). None for a task with a single condition (and a single network)."""
    names = list(getattr(task, "condition_names", ()))
    count = len(networks)
    if not names:
        if count > 1:
            raise ConfigError(
                f"task {task.name!r} renders one condition but {count} side networks are "
                "composed; compose them on a task with one condition per network (such as "
                "pose_segmentation), or evaluate one at a time."
            )
        return None
    # A condition the task does not render (a folder run's column) says nothing here.
    known = [n.condition if n.condition in names else None for n in networks]
    if columns is not None:
        if len(columns) != count:
            raise ConfigError(
                f"--conditioning_image_column names {len(columns)} condition(s) "
                f"({', '.join(columns)}) for {count} side network(s); name one per network, in "
                "their order."
            )
        for k, (condition, column) in enumerate(zip(known, columns)):
            if condition is not None and condition != column:
                raise ConfigError(
                    f"side network {k} ({networks[k].path}) was trained on {condition!r} but "
                    f"--conditioning_image_column gives it {column!r}; give the conditions in the "
                    "networks' order, or reorder --controlnet."
                )
        chosen = list(columns)
    elif all(c is not None for c in known):
        chosen = known
    elif count == len(names) and all(c in (None, n) for c, n in zip(known, names)):
        chosen = names  # one network per condition, in the task's order
    elif count > len(names):
        raise ConfigError(
            f"task {task.name!r} renders {len(names)} conditions ({', '.join(names)}) but "
            f"{count} side networks are composed; compose at most one network per condition."
        )
    else:
        takes = ", ".join(c or "?" for c in known)
        raise ConfigError(
            f"task {task.name!r} renders the conditions {', '.join(names)} but the {count} side "
            f"network(s) take {takes} (?: not known); name the condition each takes with "
            "--conditioning_image_column, in the networks' order."
        )
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ConfigError(
            f"task {task.name!r} renders the conditions {', '.join(names)}, not "
            f"{', '.join(unknown)}; name the condition each side network takes with "
            "--conditioning_image_column, in the networks' order."
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"two side networks take the same condition ({', '.join(chosen)}); compose one "
            "network per condition."
        )
    return chosen


def condition_metrics(task, conditions) -> dict[str, str]:
    """condition -> its own metric: the metric of the task's view with that condition alone
    (``pose_segmentation``: ``pck`` for pose, ``miou`` for segmentation)."""
    return {name: task.with_conditions((name,)).metric_name for name in conditions}


def condition_batch(samples: list, name: str) -> torch.Tensor:
    """Condition ``name`` of task samples (each sample's ``condition`` a mapping name -> (H, W,
    C) uint8) as a (N, C, H, W) batch in [0, 1]."""
    stacked = np.stack([s.condition[name] for s in samples]).astype(np.float32)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2) / 255


def interference(alone: dict[str, dict], composed: dict, metrics: dict[str, str]) -> dict:
    """``<name>_interference`` for every network in ``alone`` (name -> its scores alone): its
    condition's metric (``metrics[name]``) alone minus the same metric of the composition."""
    return {
        f"{name}{INTERFERENCE}": alone[name][metrics[name]] - composed[metrics[name]]
        for name in alone
    }


# ----------------------------------------------------------------------------- settings


def network_settings(cfg, count: int) -> list[dict]:
    """Each network's ``conditioning_scale`` and guidance window from the eval settings (one
    number for all or one per network; unset: 1, 0 and 1), refused in one line as the composed
    branch refuses them."""
    from ..families.composition import check_windows, per_network

    scales = per_network(_given(cfg.conditioning_scale, 1.0), count, "--conditioning_scale")
    starts = per_network(_given(cfg.control_guidance_start, 0.0), count, "--control_guidance_start")
    ends = per_network(_given(cfg.control_guidance_end, 1.0), count, "--control_guidance_end")
    check_windows(starts, ends)
    return [
        {"conditioning_scale": s, "control_guidance_start": a, "control_guidance_end": b}
        for s, a, b in zip(scales, starts, ends)
    ]


def _given(value, default):
    return default if value is None else value


def composition_controls(cfg) -> bool:
    """Whether a scale or a window was given (a single network then samples as a composition
    of one)."""
    values = (cfg.conditioning_scale, cfg.control_guidance_start, cfg.control_guidance_end)
    return any(v is not None for v in values)
