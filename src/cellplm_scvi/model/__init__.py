"""The CellPLM model class."""

from ._files import ModelFileError, read_model_file
from ._model import CellPLM
from ._presets import PRESETS
from ._training import CellPLMTrainingPlan, KeepBestWeights, NonFiniteLossError

__all__ = [
    "PRESETS",
    "CellPLM",
    "CellPLMTrainingPlan",
    "KeepBestWeights",
    "ModelFileError",
    "NonFiniteLossError",
    "read_model_file",
]
