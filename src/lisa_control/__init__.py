"""lisa-control: train visual-condition side networks for frozen diffusion and flow models."""

from .core.errors import CheckpointError, ConfigError, DataError, LisaError, ModelError
from .core.objectives import DiffusionObjective, RectifiedFlowObjective, make_objective
from .core.step import ControlTrainingStep, StepOutput
from .core.weighting import MinSNRWeighting, X0Weighting, make_weighting
from .families import (
    Context,
    DualBranch,
    Family,
    MainModel,
    Prediction,
    UNetControlNetBranch,
    register_family,
)
from .regularizers import (
    LayerSync,
    LikelihoodScoreAlignment,
    Regularizer,
    ScoreDecoder,
    StepState,
    register_regularizer,
)
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
    "Family",
    "LayerSync",
    "LikelihoodScoreAlignment",
    "LisaError",
    "MainModel",
    "MinSNRWeighting",
    "ModelError",
    "Prediction",
    "RectifiedFlowObjective",
    "Regularizer",
    "ScoreDecoder",
    "StepOutput",
    "StepState",
    "TokenScoreDecoder",
    "UNetControlNetBranch",
    "X0Weighting",
    "lisa_for_branch",
    "make_objective",
    "make_weighting",
    "register_family",
    "register_regularizer",
]
