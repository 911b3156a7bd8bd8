"""Checkpoints that are complete or absent.

``checkpoint-N/`` holds the side network as a plain diffusers folder, the regularizers' weights
(the LISA decoder) apart, the optimizer and LR-scheduler states (and under fp16 the grad
scaler's), every RNG state and the trainer state (step, data position, config fingerprint). It
is written under a temporary name, flushed to disk and renamed, so a kill at any moment leaves
either the whole checkpoint or none; the trainer state is written last and is what marks a
folder complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.errors import CheckpointError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
SIDE_DIR = "side_network"
REGULARIZERS_FILE = "regularizers.safetensors"
GRAD_SCALER_FILE = "grad_scaler.pt"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in step order (a folder without its trainer state is ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX) :]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def resolve_resume_path(output_dir: str | Path, resume_from: str) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none); else the given path."""
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{resume_from!r} is not a complete checkpoint (no {STATE_FILE}); pass 'latest' or "
            f"a {PREFIX}N folder of --output_dir."
        )
    return path


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state(
        (name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    side_network,
    regularizers: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    total_limit: int | None = None,
    grad_scaler=None,
) -> Path:
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    side_network.save_pretrained(str(tmp / SIDE_DIR), safe_serialization=True)
    reg_state = {k: v.detach().contiguous().cpu() for k, v in regularizers.state_dict().items()}
    save_file(reg_state, str(tmp / REGULARIZERS_FILE))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if grad_scaler is not None:  # fp16: its loss scale and growth count continue on resume
        torch.save(grad_scaler.state_dict(), tmp / GRAD_SCALER_FILE)
    for rank, state in enumerate(rng_states):
        torch.save(state, tmp / f"rng_{rank}.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step (after a resume): move the old copy away first so the newest complete
        # checkpoint exists at every instant.
        stale = root / f".stale-{PREFIX}{step}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if total_limit is not None:
        prune_checkpoints(root, total_limit)
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int) -> None:
    """Keep the newest ``total_limit`` complete checkpoints (never fewer than one)."""
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(len(ckpts) - max(total_limit, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> None:
    """Delete what a killed write left behind (only the writing process makes these)."""
    for leftover in list(output_dir.glob(f".tmp-{PREFIX}*")) + list(
        output_dir.glob(f".stale-{PREFIX}*")
    ):
        shutil.rmtree(leftover, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read {path / STATE_FILE}: {exc}; the checkpoint is damaged."
        ) from None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, naming the file, or None.

    Cheap: it reads the trainer state, each safetensors file's header (which also tells a
    truncated file) and each ``.pt`` file's zip directory (at the end of the file, so a
    truncated one has none); it does not read the tensors."""
    import zipfile

    from safetensors import safe_open

    try:
        read_trainer_state(path)
    except CheckpointError:
        return f"{STATE_FILE} is not readable JSON"
    weights = [file for file, _ in side_weight_files(path)]
    if not weights:
        return f"{SIDE_DIR}/ holds no .safetensors weights"
    for file in [*weights, path / REGULARIZERS_FILE]:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: the file is unusable either way
            return f"{file.relative_to(path)} cannot be read ({_reason(exc)})"
    for file in [path / "optimizer.pt", path / "lr_scheduler.pt", *sorted(path.glob("rng_*.pt"))]:
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{file.name} cannot be read ({_reason(exc)})"
    return None


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__


def _damaged(path: Path, file: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged: {file.relative_to(path)} cannot be read ({_reason(exc)}); "
        "resume from an earlier checkpoint (--resume_from_checkpoint checkpoint-N) or delete "
        "this one."
    )


def side_weight_files(path: Path) -> list[tuple[Path, str]]:
    """(file, key prefix) of each side-network weights file of the checkpoint at ``path``: the
    files of ``side_network/`` (prefix ""), else, for several side networks (one sub-folder
    each, as a composed branch saves them), those of every sub-folder (prefix ``<name>.``)."""
    files = sorted((path / SIDE_DIR).glob("*.safetensors"))
    if files:
        return [(f, "") for f in files]
    return [(f, f"{f.parent.name}.") for f in sorted((path / SIDE_DIR).glob("*/*.safetensors"))]


def load_side_weights(path: Path) -> dict[str, torch.Tensor]:
    """The side network's weights; for several side networks every key is prefixed with its
    folder's name (see :func:`side_weight_files`)."""
    files = side_weight_files(path)
    if not files:
        raise CheckpointError(f"{path / SIDE_DIR} holds no .safetensors weights.")
    state: dict[str, torch.Tensor] = {}
    for f, prefix in files:
        state.update({f"{prefix}{k}": v for k, v in _load_safetensors(path, f).items()})
    return state


def _load_safetensors(path: Path, file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError (not a RuntimeError), OSError
        raise _damaged(path, file, exc) from None


def _torch_load(path: Path, file: Path):
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # truncated zip: RuntimeError or OSError, depending on the cut
        raise _damaged(path, file, exc) from None


def load_checkpoint(
    path: Path,
    *,
    side_network,
    regularizers: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    rank: int = 0,
    grad_scaler=None,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state."""
    state = read_trainer_state(path)
    side_weights = load_side_weights(path)
    reg_weights = _load_safetensors(path, path / REGULARIZERS_FILE)
    try:
        side_network.load_state_dict(side_weights)
        regularizers.load_state_dict(reg_weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({str(exc).splitlines()[0]}); resume with "
            "the configuration that wrote it, or start a new --output_dir."
        ) from None
    optimizer.load_state_dict(_torch_load(path, path / "optimizer.pt"))
    lr_scheduler.load_state_dict(_torch_load(path, path / "lr_scheduler.pt"))
    if grad_scaler is not None and (path / GRAD_SCALER_FILE).is_file():
        grad_scaler.load_state_dict(_torch_load(path, path / GRAD_SCALER_FILE))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_torch_load(path, rng_file))
    return state
