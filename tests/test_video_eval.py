"""Evaluation of video side networks: `lisa eval` on the pose_video task (a checkpoint series
with its curve, per-frame PCK, temporal consistency, the task-feature video Fréchet distance, an
animated GIF and a frame sheet) and on a folder of videos, one-line refusals of bad video input,
and validation during `lisa train --task pose_video --validation_feature_distance`. Everything
is read back from the files written."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lisa_control.cli import main

RES, FRAMES, CELL = 32, 4, 34  # a frame and its 2 px gutter in grids
# The feature network of the Fréchet distance, small enough for a CPU test.
SMALL_FEATURES = ["--feature_train_steps", "5", "--feature_pool", "16",
                  "--feature_reference_size", "16"]  # fmt: skip


def perturbed_side_network(unet, folder: Path, seed: int) -> Path:
    """A per-frame ControlNet for ``unet`` whose weights are moved off zero, so that its
    condition changes the samples; a different ``seed`` gives a different network."""
    from lisa_control.families.animatediff import AnimateDiffControlNetBranch

    branch = AnimateDiffControlNetBranch.from_main(unet, condition_downscale=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch.side_network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    branch.save_side_network(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A pixel-space motion UNet for pose_video (saved as `lisa pretrain` saves models), one
    side network, and a training run folder with two checkpoints and the run's config.json."""
    from diffusers import DDPMScheduler

    from lisa_control.families.loading import save_pixel_model
    from lisa_control.zoo.video import tiny_unet_motion

    root = tmp_path_factory.mktemp("video_eval")
    unet = tiny_unet_motion(seed=0, sample_size=RES)
    save_pixel_model(root / "model", unet, DDPMScheduler(), resolution=RES, task="pose_video")
    run = root / "run"
    for step, seed in ((1, 1), (2, 2)):
        checkpoint = run / f"checkpoint-{step}"
        perturbed_side_network(unet, checkpoint / "side_network", seed)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}))
    config = {"pretrained_model_name_or_path": str(root / "model"), "side_network": "controlnet",
              "output_dir": str(run), "task": "pose_video", "num_frames": FRAMES,
              "resolution": RES}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    controlnet = perturbed_side_network(unet, root / "controlnet", 3)
    return SimpleNamespace(root=root, model=root / "model", run=run, controlnet=controlnet)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


# ----------------------------------------------------------------------------- the task


