"""The task-feature Fréchet distance: the formula against an independent computation, the
yardstick on real renders (real beats blank, noise and blurred images), and its video variant
(shuffled or frozen real clips are far from real ones)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lisa_control.core.errors import ConfigError
from lisa_control.data.tasks import get_task
from lisa_control.eval.feature_distance import (
    NUM_TRANSFORMS,
    TaskFeatureDistance,
    frechet_distance,
    render,
    transform,
)


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A B)^1/2), with tr((AB)^1/2) taken as the sum of
    square roots of AB's eigenvalues (real and >= 0 for PSD A, B)."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb).real.clip(min=0)
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(eig).sum())


def test_frechet_distance_matches_independent_formula():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    a = rng.normal(size=(500, 6)) @ mix
    b = rng.normal(size=(300, 6)) @ mix.T * 0.5 + 1.0
    got = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.tensor([3.0, 0.0, -4.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(25.0, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="alike"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ConfigError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_transforms_rotate_and_degrade_as_labelled():
    images = render(get_task("pose", resolution=32), seed=0, count=4)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])  # rotations only, no degradation
    out = transform(images, labels, g)
    for k in range(4):
        assert torch.equal(out[k], torch.rot90(images[k], k, dims=(1, 2)))
    blurred = transform(images, torch.full((4,), 8), g)  # rotation 0, blur
    expected = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(blurred, expected.clamp(-1, 1))
    assert NUM_TRANSFORMS == 16


@pytest.fixture(scope="module")
def pose_distance():
    task = get_task("pose", resolution=32)
    return TaskFeatureDistance(
        task, reference_size=256, train_steps=150, pool=512, device="cpu"
    ).prepare()


def test_feature_network_learns_its_task(pose_distance):
    assert pose_distance.accuracy > 3 / NUM_TRANSFORMS  # chance is 1/16


def test_real_renders_are_closer_than_blank_noise_or_blur(pose_distance):
    task = pose_distance.task
    real = render(task, seed=5, count=128)
    g = torch.Generator().manual_seed(0)
    fd_real = pose_distance(real)
    fd_blank = pose_distance(torch.zeros_like(real))
    fd_noise = pose_distance(torch.rand(real.shape, generator=g) * 2 - 1)
    fd_blur = pose_distance(F.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False))
    assert fd_real < 0.5 * min(fd_blank, fd_noise, fd_blur), (fd_real, fd_blank, fd_noise, fd_blur)
    with pytest.raises(ConfigError, match=r"\(N, 3, H, W\)"):
        pose_distance(real[:, :1])


# ----------------------------------------------------------------------------- videos


def shuffled_frames(videos: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each clip (3, F, H, W) with its frames in a random order other than its own."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for clip in videos:
        order = torch.randperm(clip.shape[1], generator=g)
        if torch.equal(order, torch.arange(len(order))):
            order = order.roll(1)
        out.append(clip[:, order])
    return torch.stack(out)


@pytest.fixture(scope="module")
def pose_video_distance():
    task = get_task("pose_video", resolution=32, frames=8)
    return TaskFeatureDistance(
        task, reference_size=128, train_steps=150, pool=128, batch_size=32, device="cpu"
    ).prepare()


def test_video_distance_rises_when_the_frames_of_real_clips_are_shuffled(pose_video_distance):
    """Held-out real clips are close to the reference clips; the same clips with their frames
    shuffled, or frozen on their first frame, are far, though every frame is a real render."""
    from lisa_control.eval.video_features import TaskVideoFeatureNetwork

    distance = pose_video_distance
    assert isinstance(distance.network, TaskVideoFeatureNetwork)
    real = render(distance.task, seed=5, count=96)
    assert real.shape == (96, 3, 8, 32, 32)
    fd_real = distance(real)
    fd_shuffled = distance(shuffled_frames(real))
    fd_frozen = distance(real[:, :, :1].expand_as(real))
    assert fd_shuffled > 3 * fd_real and fd_frozen > 3 * fd_real, (fd_real, fd_shuffled, fd_frozen)
    # The frames alone cannot tell: the set of frames is the same, so their pooled features are.
    shuffled_features = distance.features(shuffled_frames(real))
    dim = shuffled_features.shape[1] // 3
    torch.testing.assert_close(shuffled_features[:, :dim], distance.features(real)[:, :dim])
    with pytest.raises(ConfigError, match="4 frames but the video feature distance compares"):
        distance(real[:, :, :4])
    with pytest.raises(ConfigError, match=r"takes videos \(N, 3, F, H, W\)"):
        distance(real[:, :, 0])


def test_video_features_pool_frames_their_speed_and_acceleration():
    """On a frame network whose feature map is each frame's brightness: the features are the
    mean brightness, the mean |change| and the mean |change of the change| over frames."""
    from lisa_control.eval.video_features import TaskVideoFeatureNetwork

    class Brightness(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def feature_maps(self, images):
            return images.mean(dim=1, keepdim=True)  # (N, 1, H, W)

    levels = torch.tensor([0.0, 1.0, 3.0, 6.0])  # speeds 1, 2, 3; accelerations 1, 1
    videos = levels.view(1, 1, 4, 1, 1).expand(2, 3, 4, 2, 2)
    net = TaskVideoFeatureNetwork(Brightness())
    torch.testing.assert_close(net.features(videos), torch.tensor([[2.5, 2.0, 1.0]] * 2))
    two = net.features(videos[:, :, :2])  # too short for an acceleration
    torch.testing.assert_close(two, torch.tensor([[0.5, 1.0, 0.0]] * 2))
