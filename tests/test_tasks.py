"""The procedural tasks: seeded rendering, the dataset's conventions, and metrics that tell
ground truth from mismatched or blank images."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lisa_control.data.tasks import (
    TaskDataset,
    TaskSample,
    available_tasks,
    get_task,
    pose,
    register_task,
    segmentation,
)
from lisa_control.core.errors import ConfigError

PROCEDURAL = ("pose", "edges", "segmentation", "super_resolution")
METRICS = {
    "pose": "pck",
    "edges": "edge_f1",
    "segmentation": "miou",
    "super_resolution": "psnr_condition",
}


def images_of(samples: list[TaskSample]) -> torch.Tensor:
    """Ground-truth images as a generator would output them: (B, 3, H, W) in [-1, 1]."""
    stacked = np.stack([s.image for s in samples]).astype(np.float32)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2) / 127.5 - 1


@pytest.fixture(scope="module", params=[(n, r) for n in PROCEDURAL for r in (32, 64)], ids=str)
def rendered(request):
    name, resolution = request.param
    task = get_task(name, resolution=resolution)
    samples = [task.sample(7, i) for i in range(64)]
    return task, samples


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_procedural_and_packaged_tasks():
    names = available_tasks()
    assert set(PROCEDURAL) <= set(names)
    assert {"fashion_mnist_edges", "emoji_segmentation"} <= set(names)
    assert names == sorted(names)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        get_task("posture")
    for name in PROCEDURAL:
        assert name in str(e.value)


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="pose"):

        @register_task
        class Impostor(pose.PoseTask):
            name = "pose"


@pytest.mark.parametrize("resolution", [10, 33, 1024, 32.0])
def test_unsupported_resolution_is_a_config_error(resolution):
    with pytest.raises(ConfigError, match="resolution"):
        get_task("edges", resolution=resolution)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_tasks_declare_their_metric(name):
    task = get_task(name)
    assert task.name == name
    assert task.metric_name == METRICS[name]
    assert task.condition_channels == 3


# ----------------------------------------------------------------------------- rendering


def test_same_seed_and_index_give_the_same_sample(rendered):
    task, samples = rendered
    again = task.sample(7, 3)
    assert np.array_equal(again.image, samples[3].image)
    assert np.array_equal(again.condition, samples[3].condition)
    assert again.caption == samples[3].caption
    assert not np.array_equal(samples[3].image, samples[4].image)
    assert not np.array_equal(task.sample(8, 3).image, samples[3].image)


def test_samples_have_the_documented_types(rendered):
    task, samples = rendered
    r = task.resolution
    for s in samples[:8]:
        assert s.image.shape == (r, r, 3) and s.image.dtype == np.uint8
        assert s.condition.shape == (r, r, task.condition_channels)
        assert s.condition.dtype == np.uint8
        assert isinstance(s.caption, str) and s.caption
        assert isinstance(s.meta, dict)


@pytest.mark.parametrize("name", PROCEDURAL)
@pytest.mark.parametrize("resolution", [32, 64])
def test_dataset_items_follow_the_controlnet_conventions(name, resolution):
    dataset = TaskDataset(get_task(name, resolution=resolution), size=5, seed=3)
    assert len(dataset) == 5
    item = dataset[2]
    assert set(item) == {"pixel_values", "conditioning_pixel_values", "caption", "index"}
    image, condition = item["pixel_values"], item["conditioning_pixel_values"]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert condition.shape == (3, resolution, resolution) and condition.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and image.std() > 0
    assert 0 <= condition.min() and condition.max() <= 1 and condition.max() > 0
    assert item["index"] == 2 and isinstance(item["caption"], str)
    assert np.array_equal(dataset.sample(2).image, dataset.task.sample(3, 2).image)
    with pytest.raises(IndexError):
        dataset[5]


def test_dataset_batches_through_a_dataloader():
    dataset = TaskDataset(get_task("pose"), size=6)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert len(batch["caption"]) == 4


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        TaskDataset(get_task("edges"), size=0)
    with pytest.raises(ConfigError):
        get_task("edges").sample(-1, 0)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_rendering_is_fast(name):
    task = get_task(name, resolution=32)
    task.sample(0, 0)
    start = time.process_time()
    for i in range(50):
        task.sample(0, i)
    per_sample = (time.process_time() - start) / 50
    # the brief asks for well under 5 ms; the margin is for slow, shared CI machines
    assert per_sample < 0.010, f"{name}: {per_sample * 1000:.1f} ms per sample"


# ----------------------------------------------------------------------------- metrics


def test_ground_truth_scores_at_the_top_and_mismatches_near_the_bottom(rendered):
    task, samples = rendered
    real = images_of(samples)
    scores = {
        "real": task.fidelity(real, samples)[task.metric_name],
        "shuffled": task.fidelity(torch.roll(real, 1, 0), samples)[task.metric_name],
        "blank": task.fidelity(torch.full_like(real, -1), samples)[task.metric_name],
        "grey": task.fidelity(torch.zeros_like(real), samples)[task.metric_name],
    }
    if task.name == "super_resolution":
        assert scores["real"] >= 40
        assert max(scores["shuffled"], scores["blank"], scores["grey"]) <= 16
    else:
        assert scores["real"] >= 0.9, scores
        assert scores["shuffled"] <= 0.5, scores
        assert max(scores["blank"], scores["grey"]) <= 0.2, scores


def test_fidelity_reports_the_primary_and_secondary_metrics(rendered):
    task, samples = rendered
    result = task.fidelity(images_of(samples[:4]), samples[:4])
    assert task.metric_name in result
    assert len(result) >= 2
    assert all(isinstance(v, float) and np.isfinite(v) for v in result.values())


def test_super_resolution_reports_psnr_against_the_ground_truth_too():
    task = get_task("super_resolution")
    samples = [task.sample(0, i) for i in range(8)]
    real = task.fidelity(images_of(samples), samples)
    blurred = torch.nn.functional.interpolate(
        torch.nn.functional.avg_pool2d(images_of(samples), 4), scale_factor=4, mode="nearest"
    )
    upscaled = task.fidelity(blurred, samples)
    # the nearest-upsampled condition explains the condition but not the fine detail
    assert upscaled["psnr_condition"] > 40
    assert upscaled["psnr_gt"] < real["psnr_gt"] - 40


def test_fidelity_checks_the_batch_matches_the_samples():
    task = get_task("edges")
    samples = [task.sample(0, i) for i in range(3)]
    with pytest.raises(ConfigError, match="same order"):
        task.fidelity(images_of(samples)[:2], samples)
    with pytest.raises(ConfigError, match="resolution"):
        task.fidelity(torch.zeros(3, 3, 64, 64), samples)


def test_realism_tells_real_renders_from_blank_and_noise(rendered):
    task, samples = rendered
    real = images_of(samples)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    score = task.realism(real)
    assert score >= 0.6
    for fake in (torch.full_like(real, -1), torch.zeros_like(real), torch.ones_like(real), noise):
        assert task.realism(fake) <= min(0.25, score / 3)


def test_metrics_of_64_images_are_fast(rendered):
    task, samples = rendered
    images = images_of(samples)
    task.realism(images[:1])  # renders the reference once
    start = time.process_time()
    task.fidelity(images, samples)
    task.realism(images)
    assert time.process_time() - start < 1.0


def test_two_touching_markers_do_not_fake_the_joint_between_their_colours():
    image = np.full((1, 16, 16, 3), 128.0, dtype=np.float32)
    image[0, 4:6, 4:6] = pose.JOINT_COLOURS[9]  # cyan
    image[0, 4:6, 6:8] = pose.JOINT_COLOURS[12]  # blue; cyan + blue averages to joints 10, 11
    found, distance = pose.locate_markers(image, 2)
    detected = distance[0] < pose.MARKER_TOLERANCE
    assert detected.tolist() == [j in (9, 12) for j in range(14)]
    assert found[0, 9].tolist() == [4.5, 4.5] and found[0, 12].tolist() == [6.5, 4.5]


# ----------------------------------------------------------------------------- invariants


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6))
def test_every_pose_shows_all_markers_where_the_joints_are(seed, index):
    task = get_task("pose")
    s = task.sample(seed, index)
    found, distance = pose.locate_markers(s.image[None].astype(np.float32), task.marker_size)
    assert (distance < pose.MARKER_TOLERANCE).all()
    assert np.abs(found[0] - s.meta["joints"]).max() <= 0.5 + 1e-9
    scene = s.image.reshape(-1, 3).astype(int)
    is_marker = (scene[:, None] == pose.JOINT_COLOURS.astype(int)).all(-1).any(-1)
    chroma = scene.max(-1) - scene.min(-1)
    assert (chroma[~is_marker] <= pose.MAX_SCENE_CHROMA + 1).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6))
def test_every_segmentation_pixel_is_classified_as_its_class(seed, index):
    s = get_task("segmentation").sample(seed, index)
    assert np.array_equal(segmentation.classify(s.image.astype(np.float32)), s.meta["labels"])
    assert np.array_equal(s.condition, segmentation.PALETTE[s.meta["labels"]])
