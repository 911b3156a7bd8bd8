"""The convergence benchmark on the pose_video task: which main network each task trains on, and
a two-step CPU run of plain and LISA whose result file holds the per-frame PCK curve and the
task-feature video Fréchet distance read from the runs' validation logs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence  # noqa: E402

# Loaded by every `lisa train` the benchmark starts (a sitecustomize on PYTHONPATH): the feature
# network of the video Fréchet distance, shrunk to seconds on a CPU.
SMALL_FEATURE_NETWORK = """
import functools

from lisa_control.eval import feature_distance

feature_distance.TaskFeatureDistance = functools.partial(
    feature_distance.TaskFeatureDistance, reference_size=16, train_steps=5, pool=16
)
"""


def flags_of(argv: list[str]) -> dict[str, str]:
    return {k[2:]: v for k, v in zip(argv, argv[1:]) if k.startswith("--")}


def test_main_network_per_task_comes_from_the_table_unless_main_names_one():
    parse = convergence.build_parser().parse_args
    args = parse(["--tasks", "pose_video", "pose"])
    video = flags_of(convergence.run_flags(args, "pose_video", "plain", 0))
    assert video["pretrained_model_name_or_path"] == "embedded:pose_video"
    assert video["task"] == "pose_video"
    # A task the table does not list trains on what `lisa train --task` picks.
    assert "pretrained_model_name_or_path" not in flags_of(
        convergence.run_flags(args, "pose", "plain", 0)
    )
    args = parse(["--tasks", "pose_video", "--main", "pose_video=models/motion"])
    given = flags_of(convergence.run_flags(args, "pose_video", "lisa", 1))
    assert given["pretrained_model_name_or_path"] == "models/motion"
    assert given["regularizer"] == "lisa" and given["seed"] == "1"
    with pytest.raises(SystemExit, match="write TASK=DIR"):
        convergence.run_flags(parse(["--main", "models/motion"]), "pose_video", "plain", 0)


@pytest.fixture
def motion_model(tmp_path):
    """A tiny pixel-space motion UNet for pose_video, saved as `lisa pretrain` saves models."""
    from diffusers import DDPMScheduler

    from lisa_control.families.loading import save_pixel_model
    from lisa_control.zoo.video import tiny_unet_motion

    folder = tmp_path / "motion"
    unet = tiny_unet_motion(seed=0, sample_size=32)
    save_pixel_model(folder, unet, DDPMScheduler(), resolution=32, task="pose_video")
    return folder


def test_convergence_on_pose_video_reports_per_frame_pck_and_the_video_distance(
    motion_model, tmp_path, monkeypatch, capsys
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SMALL_FEATURE_NETWORK)
    paths = [str(site), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    out, runs = tmp_path / "convergence.json", tmp_path / "runs"
    argv = ["--tasks", "pose_video", "--main", f"pose_video={motion_model}", "--variants",
            "plain", "lisa", "--seeds", "0", "--steps", "2", "--eval_every", "1",
            "--eval_conditions", "2", "--eval_inference_steps", "1", "--parallel", "2",
            "--workers_per_run", "0", "--set", "num_frames=4", "train_batch_size=2",
            "validation_feature_distance=", "--run_dir", str(runs), "--out", str(out)]  # fmt: skip
    convergence.main(argv)
    for variant in ("plain", "lisa"):
        run = runs / "pose_video" / variant / "seed0"
        config = json.loads((run / "config.json").read_text())
        assert config["pretrained_model_name_or_path"] == str(motion_model), (
            run / "stdout.txt"
        ).read_text()[-2000:]
        assert config["num_frames"] == 4 and config["validation_feature_distance"] is True

    result = json.loads(out.read_text())
    info = result["tasks"]["pose_video"]
    assert info["metric"] == "pck"
    assert info["feature_distance_metric"] == "video_feature_distance"
    for variant in ("plain", "lisa"):
        (run,) = info["variants"][variant]
        logged = [
            json.loads(line)
            for line in (runs / "pose_video" / variant / "seed0" / "validation.jsonl")
            .read_text()
            .splitlines()
        ]
        assert [tuple(p) for p in run["curve"]] == [(e["step"], e["pck"]) for e in logged]
        assert [s for s, _ in run["curve"]] == [1, 2]
        assert all(0.0 <= v <= 1.0 for _, v in run["curve"])
        distances = run["feature_distance_curve"]
        assert [s for s, _ in distances] == [1, 2]
        assert all(math.isfinite(v) and v > 0 for _, v in distances)
        assert distances == [[e["step"], e["video_feature_distance"]] for e in logged]
        assert info["feature_distance_at_budget"][variant]["2"]["mean"] == distances[-1][1]
        assert info["at_budget"][variant]["2"]["mean"] == run["curve"][-1][1]
    assert out.with_suffix(".png").is_file()
    assert "video feature distance at" in capsys.readouterr().out
