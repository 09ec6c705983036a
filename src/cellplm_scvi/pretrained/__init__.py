"""Reading the original CellPLM checkpoints into :class:`~cellplm_scvi.module.CellPLMModule`."""

from ._checkpoint import CellPLMCheckpoint, LoadReport, load_released_weights, module_kwargs, read_checkpoint
from ._genes import align_genes

__all__ = [
    "CellPLMCheckpoint",
    "LoadReport",
    "align_genes",
    "load_released_weights",
    "module_kwargs",
    "read_checkpoint",
]
