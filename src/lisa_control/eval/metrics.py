"""Sample-quality metrics of ``lisa eval`` beyond condition fidelity.

* :func:`frechet_from_features`: the Fréchet distance between two feature sets, computed by
  torchmetrics' ``FrechetInceptionDistance`` (fed the features through an identity feature
  extractor) when torchmetrics is installed, else by the project's own
  :func:`~lisa_control.eval.feature_distance.frechet_distance`; it says which one ran.
* :class:`InceptionFID`: torchmetrics' Inception FID with Inception weights from a local file
  (torchmetrics and torch-fidelity required; nothing is downloaded).
* :class:`ClipScore`: torchmetrics' definition of the CLIP score,
  ``max(100 * cos(image embedding, text embedding), 0)`` per image, computed with a local
  transformers ``CLIPModel`` folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, ModelError

TORCHMETRICS = "torchmetrics"
FALLBACK = "lisa_control"


def torchmetrics_available() -> bool:
    try:
        import torchmetrics.image.fid  # noqa: F401
    except ImportError:
        return False
    return True


class _GivenFeatures(nn.Module):
    """The identity, posing as torchmetrics' feature extractor: ``update`` gets features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_from_features(
    real: torch.Tensor, generated: torch.Tensor, backend: str | None = None
) -> tuple[float, str]:
    """(Fréchet distance between Gaussians fitted to ``real`` (N, D) and ``generated`` (M, D),
    the backend that computed it: ``torchmetrics`` or ``lisa_control``). ``backend`` None picks
    torchmetrics when it is installed."""
    from .feature_distance import frechet_distance

    if backend is None:
        backend = TORCHMETRICS if torchmetrics_available() else FALLBACK
    if backend == FALLBACK:
        return frechet_distance(generated, real), FALLBACK
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ConfigError(
            f"feature sets must be (N, D) alike, got {tuple(real.shape)} and "
            f"{tuple(generated.shape)}."
        )
    if min(len(real), len(generated)) < 2:
        raise ConfigError("a Fréchet distance needs at least 2 samples on each side.")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute()), TORCHMETRICS


class InceptionFID:
    """Inception-v3 FID (2048 pool features, torchmetrics' ``FrechetInceptionDistance``) with
    the FID Inception weights read from ``weights`` (torch-fidelity's
    ``pt_inception-2015-12-05`` file)."""

    def __init__(self, weights: str | Path, device="cpu"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"--inception_weights {path} is not a file; pass the FID Inception weights "
                "(pt_inception-2015-12-05-6726825d.pth) saved locally"
            )
        try:
            import torch_fidelity  # noqa: F401
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise ConfigError(
                "--inception_weights needs torchmetrics and torch-fidelity: pip install "
                "torchmetrics torch-fidelity"
            ) from None
        try:
            self.metric = FrechetInceptionDistance(
                feature=2048, normalize=True, feature_extractor_weights_path=str(path)
            ).to(device)
        except Exception as exc:  # a wrong file is the user's to fix
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(f"cannot load Inception weights from {path}: {reason}") from None
        self.device = device

    def __call__(self, real: torch.Tensor, generated: torch.Tensor) -> float:
        """FID of images (N, 3, H, W) in [-1, 1]."""
        self.metric.reset()
        for images, is_real in ((real, True), (generated, False)):
            for chunk in images.split(64):
                self.metric.update(((chunk.float() + 1) / 2).clamp(0, 1).to(self.device), is_real)
        return float(self.metric.compute())


class ClipScore:
    """CLIP score of images against prompts with a local CLIP folder (``CLIPModel`` weights,
    tokenizer files and, optionally, ``preprocessor_config.json``)."""

    def __init__(self, folder: str | Path, device="cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--clip_model {path} is not a CLIP model folder (no config.json); pass a local "
                "folder saved with CLIPModel.save_pretrained and its tokenizer"
            )
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(f"cannot load a CLIP model from {path}: {reason}") from None
        size = self.model.config.vision_config.image_size
        if (path / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(path)
        else:
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.max_length = min(
            self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Per-image scores of uint8 images (N, H, W, 3) against their prompts."""
        scores = []
        for start in range(0, len(images), 32):
            chunk, texts = images[start : start + 32], prompts[start : start + 32]
            pixels = self.processor(list(chunk), return_tensors="pt")["pixel_values"]
            tokens = self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
            text_embeds = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            image_embeds = _embedding(image_embeds)
            text_embeds = _embedding(text_embeds)
            cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
            scores.append((100 * cosine).clamp(min=0).float().cpu().numpy())
        return np.concatenate(scores)


def _embedding(output) -> torch.Tensor:
    """The embedding tensor of ``get_*_features``, which some transformers versions wrap."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ModelError(f"unexpected CLIP output {type(output).__name__}")
