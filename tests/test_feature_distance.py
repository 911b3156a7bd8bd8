"""The task-feature Fréchet distance: the formula against an independent computation, and the
yardstick on real renders (real beats blank, noise and blurred images)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lisa_control.data.tasks import get_task
from lisa_control.core.errors import ConfigError
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