def test_eval_pose_video_checkpoints_write_scores_curve_gif_and_frame_sheet(assets, tmp_path):
    """`lisa eval --checkpoints` on a video run: the task, frame count and model come from the
    run's config.json; every checkpoint is scored by per-frame PCK, temporal consistency and the
    video Fréchet distance, and the curve, GIFs and frame sheets have the clips' shapes."""
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoints", str(assets.run / "checkpoint-*"), "--num_conditions", "3",
            "--num_inference_steps", "2", "--threshold", "0.01", *SMALL_FEATURES,
            "--output_dir", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == {"kind": "task", "task": "pose_video", "resolution": RES,
                              "held_out_seed": 10_007, "num_conditions": 3,
                              "num_frames": FRAMES}  # fmt: skip
    assert report["settings"]["family"] == "animatediff"
    assert report["metric"] == "pck" and report["higher_is_better"] is True
    metrics = report["metrics"]
    assert {"pck", "temporal_consistency", "motion_error", "video_frechet_distance"} <= set(metrics)
    for key in ("pck", "temporal_consistency", "detected"):
        assert 0.0 <= metrics[key] <= 1.0
    assert np.isfinite(metrics["video_frechet_distance"]) and metrics["video_frechet_distance"] > 0
    assert "not FVD" in report["frechet"]["features"] and report["frechet"]["num_frames"] == FRAMES
    rows = report["per_condition"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert np.mean([r["pck"] for r in rows]) == pytest.approx(metrics["pck"])
    assert np.mean([r["temporal_consistency"] for r in rows]) == pytest.approx(
        metrics["temporal_consistency"]
    )

    points = report["checkpoints"]
    assert [p["step"] for p in points] == [1, 2] and points[-1]["metrics"] == metrics
    # Two side networks, two sets of samples: their distances differ.
    distances = [p["metrics"]["video_frechet_distance"] for p in points]
    assert distances[0] != distances[1]
    curve = json.loads((out / "curve.json").read_text())
    assert curve["metric"] == "pck" and curve["steps"] == [1, 2]
    assert curve["values"] == [p["metrics"]["pck"] for p in points]
    assert [p["video_frechet_distance"] for p in curve["points"]] == distances
    reached = next((p["step"] for p in points if p["metrics"]["pck"] >= 0.01), None)
    assert curve["steps_to_threshold"] == reached
    assert Image.open(out / "curve.png").size[0] > 0

    # condition | sample | ground truth, one row per condition, animated over the 4 frames
    for stem in ("samples", "samples-step-1", "samples-step-2"):
        frames = gif_frames(out / f"{stem}.gif")
        assert len(frames) == FRAMES
        assert frames[0].shape == (2 + 3 * CELL, 2 + 3 * CELL, 3)
        assert any(np.any(f != frames[0]) for f in frames[1:])  # moving, not a still
        with Image.open(out / f"{stem}_frames.png") as sheet:
            # one line per clip (3 conditions x 3 clips), its 4 frames side by side
            assert sheet.size == (2 + FRAMES * CELL, 2 + 9 * CELL)
    assert not (out / "samples.png").exists()


def test_eval_video_scores_are_the_task_metrics_of_the_samples_it_draws(assets, tmp_path):
    """The library call: the scores in eval.json are pose_video's metrics and the video
    Fréchet distance of the very samples drawn, and the frame sheet holds those samples."""
    from lisa_control.data.tasks import get_task
    from lisa_control.eval.evaluate import EvalConfig, evaluate
    from lisa_control.eval.feature_distance import TaskFeatureDistance
    from lisa_control.eval.validation import held_out_task_samples
    from lisa_control.eval.video import video_to_uint8

    cfg = EvalConfig(output_dir=str(tmp_path), controlnet=str(assets.controlnet),
                     pretrained_model_name_or_path=str(assets.model), num_conditions=3,
                     num_frames=FRAMES, num_inference_steps=2, batch_size=2, seed=1,
                     feature_train_steps=5, feature_pool=16,
                     feature_reference_size=16)  # fmt: skip
    images = evaluate(cfg)["images"]
    assert images.shape == (3, 3, FRAMES, RES, RES)
    written = json.loads((tmp_path / "eval.json").read_text())
    task = get_task("pose_video", resolution=RES, frames=FRAMES)
    truth = held_out_task_samples(task, 3, seed=1)
    expected = task.fidelity(images, truth)
    assert {k: written["metrics"][k] for k in expected} == pytest.approx(expected)
    distance = TaskFeatureDistance(task, reference_size=16, train_steps=5, pool=16, device="cpu")
    assert written["metrics"]["video_frechet_distance"] == pytest.approx(distance(images), rel=1e-4)
    # The sheet's second line of each condition is its sample, frame after frame.
    sheet = np.asarray(Image.open(tmp_path / "samples_frames.png"))
    samples = video_to_uint8(images)
    for i in range(3):
        y = 2 + (3 * i + 1) * CELL
        for f in range(FRAMES):
            x = 2 + f * CELL
            assert np.array_equal(sheet[y : y + RES, x : x + RES], samples[i, f])


# ----------------------------------------------------------------------------- video folders


def write_gif(path: Path, frames) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)


