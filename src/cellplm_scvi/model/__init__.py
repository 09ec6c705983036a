"""The CellPLM model class."""

from ._model import CellPLM
from ._presets import PRESETS

__all__ = ["CellPLM", "PRESETS"]
