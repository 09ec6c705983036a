"""The CellPLM model class."""

from ._model import CellPLM
from ._presets import PRESETS
from ._training import CellPLMTrainingPlan, KeepBestWeights, NonFiniteLossError

__all__ = ["PRESETS", "CellPLM", "CellPLMTrainingPlan", "KeepBestWeights", "NonFiniteLossError"]
