"""Names shared by the data pipeline, the module and the model."""

from __future__ import annotations

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    """Registry keys that CellPLM adds to scvi-tools' :data:`scvi.REGISTRY_KEYS`."""

    FOV_KEY: str = "fov"
    SPATIAL_KEY: str = "spatial"


class _BatchKeys(NamedTuple):
    """Keys of one packed minibatch (a *token set*), as served by :class:`~cellplm_scvi.data.TokenSetDataset`.

    ``N`` is the number of cells in the minibatch, ``G`` the number of genes, ``T`` the number of
    packed tissues (segments) and ``B`` the number of distinct batches in the minibatch.
    """

    X_INDPTR: str = "x_indptr"  # (N + 1,) int64, CSR row pointer of the raw counts
    X_INDICES: str = "x_indices"  # (nnz,) int64, CSR column indices
    X_DATA: str = "x_data"  # (nnz,) float32, CSR values (raw counts)
    BATCH: str = "batch"  # (N,) int64, batch code of each cell
    SEGMENT_PTR: str = "segment_ptr"  # (T + 1,) int64, cell offsets of the packed tissues
    COORDS: str = "coords"  # (N, 2) float32, per-tissue normalised coordinates in [0, 1]
    HAS_COORDS: str = "has_coords"  # (N,) bool, False where a cell has no coordinates
    MEASURED: str = "measured"  # (B, G) bool, measured genes of each batch in the minibatch
    MEASURED_ROW: str = "measured_row"  # (N,) int64, row of ``MEASURED`` for each cell
    OBS_INDEX: str = "obs_index"  # (N,) int64, row of each cell in the AnnData


CELLPLM_REGISTRY_KEYS = _RegistryKeys()
BATCH_KEYS = _BatchKeys()


VALUES_PER_PASS = 1 << 16
"""Stored values of a sparse matrix read per pass where a whole-matrix check or count goes in
cache-sized stretches (:func:`~cellplm_scvi.data.measured_genes`, the count check of
``setup_anndata``)."""
