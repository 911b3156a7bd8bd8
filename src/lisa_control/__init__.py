"""lisa-control: train visual-condition side networks for frozen diffusion and flow models."""

from .families import Context, DualBranch, Prediction, UNetControlNetBranch
from .core.errors import CheckpointError, ConfigError, DataError, LisaError, ModelError
from .core.objectives import DiffusionObjective, RectifiedFlowObjective, make_objective
from .regularizers import (
    LayerSync,
    LikelihoodScoreAlignment,
    Regularizer,
    ScoreDecoder,
    StepState,
)
from .core.step import ControlTrainingStep, StepOutput
from .regularizers.lisa import lisa_for_branch
from .regularizers.token_decoders import TokenScoreDecoder

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Context",
    "ControlTrainingStep",
    "DataError",
    "DiffusionObjective",
    "DualBranch",
    "LayerSync",
    "LikelihoodScoreAlignment",
    "LisaError",
    "ModelError",
    "Prediction",
    "RectifiedFlowObjective",
    "Regularizer",
    "ScoreDecoder",
    "StepOutput",
    "StepState",
    "TokenScoreDecoder",
    "UNetControlNetBranch",
    "lisa_for_branch",
    "make_objective",
]
