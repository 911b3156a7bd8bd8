"""Where the training loop's numbers go: the loss log (JSON lines), per-rank logs, the
experiment tracker (TensorBoard, ...) and the progress bar.

A step's logs stay device tensors: :class:`LossRecorder` sums them on the device, closes a
window of steps into one record every ``logging_steps`` steps, and turns pending records into
numbers in one transfer every ``flush_steps`` steps (all-reduced across processes first).
Between flushes nothing here waits for the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import torch

from ..core.files import write_text_atomically


class Sink(Protocol):
    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


class JsonLines:
    """Appends each record as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def close(self) -> None:
        pass


class Tracker:
    """Sends every value of a record to the accelerator's trackers at the record's step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def write(self, records: list[dict]) -> None:
        for record in records:
            values = {k: v for k, v in record.items() if k != "step"}
            self.accelerator.log(values, step=record["step"])

    def close(self) -> None:
        pass


class ProgressBar:
    """A tqdm bar advanced to the last record's step, showing its loss (and LISA's aux loss)."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="steps", dynamic_ncols=True)

    def write(self, records: list[dict]) -> None:
        last = records[-1]
        self.bar.update(last["step"] - self.bar.n)
        postfix = {"loss": f"{last['loss']:.4f}"}
        if "aux_loss" in last:
            postfix["aux"] = f"{last['aux_loss']:.4f}"
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def training_sinks(
    accelerator, output_dir: Path, progress: bool, total_steps: int, start_step: int
) -> list[Sink]:
    """The loss log and the tracker on the main process; on every other rank its own
    ``loss_log.rankN.jsonl`` of the all-reduced records, so ranks can be checked to agree."""
    if not accelerator.is_main_process:
        return [JsonLines(output_dir / f"loss_log.rank{accelerator.process_index}.jsonl")]
    sinks: list[Sink] = [JsonLines(output_dir / "loss_log.jsonl")]
    if accelerator.log_with:
        sinks.append(Tracker(accelerator))
    if progress and accelerator.is_local_main_process:
        sinks.append(ProgressBar(total_steps, start_step))
    return sinks


def start_tracker(accelerator, project: str, config: dict) -> None:
    """Start the trackers on the main process, with the run's scalar settings as its config."""
    if accelerator.is_main_process and accelerator.log_with:
        scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project, config=scalars)


class LossRecorder:
    """Means of the step logs over windows of steps, written to ``sinks``.

    ``add`` takes one optimizer step's logs, ``end_step`` marks the step done with host-side
    values (learning rate, ...), ``flush`` converts the
    pending records and writes them; ``close`` ends the last window and flushes. Every process
    must call ``flush`` at the same steps: it all-reduces the records.
    """

    def __init__(self, accelerator, sinks: list[Sink], logging_steps: int = 1, flush_steps=None):
        self.accelerator = accelerator
        self.sinks = sinks
        self.logging_steps = logging_steps
        self.flush_steps = flush_steps or logging_steps
        self.records: list[dict] = []  # every flushed record of this run
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0  # steps in the open window
        self._pending: list[tuple[dict, dict[str, torch.Tensor], dict]] = []
        self._window_start = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """Add one optimizer step's logs (scalar tensors, left on their device)."""
        for key, value in logs.items():
            value = value.detach().float().reshape(())
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def end_step(self, step: int, host_values: dict[str, float], last: bool = False) -> None:
        """Count a finished step; close the window at log steps (and at the ``last`` step)."""
        self._steps += 1
        if step % self.logging_steps == 0 or last:
            self._close_window(step, host_values)
        if self._pending and (step % self.flush_steps == 0 or last):
            self.flush()

    def _close_window(self, step: int, host_values: dict[str, float]) -> None:
        if not self._steps:
            return
        now = time.perf_counter()
        # Wall time per step since the previous record (validation and checkpoints included).
        host = {**host_values, "step_seconds": (now - self._window_start) / self._steps}
        means = {k: v / self._steps for k, v in self._sums.items()}
        self._pending.append(({"step": step}, means, host))
        self._sums, self._steps, self._window_start = {}, 0, now

    def flush(self) -> list[dict]:
        """Turn the pending records into numbers (one device transfer) and write them."""
        if not self._pending:
            return []
        keys = [list(means) for _, means, _ in self._pending]
        flat = [v for _, means, _ in self._pending for v in means.values()]
        numbers = self.accelerator.reduce(torch.stack(flat), "mean").tolist() if flat else []
        records, i = [], 0
        for (head, _, host), names in zip(self._pending, keys):
            values = dict(zip(names, numbers[i : i + len(names)]))
            records.append({**head, **values, **host})
            i += len(names)
        self._pending.clear()
        self.records.extend(records)
        for sink in self.sinks:
            sink.write(records)
        return records

    @property
    def last(self) -> dict | None:
        """The newest record, after flushing what is pending."""
        self.flush()
        return self.records[-1] if self.records else None

    def close(self, step: int, host_values: dict[str, float]) -> None:
        self._close_window(step, host_values)
        self.flush()
        for sink in self.sinks:
            sink.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it is resumed from (all of them
    for ``step`` 0). The file is replaced in one rename, so a kill while truncating leaves the
    old or the new lines, never a part of them."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)  # an earlier truncation that a kill interrupted
    if not path.is_file():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the kill
    new = "".join(line + "\n" for line in kept)
    if new == text:
        return
    write_text_atomically(path, new)
