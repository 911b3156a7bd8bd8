"""Tasks over images from OS packages: found where the packages install them or where the user
points, a DataError that says what to install otherwise, and the procedural tasks' metrics.

Most tests build a tiny stand-in of each package's files; the tests marked 'installed' use the
real packages and skip when they are absent."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lisa_control.data import packaged
from lisa_control.data.tasks import TaskDataset, get_task
from lisa_control.core.errors import ConfigError, DataError

FASHION_TASKS = ("fashion_mnist_edges", "fashion_mnist_super_resolution")
EMOJI_TASKS = ("emoji_edges", "emoji_segmentation", "emoji_super_resolution")


def images_of(samples) -> torch.Tensor:
    stacked = np.stack([s.image for s in samples]).astype(np.float32)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2) / 127.5 - 1


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    """A Fashion-MNIST stand-in: 12 bright rectangles of random size on black."""
    rng = np.random.default_rng(0)
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    for img in images:
        top, left = rng.integers(2, 10, size=2)
        img[top : top + rng.integers(8, 16), left : left + rng.integers(8, 16)] = 200
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    return tmp_path


@pytest.fixture
def emoji_project(tmp_path):
    """A folder where `npm install emoji-datasource-google` was run, with 5 disc emoji."""
    package = tmp_path / "node_modules" / packaged.EMOJI_PACKAGE
    images = package / packaged.EMOJI_IMAGES
    images.mkdir(parents=True)
    entries = []
    for k in range(5):
        rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(rgba).ellipse([8 + k, 10, 50, 54 - k], fill=(220, 40 * k, 60, 255))
        rgba.save(images / f"1f60{k}.png")
        entries.append({"name": f"FACE NUMBER {k}", "image": f"1f60{k}.png"})
    (package / "emoji.json").write_text(json.dumps(entries))
    return tmp_path


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("name", FASHION_TASKS)
@pytest.mark.parametrize("resolution", [32, 64])
def test_fashion_mnist_tasks_read_the_package_files(name, resolution, fashion_dir):
    task = get_task(name, resolution=resolution, data_dir=fashion_dir)
    samples = [task.sample(0, i) for i in range(12)]
    assert sorted(s.meta["source_index"] for s in samples) == list(range(12))
    s = samples[0]
    assert s.image.shape == (resolution, resolution, 3) and s.image.dtype == np.uint8
    assert s.condition.shape == (resolution, resolution, 3)
    assert s.caption.startswith("a grey photo of a")
    assert np.array_equal(task.sample(0, 5).image, samples[5].image)
    real = task.fidelity(images_of(samples), samples)[task.metric_name]
    blank = task.fidelity(torch.full_like(images_of(samples), -1), samples)[task.metric_name]
    assert real >= (40 if name.endswith("resolution") else 0.9)
    assert blank < real / 2


def test_fashion_mnist_directory_from_the_environment(fashion_dir, monkeypatch):
    monkeypatch.setenv(packaged.FASHION_MNIST_ENV, str(fashion_dir))
    assert len(get_task("fashion_mnist_edges").images) == 12


def test_missing_fashion_mnist_says_which_package_to_install(tmp_path):
    with pytest.raises(DataError) as e:
        get_task("fashion_mnist_edges", data_dir=tmp_path)
    message = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert packaged.FASHION_MNIST_ENV in message and str(tmp_path) in message


def test_corrupt_fashion_mnist_is_a_data_error(fashion_dir):
    (fashion_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03junk"))
    with pytest.raises(DataError, match="reinstall"):
        get_task("fashion_mnist_edges", data_dir=fashion_dir)


def test_unknown_fashion_mnist_split(fashion_dir):
    with pytest.raises(ConfigError, match="split"):
        get_task("fashion_mnist_edges", data_dir=fashion_dir, split="validation")


# ----------------------------------------------------------------------------- emoji


@pytest.mark.parametrize("name", EMOJI_TASKS)
def test_emoji_tasks_read_the_npm_package(name, emoji_project):
    task = get_task(name, resolution=32, data_dir=emoji_project)
    samples = [task.sample(1, i) for i in range(5)]
    assert {s.caption.split(" on ")[0] for s in samples} == {
        f"an emoji of face number {k}" for k in range(5)
    }
    real = task.fidelity(images_of(samples), samples)[task.metric_name]
    blank = task.fidelity(torch.full_like(images_of(samples), -1), samples)[task.metric_name]
    assert real >= (40 if name.endswith("resolution") else 0.9)
    assert blank < real / 2


def test_emoji_segmentation_condition_is_the_alpha_mask(emoji_project):
    task = get_task("emoji_segmentation", resolution=64, data_dir=emoji_project)
    s = task.sample_of_image(0)
    alpha = np.asarray(Image.open(task.images.files[0]).getchannel("A")) > 127
    assert np.array_equal(s.condition[..., 0] > 127, alpha)
    assert (s.image[~alpha] == packaged.GREEN_SCREEN).all()


@pytest.mark.parametrize("depth", ["project", "package", "images"])
def test_emoji_folder_may_be_the_project_the_package_or_the_images(depth, emoji_project):
    package = emoji_project / "node_modules" / packaged.EMOJI_PACKAGE
    given = {"project": emoji_project, "package": package, "images": package / "img/google/64"}
    assert packaged.find_emoji(given[depth]) == package / packaged.EMOJI_IMAGES


def test_emoji_folder_from_the_environment(emoji_project, monkeypatch):
    monkeypatch.setenv(packaged.EMOJI_ENV, str(emoji_project))
    assert len(get_task("emoji_edges").images) == 5


def test_missing_emoji_says_which_package_to_install(tmp_path):
    with pytest.raises(DataError) as e:
        get_task("emoji_edges", data_dir=tmp_path)
    message = str(e.value)
    assert "npm install emoji-datasource-google" in message
    assert packaged.EMOJI_ENV in message and str(tmp_path) in message


# ----------------------------------------------------------------------------- installed


def installed(find):
    try:
        find()
    except DataError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not installed(packaged.find_fashion_mnist),
    reason="Debian package dataset-fashion-mnist not installed",
)
needs_emoji = pytest.mark.skipif(
    not installed(packaged.find_emoji),
    reason="npm package emoji-datasource-google not found (set LISA_EMOJI_DIR)",
)


@needs_fashion_mnist
@pytest.mark.parametrize("name", FASHION_TASKS)
def test_installed_fashion_mnist(name):
    task = get_task(name)
    assert len(task.images) == 60_000
    check_installed_task(task)


@needs_emoji
@pytest.mark.parametrize("name", EMOJI_TASKS)
def test_installed_emoji(name):
    task = get_task(name)
    assert len(task.images) > 3000
    check_installed_task(task)


def check_installed_task(task):
    dataset = TaskDataset(task, size=32, seed=0)
    samples = [dataset.sample(i) for i in range(32)]
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    real = images_of(samples)
    scores = task.fidelity(real, samples)[task.metric_name]
    shuffled = task.fidelity(torch.roll(real, 1, 0), samples)[task.metric_name]
    assert scores >= (40 if task.metric_name == "psnr_condition" else 0.9)
    assert shuffled < scores * 0.75
    assert task.realism(real) > 3 * task.realism(torch.full_like(real, -1)) + 0.3
