"""The CellPLM scvi-tools module."""

from ._module import CellPLMModule

__all__ = ["CellPLMModule"]
