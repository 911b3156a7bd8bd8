"""What reaches the tracker and the loss log: every step's loss, regularizer terms and learning
rate go to TensorBoard from the main process at exactly the logged steps, with the values of
loss_log.jsonl; ``--logging_steps N`` writes the mean of each window of N steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import make_image_folder, make_pixel_model

from lisa_control.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return make_pixel_model(root / "model"), make_image_folder(root / "data", n=8)


def run(assets, out: Path, steps: int, *extra: str) -> list[dict]:
    model, data = assets
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir",
            str(data), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps",
            str(steps), "--checkpointing_steps", "1000", "--validation_steps", "1000",
            "--learning_rate", "1e-3", "--report_to", "tensorboard", "--output_dir", str(out),
            "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's TensorBoard events, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    # the run's events, and a folder of their own for the hyperparameters
    for path in sorted((out / "logs").rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert found, "no scalars in the tensorboard events"
    return found


@pytest.fixture(scope="module")
def every_step(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("every") / "run"
    return out, run(assets, out, 4)


def test_tracker_gets_loss_terms_and_lr_at_every_logged_step(every_step):
    out, log = every_step
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    tracked = scalars(out)
    for tag in ("loss", "diffusion_loss", "aux_loss", "lr"):
        assert tag in tracked, sorted(tracked)
        assert [s for s, _ in tracked[tag]] == [1, 2, 3, 4], (tag, tracked[tag])
        for (step, value), record in zip(tracked[tag], log):
            assert value == pytest.approx(record[tag], rel=1e-5), (tag, step)
    # every term of the step's logs goes to the tracker, not only the total
    terms = set(log[0]) - {"step"}
    assert terms <= set(tracked), terms - set(tracked)


def test_logging_steps_writes_window_means(assets, every_step, tmp_path):
    """Same seed and data with records every 2 steps: each record is the mean of the per-step
    records it covers; the last, shorter window is written at the last step."""
    _, per_step = every_step
    out = tmp_path / "windows"
    log = run(assets, out, 5, "--logging_steps", "2")
    reference = run(assets, tmp_path / "five", 5)
    # a 5-step run repeats the 4-step one
    assert [r["loss"] for r in reference[:4]] == [r["loss"] for r in per_step]
    assert [r["step"] for r in log] == [2, 4, 5]
    windows = {2: reference[0:2], 4: reference[2:4], 5: reference[4:5]}
    for record in log:
        covered = windows[record["step"]]
        for key in ("loss", "diffusion_loss", "aux_loss"):
            mean = sum(r[key] for r in covered) / len(covered)
            assert record[key] == pytest.approx(mean, rel=1e-6), (record["step"], key)
        assert record["lr"] == covered[-1]["lr"]
    tracked = scalars(out)
    assert [s for s, _ in tracked["loss"]] == [2, 4, 5]
    for (_, value), record in zip(tracked["loss"], log):
        assert value == pytest.approx(record["loss"], rel=1e-5)
