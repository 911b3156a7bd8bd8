"""Regularizers that plug into any dual-branch training step, selected by name."""

from .base import Regularizer, RegularizerOutput, StepState
from .decoders import ScoreDecoder
from .layersync import LayerSync, default_pairs, layersync_from_settings
from .lisa import LikelihoodScoreAlignment, lisa_for_branch, lisa_from_settings
from .registry import REGULARIZERS, build_regularizers, register_regularizer

register_regularizer("lisa", lisa_from_settings)
register_regularizer("layersync", layersync_from_settings)

__all__ = [
    "REGULARIZERS",
    "LayerSync",
    "LikelihoodScoreAlignment",
    "Regularizer",
    "RegularizerOutput",
    "ScoreDecoder",
    "StepState",
    "build_regularizers",
    "default_pairs",
    "lisa_for_branch",
    "register_regularizer",
]
