"""cellplm-scvi: the CellPLM cell language model as an scvi-tools model."""

from importlib.metadata import PackageNotFoundError, version

import rich.pretty

from . import data, datasets, evaluation, nn, pretrained
from .model import PRESETS, CellPLM
from .module import CellPLMModule

try:
    __version__ = version("cellplm-scvi")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["PRESETS", "CellPLM", "CellPLMModule", "data", "datasets", "evaluation", "nn", "pretrained"]
