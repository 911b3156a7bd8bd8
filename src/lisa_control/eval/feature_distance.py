"""A Fréchet distance on features of a small network trained on a task's own images or videos.

Inception FID needs a downloaded network and means little on 32x32 stick figures, so the project
measures sample quality the same way on features it can make itself: a small CNN is trained, from
a fixed seed, to tell which of 16 transformations (4 rotations x 4 degradations: none, noise,
blur, washed-out contrast) was applied to a real render of the task. Telling an upright figure
from a rotated one, or a sharp texture from a blurred one, needs the very statistics a generator
must get right, so the pooled features of that CNN are a reasonable yardstick. This is **not**
Inception FID: numbers are comparable only between runs that use the same task, resolution,
feature seed and number of samples (the estimate is biased upwards for small sample counts).

A video task (one with ``frames``, such as ``pose_video``) gets the task-feature *video*
Fréchet distance: the same network, trained the same way on the frames of the task's clips,
gives per-frame features, and :mod:`~lisa_control.eval.video_features` pools them with their
frame-to-frame speed and acceleration, so that shuffled, flickering or frozen videos are far from
real ones even when each frame looks real. It is not FVD (no I3D network).

    FD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_r^1/2 S_g S_r^1/2)^1/2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

# Seeds of the renders the feature network learns from and of the reference set; the reference
# stream is disjoint from training (seed 0.., index) and validation (10_007 + seed) streams.
FEATURE_TRAINING_SEED = 31_337
REFERENCE_SEED = 41_017
NUM_TRANSFORMS = 16
# Renders in the training pool: images, or clips for a video task (512 clips of 8 frames are
# as many frames as the images' pool).
POOL = {"image": 4096, "video": 512}
# Samples per feature-extraction chunk: images, or clips (of up to 16 frames).
CHUNK = {"image": 256, "video": 32}


def is_video_task(task) -> bool:
    """Whether ``task`` renders videos (it has a frame count)."""
    return getattr(task, "frames", None) is not None


def feature_distance_name(task) -> str:
    """The key validation logs the task's feature distance under: ``feature_distance``, or
    ``video_feature_distance`` for a video task (its spatio-temporal network)."""
    return "video_feature_distance" if is_video_task(task) else "feature_distance"


class TaskFeatureNetwork(nn.Module):
    """Four conv stages (stride 2 from the second on), global average pooling, a linear head."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, feature_dim]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, NUM_TRANSFORMS)

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The last conv stage's output (N, D, H/8, W/8), before pooling."""
        return self.body(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def transform(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """Apply transformation ``labels[i]`` (rotation = label % 4, degradation = label // 4) to
    image i of a batch in [-1, 1]."""
    out = torch.empty_like(images)
    for rotation in range(4):
        picked = labels % 4 == rotation
        out[picked] = torch.rot90(images[picked], rotation, dims=(2, 3))
    degradation = (labels // 4).view(-1, 1, 1, 1)
    strength = torch.rand(images.shape[0], 1, 1, 1, generator=generator).to(images) * 0.75 + 0.25
    noisy = out + 0.4 * strength * torch.randn(out.shape, generator=generator).to(images)
    blurred = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    washed = mean + (out - mean) * (1 - 0.7 * strength)
    out = torch.where(degradation == 1, noisy, out)
    out = torch.where(degradation == 2, blurred, out)
    out = torch.where(degradation == 3, washed, out)
    return out.clamp(-1, 1)


def render(task, seed: int, count: int) -> torch.Tensor:
    """``count`` renders of ``task`` from stream ``seed`` in [-1, 1]: (N, 3, H, W), or
    (N, 3, F, H, W) for a video task."""
    import numpy as np

    pixels = np.stack([task.sample(seed, i).image for i in range(count)]).astype(np.float32)
    return torch.from_numpy(pixels).movedim(-1, 1) / 127.5 - 1


def train_feature_network(
    task,
    steps: int = 1500,
    batch_size: int = 128,
    pool: int | None = None,
    seed: int = 0,
    device="cpu",
) -> tuple[nn.Module, float]:
    """Train the feature network on ``pool`` renders (default ``POOL`` of the task's kind);
    returns it (eval mode) and its accuracy on the transformation task over held-out renders
    (a check that it learned something)."""
    video = is_video_task(task)
    pool = pool or POOL["video" if video else "image"]
    images = render(task, FEATURE_TRAINING_SEED + seed, pool)
    # As many held-out frames for a video task as held-out images for an image task.
    held_out = render(task, FEATURE_TRAINING_SEED + seed + 1, 512 // task.frames if video else 512)
    return fit_feature_network(images, held_out, steps, batch_size, seed, device)


def fit_feature_network(
    images: torch.Tensor,
    held_out: torch.Tensor | None = None,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    device="cpu",
) -> tuple[nn.Module, float]:
    """Train a :class:`TaskFeatureNetwork` on ``images`` (N, 3, H, W) in [-1, 1] to tell the
    16 transformations apart; returns it (eval mode) and its accuracy on ``held_out`` (on
    ``images`` when None). Videos (N, 3, F, H, W): the network learns from their frames and
    comes wrapped in a :class:`~lisa_control.eval.video_features.TaskVideoFeatureNetwork`."""
    if images.ndim == 5:
        from .video_features import TaskVideoFeatureNetwork, to_frames

        frames = None if held_out is None else to_frames(held_out)
        net, accuracy = fit_feature_network(
            to_frames(images), frames, steps, batch_size, seed, device
        )
        return TaskVideoFeatureNetwork(net).eval(), accuracy
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images = images.to(device)
    net = TaskFeatureNetwork().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g).to(device)
        labels = torch.randint(0, NUM_TRANSFORMS, (batch_size,), generator=g).to(device)
        loss = F.cross_entropy(net(transform(images[idx], labels, g)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    held_out = (images if held_out is None else held_out).to(device)
    labels = torch.randint(0, NUM_TRANSFORMS, (len(held_out),), generator=g).to(device)
    with torch.no_grad():
        accuracy = (net(transform(held_out, labels, g)).argmax(1) == labels).float().mean()
    return net, float(accuracy)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"feature sets must be (N, D) alike, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if min(len(a), len(b)) < 2:
        raise ConfigError("a Fréchet distance needs at least 2 samples on each side.")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), whose argument is symmetric PSD: eigh is stable.
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def network_features(network: nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """Pooled features (N, D), on the CPU, of images (N, 3, H, W) or videos (N, 3, F, H, W) in
    [-1, 1], a chunk at a time on the network's device."""
    device = next(network.parameters()).device
    chunk = CHUNK["video" if samples.ndim == 5 else "image"]
    return torch.cat([network.features(c.to(device).float()).cpu() for c in samples.split(chunk)])


class TaskFeatureDistance:
    """Callable: images (N, 3, H, W) in [-1, 1] -> Fréchet distance to ``reference_size`` real
    renders of ``task`` on :class:`TaskFeatureNetwork` features; for a video task, videos
    (N, 3, F, H, W) with the task's F frames -> the task-feature video Fréchet distance on
    :class:`~lisa_control.eval.video_features.TaskVideoFeatureNetwork` features
    (``reference_size`` and ``pool`` then count clips). The network is trained on first use
    (seconds on a GPU) and kept, so all calls of one instance share one yardstick. ``pool``
    None: ``POOL`` of the task's kind; ``batch_size``: images (frames) per training step."""

    def __init__(
        self,
        task,
        reference_size: int = 1024,
        train_steps: int = 1500,
        pool: int | None = None,
        seed: int = 0,
        device=None,
        batch_size: int = 128,
    ):
        self.task = task
        self.batch_size = batch_size
        self.video = is_video_task(task)
        self.pool = pool or POOL["video" if self.video else "image"]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.reference_size = reference_size
        self.train_steps = train_steps
        self.seed = seed
        self.network: nn.Module | None = None
        self.accuracy: float | None = None
        self._reference: torch.Tensor | None = None

    def prepare(self) -> "TaskFeatureDistance":
        if self.network is None:
            self.network, self.accuracy = train_feature_network(
                self.task,
                self.train_steps,
                self.batch_size,
                pool=self.pool,
                seed=self.seed,
                device=self.device,
            )
            reference = render(self.task, REFERENCE_SEED, self.reference_size)
            self._reference = network_features(self.network, reference)
        return self

    def check(self, samples: torch.Tensor) -> None:
        """Refuse samples the network was not trained for: images (N, 3, H, W), or for a video
        task videos (N, 3, F, H, W) with the task's frame count."""
        if not self.video:
            if samples.ndim != 4 or samples.shape[1] != 3:
                raise ConfigError(f"expected images (N, 3, H, W), got {tuple(samples.shape)}.")
            return
        if samples.ndim != 5 or samples.shape[1] != 3:
            raise ConfigError(
                f"the video feature distance of {self.task.name} takes videos (N, 3, F, H, W), "
                f"got {tuple(samples.shape)}."
            )
        if samples.shape[2] != self.task.frames:
            raise ConfigError(
                f"the videos have {samples.shape[2]} frames but the video feature distance "
                f"compares with {self.task.frames}-frame renders of {self.task.name}; generate "
                "as many frames as the task renders."
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of ``images`` (videos for a video task) in [-1, 1], on the
        CPU."""
        self.prepare()
        return network_features(self.network, images)

    def reference_features(self) -> torch.Tensor:
        """Features (reference_size, D) of the real renders that ``__call__`` compares with."""
        self.prepare()
        return self._reference

    def __call__(self, images: torch.Tensor) -> float:
        self.check(images)
        self.prepare()
        return frechet_distance(network_features(self.network, images), self._reference)
