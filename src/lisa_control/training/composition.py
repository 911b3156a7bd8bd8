"""``lisa train`` with several conditions: one side network per condition, trained together as a
:class:`~lisa_control.families.composition.ComposedBranch` (their residuals summed, the main
network run once). Regularizers are built per side network by the registry; the checkpoint holds
every side network (``side_network/<name>/``) and the run saves them to
``output_dir/controlnet/<name>/``.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ModelError
from .config import TrainConfig


def build_composed_branch(cfg: TrainConfig, model, condition_channels: int, names):
    """A new side network per condition name, or with ``--controlnet_model_name_or_path DIR``
    the ones in ``DIR/<name>/`` (a composed run's ``controlnet`` folder, or separately trained
    networks put side by side)."""
    from ..families import branch_class
    from ..families.composition import ComposedBranch
    from ..families.loading import load_side_network

    cls = branch_class(model.family, cfg.side_network)
    branches = {}
    for name in names:
        side_network = None
        if cfg.controlnet_model_name_or_path:
            folder = Path(cfg.controlnet_model_name_or_path) / name
            if not folder.is_dir():
                raise ModelError(
                    f"--controlnet_model_name_or_path {cfg.controlnet_model_name_or_path!r} has "
                    f"no folder {name!r}; with several conditions it must hold one side network "
                    f"per condition ({', '.join(names)})."
                )
            side_network = load_side_network(str(folder), cfg.allow_pickle, cls.side_network_class)
        branch = cls.for_training(
            model.main_network, side_network, condition_channels, model.vae_scale_factor
        )
        if branch.condition_channels != condition_channels:
            raise ModelError(
                f"side network {name!r} takes {branch.condition_channels}-channel conditions but "
                f"the data has {condition_channels} channels."
            )
        branches[name] = branch
    composed = ComposedBranch(branches)
    if cfg.gradient_checkpointing:
        composed.side_network.enable_gradient_checkpointing()
    return composed
