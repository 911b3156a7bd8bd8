"""``lisa train``: build a run from a :class:`TrainConfig`, resume it if asked, and run the
shared loop with this command's callbacks (checkpoints, validation); then save the side
network as a diffusers folder.

Writes ``output_dir/controlnet`` (the side network), ``checkpoint-N/``, ``loss_log.jsonl``,
``validation.jsonl``, ``validation/step-N.png``, ``config.json`` and the tracker's logs. An
output folder holding an earlier run is refused unless the run is resumed or
``--overwrite_output_dir`` replaces it (``output_dir.py``), so a folder never mixes two runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import build as b
from .config import TrainConfig
from .logs import LossRecorder, start_tracker, training_sinks, truncate_log
from .loop import Callback, Loop
from .output_dir import check_output_dir, clear_run


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    final_side_network: Path | None = None


def train(cfg: TrainConfig) -> TrainResult:
    t_start = time.perf_counter()
    output_dir = Path(cfg.output_dir)
    check_output_dir(cfg)
    accelerator = b.make_accelerator(cfg)
    b.adopt_checkpoint_settings(cfg)
    run = b.build(cfg, accelerator)
    if cfg.overwrite_output_dir and accelerator.is_main_process:
        clear_run(output_dir, cfg)
    start = b.resume(cfg, run, accelerator) if cfg.resume_from_checkpoint else 0
    if cfg.resume_from_checkpoint:
        # Drop what a killed run logged after the checkpoint: all of it when there is none.
        if accelerator.is_main_process:
            truncate_log(output_dir / "loss_log.jsonl", start)
            truncate_log(output_dir / "validation.jsonl", start)
        else:
            truncate_log(output_dir / f"loss_log.rank{accelerator.process_index}.jsonl", start)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings = b.jsonable(asdict(cfg))
        (output_dir / "config.json").write_text(json.dumps(settings, indent=2))
        start_tracker(accelerator, cfg.tracker_project_name, settings)
    validator = b.build_validator(cfg, run)
    sinks = training_sinks(accelerator, output_dir, cfg.progress, run.max_steps, start)
    recorder = LossRecorder(accelerator, sinks, cfg.logging_steps)
    validation = Validate(cfg, accelerator, run, validator) if validator else None
    loop = Loop(
        accelerator,
        run.step_module,
        encoded_step(run.encoders, run.step_module),
        run.optimizer,
        run.lr_scheduler,
        recorder,
        max_grad_norm=cfg.max_grad_norm,
        on_nonfinite=cfg.on_nonfinite,
        callbacks=[SaveCheckpoints(cfg, accelerator, run), *([validation] if validation else [])],
    )
    step = loop.run(b.build_loader(cfg, run.dataset, run.order, start), start, run.max_steps)
    final = save_side_network(accelerator, run, output_dir, t_start)
    accelerator.end_training()
    for reg in run.inner.regularizers:
        reg.remove_hooks()
    return TrainResult(
        output_dir, step, recorder.records, validation.records if validation else [], final
    )


def encoded_step(encoders, step_module):
    """The loop's step function: encode a batch with the frozen encoders, then one
    :class:`~lisa_control.core.step.ControlTrainingStep`."""

    def step_fn(batch, step: int):
        x0, context, condition = encoders.encode(batch)
        return step_module(x0, context, condition, step=step)

    return step_fn


class SaveCheckpoints(Callback):
    """``checkpoint-N`` every ``--checkpointing_steps`` steps and at the last step."""

    def __init__(self, cfg: TrainConfig, accelerator, run: b.Training):
        self.cfg, self.accelerator, self.run = cfg, accelerator, run

    def on_step_end(self, step: int) -> None:
        if step % self.cfg.checkpointing_steps == 0 or step == self.run.max_steps:
            b.save_checkpoint(self.cfg, self.run, self.accelerator, step)


class Validate(Callback):
    """Samples and metrics every ``--validation_steps`` steps and at the last step, on the main
    process: a grid in ``validation/step-N.png``, metrics in ``validation.jsonl`` and the
    tracker under ``validation/``."""

    def __init__(self, cfg: TrainConfig, accelerator, run: b.Training, validator):
        self.cfg, self.accelerator, self.run, self.validator = cfg, accelerator, run, validator
        self.records: list[dict] = []

    def on_step_end(self, step: int) -> None:
        if step % self.cfg.validation_steps and step != self.run.max_steps:
            return
        if self.accelerator.is_main_process:
            out = Path(self.cfg.output_dir)
            metrics = self.validator.run(self.run.inner.branch, step, out / "validation")
            if metrics:
                self.records.append({"step": step, **metrics})
                with (out / "validation.jsonl").open("a") as f:
                    f.write(json.dumps(self.records[-1]) + "\n")
                if self.accelerator.log_with:
                    self.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step)
        self.accelerator.wait_for_everyone()


def save_side_network(accelerator, run: b.Training, output_dir: Path, t_start: float):
    """Save the side network to ``output_dir/controlnet`` on the main process; its path there,
    None elsewhere."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    final = output_dir / "controlnet"
    run.inner.branch.save_side_network(final)
    elapsed = time.perf_counter() - t_start
    accelerator.print(f"saved side network to {final} ({elapsed:.1f}s)")
    return final
