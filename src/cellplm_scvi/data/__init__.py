"""Data pipeline: tissue index, packing sampler, token sets, loaders and splitter."""

from ._loaders import (
    DEFAULT_MAX_CELLS_PER_BATCH,
    DEFAULT_MAX_CELLS_PER_CONTEXT,
    TissueDataLoader,
    TissueDataSplitter,
    split_units,
    tissue_data,
)
from ._sampler import TissuePackingSampler, pack_units, shard_units
from ._tissues import TissueIndex, build_tissue_index, random_chunks, spatial_tiles, stable_cell_keys
from ._token_sets import TissueData, TokenSetDataset, csr_parts, measured_genes, read_rows

__all__ = [
    "TissueData",
    "TissueDataLoader",
    "TissueDataSplitter",
    "TissueIndex",
    "TissuePackingSampler",
    "TokenSetDataset",
    "build_tissue_index",
    "csr_parts",
    "measured_genes",
    "pack_units",
    "random_chunks",
    "read_rows",
    "shard_units",
    "spatial_tiles",
    "split_units",
    "stable_cell_keys",
    "tissue_data",
]
