"""The CellPLM model class."""

from ._files import ModelFileError, read_model_file
from ._model import CellPLM
from ._presets import PRESETS
from ._training import CellPLMTrainingPlan, KeepBestWeights, NonFiniteLossError
from ._validation import check_layer, check_obs_key, check_spatial

__all__ = [
    "PRESETS",
    "CellPLM",
    "CellPLMTrainingPlan",
    "KeepBestWeights",
    "ModelFileError",
    "NonFiniteLossError",
    "check_layer",
    "check_obs_key",
    "check_spatial",
    "read_model_file",
]
