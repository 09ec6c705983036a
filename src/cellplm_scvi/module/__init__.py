"""The CellPLM scvi-tools module."""

from ._likelihood import library_sizes, stored_entries
from ._module import CellPLMModule

__all__ = ["CellPLMModule", "library_sizes", "stored_entries"]
