"""Regularizers that plug into any dual-branch training step."""

from .decoders import ScoreDecoder
from .base import Regularizer, RegularizerOutput, StepState
from .layersync import LayerSync, default_pairs
from .lisa import LikelihoodScoreAlignment, lisa_for_branch

__all__ = [
    "LayerSync",
    "default_pairs",
    "LikelihoodScoreAlignment",
    "lisa_for_branch",
    "Regularizer",
    "RegularizerOutput",
    "ScoreDecoder",
    "StepState",
]
