"""Regularizers that plug into any dual-branch training step."""

from ..decoders import ScoreDecoder
from .base import Regularizer, RegularizerOutput, StepState
from .lisa import LikelihoodScoreAlignment

__all__ = [
    "LikelihoodScoreAlignment",
    "Regularizer",
    "RegularizerOutput",
    "ScoreDecoder",
    "StepState",
]