def make_video_test_folder(root: Path, rows=None) -> Path:
    """Three pose_video clips of 6 frames as GIFs, their skeletons as GIFs (the last one as a
    folder of frames), and a metadata.jsonl naming them (``rows`` replaces it)."""
    from lisa_control.data.tasks import get_task

    task = get_task("pose_video", resolution=RES, frames=6)
    written = []
    for k in range(3):
        clip = task.sample(7, k)
        write_gif(root / "clips" / f"walk{k}.gif", clip.image)
        if k == 2:
            (root / "poses" / "walk2").mkdir(parents=True)
            for f, frame in enumerate(clip.condition):
                Image.fromarray(frame).save(root / "poses" / "walk2" / f"{f:02d}.png")
            condition = "poses/walk2"
        else:
            write_gif(root / "poses" / f"walk{k}.gif", clip.condition)
            condition = f"poses/walk{k}.gif"
        written.append({"video": f"clips/walk{k}.gif", "conditioning_video": condition,
                        "text": clip.caption, "fps": 8})  # fmt: skip
    rows = written if rows is None else rows
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_eval_video_folder_scores_each_frame_with_an_extractor_and_the_video_distance(
    assets, tmp_path
):
    """A folder naming videos and condition videos: clips of --num_frames frames, edges
    re-extracted from every frame (a clip scores the mean over its frames), the video Fréchet
    distance to the real clips, and a GIF with the re-extracted edges as a fourth column."""
    data = make_video_test_folder(tmp_path / "data")
    out = tmp_path / "eval"
    argv = ["eval", "--controlnet", str(assets.controlnet), "--pretrained_model_name_or_path",
            str(assets.model), "--test_data_dir", str(data), "--num_frames", str(FRAMES),
            "--extractor", "edges", "--num_inference_steps", "2", *SMALL_FEATURES,
            "--output_dir", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["kind"] == "folder" and report["data"]["rows"] == 3
    assert report["data"]["num_frames"] == FRAMES
    assert report["metric"] == "edge_f1"
    metrics = report["metrics"]
    assert {"edge_f1", "reference_edge_f1", "video_frechet_distance"} <= set(metrics)
    assert 0.0 <= metrics["edge_f1"] <= 1.0 and metrics["video_frechet_distance"] > 0
    assert "the real test clips" in report["frechet"]["features"]
    rows = report["per_condition"]
    assert [r["name"] for r in rows] == ["walk0", "walk1", "walk2"]
    assert rows[0]["prompt"].startswith("a person in")
    assert np.mean([r["edge_f1"] for r in rows]) == pytest.approx(metrics["edge_f1"])
    frames = gif_frames(out / "samples.gif")
    assert len(frames) == FRAMES and frames[0].shape == (2 + 3 * CELL, 2 + 4 * CELL, 3)
    with Image.open(out / "samples_frames.png") as sheet:
        assert sheet.size == (2 + FRAMES * CELL, 2 + 12 * CELL)


def bad_rows(root: Path) -> dict:
    """Case -> (metadata rows, extra flags, what the message must say: the file, the fix)."""
    from lisa_control.data.tasks import get_task

    clip = get_task("pose_video", resolution=RES, frames=6).sample(7, 0)
    write_gif(root / "short.gif", clip.condition[:3])
    (root / "broken.gif").write_bytes(b"GIF89a" + bytes(40))
    good = {"video": "clips/walk0.gif", "conditioning_video": "poses/walk0.gif", "text": "x"}
    return {
        "unreadable video": (
            [{**good, "video": "broken.gif"}], [],
            [r"cannot decode video \S*broken\.gif", "re-save it or pass frames"],
        ),
        "frame counts differ": (
            [{**good, "conditioning_video": "short.gif"}], [],
            [r"the video 'clips/walk0\.gif' has 6 frames but its condition 'short\.gif' has 3",
             "make the condition video from the clip, frame for frame"],
        ),
        "too few frames": (
            [good], ["--num_frames", "8"],
            [r"the video 'clips/walk0\.gif' has 6 frames, too few for 8 frames",
             "use a longer clip or lower --num_frames"],
        ),
        "fps not a number": (
            [{**good, "fps": "fast"}], [],
            [r"line 1 of \S*metadata\.jsonl, column 'fps' holds \"fast\" \(str\), not a number",
             "write the frame rate, e.g. 24"],
        ),
        "fps missing": (
            [{**good, "fps": 8}, good], ["--frame_rate", "4"],
            [r"line 2 of \S*metadata\.jsonl has no 'fps' key, which --frame_rate needs",
             r"add it \(e\.g\. \"fps\": 24\) or drop --frame_rate"],
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["unreadable video", "frame counts differ", "too few frames", "fps not a number",
     "fps missing"],
)  # fmt: skip
def test_bad_video_input_ends_in_one_line_naming_the_file_and_the_fix(
    assets, tmp_path, capsys, case
):
    """Each problem stops `lisa eval` before it writes anything, with one line that names the
    file and the fix; the eval.json of an earlier evaluation in the output folder is kept."""
    data = make_video_test_folder(tmp_path / "data")
    rows, extra, patterns = bad_rows(data)[case]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"metrics": {"pck": 0.5}}')
    argv = ["eval", "--controlnet", str(assets.controlnet), "--pretrained_model_name_or_path",
            str(assets.model), "--test_data_dir", str(data), "--num_frames", str(FRAMES),
            "--num_inference_steps", "1", "--output_dir", str(out), "--no-progress",
            *extra]  # fmt: skip
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith("lisa eval: error: ") and str(data) in err, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    assert (out / "eval.json").read_text() == '{"metrics": {"pck": 0.5}}'
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


def test_eval_refuses_video_settings_that_do_not_fit_the_model_in_one_line(
    assets, tmp_path, capsys, monkeypatch
):
    from lisa_control.eval import metrics

    # Inception weights that load (the refusal is about videos, not the file).
    monkeypatch.setattr(metrics, "InceptionFID", lambda *args, **kwargs: object())
    base = ["eval", "--controlnet", str(assets.controlnet), "--pretrained_model_name_or_path",
            str(assets.model), "--output_dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    cases = [
        (["--task", "pose"], "--task pose renders images but the main network (animatediff)"),
        (["--task", "pose_video", "--inception_weights", str(tmp_path)],
         "--inception_weights scores images"),
        (["--task", "pose_video", "--frame_rate", "0"], "--frame_rate must be a positive"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = one_line_error(capsys)
        assert message in err, err
    assert not (tmp_path / "out" / "eval.json").exists()


# ----------------------------------------------------------------------------- validation


def test_validation_of_pose_video_reports_the_video_feature_distance(assets, tmp_path, monkeypatch):
    """`lisa train --task pose_video --validation_feature_distance`: validation.jsonl holds
    per-frame PCK, temporal consistency and the video Fréchet distance at every validation
    step (the feature network shrunk for the CPU)."""
    from lisa_control.eval import feature_distance

    small = functools.partial(
        feature_distance.TaskFeatureDistance, reference_size=16, train_steps=5, pool=16
    )
    monkeypatch.setattr(feature_distance, "TaskFeatureDistance", small)
    out = tmp_path / "run"
    argv = ["train", "--pretrained_model_name_or_path", str(assets.model), "--task",
            "pose_video", "--num_frames", str(FRAMES), "--train_batch_size", "2",
            "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "1",
            "--validation_conditions", "3", "--validation_inference_steps", "1",
            "--validation_feature_distance", "--seed", "0", "--output_dir", str(out),
            "--report_to", "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    scores = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scores] == [1, 2]
    for s in scores:
        assert 0.0 <= s["pck"] <= 1.0 and 0.0 <= s["temporal_consistency"] <= 1.0
        assert np.isfinite(s["video_feature_distance"]) and s["video_feature_distance"] > 0
        assert "feature_distance" not in s
    assert scores[0]["video_feature_distance"] != scores[1]["video_feature_distance"]
    assert len(gif_frames(out / "validation" / "step-2.gif")) == FRAMES
