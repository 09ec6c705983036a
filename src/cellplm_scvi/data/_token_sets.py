"""From packed units to a token-set minibatch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from cellplm_scvi._constants import BATCH_KEYS, VALUES_PER_PASS

from ._tissues import TissueIndex


def read_rows(matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows of a CSR / dense / backed matrix as CSR float32, in the order asked.

    Parameters
    ----------
    matrix
        ``(n_obs, G)`` scipy CSR matrix, numpy array, or a backed (h5py / anndata) matrix.
    rows
        ``(N,)`` distinct row indices.

    Returns
    -------
    ``(N, G)`` CSR matrix.
    """
    run = _is_row_run(rows)
    if run and isinstance(matrix, sp.csr_matrix | sp.csr_array):
        indptr, indices, data = _row_run_parts(matrix, rows, matrix.indices.dtype)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), matrix.shape[1]))
    if run:
        block = matrix[rows[0] : rows[-1] + 1]  # one slice, no gather
    elif isinstance(matrix, sp.csr_matrix | sp.csr_array | np.ndarray):
        block = matrix[rows]
    else:  # backed matrices read increasing rows only
        order = np.argsort(rows)
        block = matrix[rows[order]]
        block = block[np.argsort(order)]
    block = sp.csr_matrix(block, dtype=np.float32, copy=block is matrix)  # never share the caller's arrays
    if not block.has_canonical_format:  # backed rows stored with duplicate entries: they add up
        block.sum_duplicates()
    return block


def _is_row_run(rows: np.ndarray) -> bool:
    """Whether ``rows`` are consecutive increasing indices (more than one)."""
    return len(rows) > 1 and bool(np.all(np.diff(rows) == 1))


def _row_run_parts(
    matrix, rows: np.ndarray, index_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR row pointer, column indices (both ``index_dtype``) and float32 values of a run of rows of a CSR matrix.

    A run of rows is one contiguous stretch of ``indices`` and ``data``: each is converted in one
    pass into a new array, with no per-row gather (scipy's general slicing walks the rows one by one).
    """
    start, stop = int(rows[0]), int(rows[-1]) + 1
    low, high = matrix.indptr[start], matrix.indptr[stop]
    return (
        (matrix.indptr[start : stop + 1] - low).astype(index_dtype, copy=False),
        matrix.indices[low:high].astype(index_dtype, copy=True),
        matrix.data[low:high].astype(np.float32, copy=True),
    )


def csr_parts(matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a matrix as CSR parts: ``(N + 1,)`` int64 row pointer, ``(nnz,)`` int64 columns, ``(nnz,)`` float32 values.

    What :func:`read_rows` reads, in the dtypes of a minibatch and never sharing the input's
    arrays. A run of rows of an in-memory CSR matrix is converted straight from its stored arrays,
    one pass per array (scipy would keep its column indices in int32, which costs a second pass
    to widen).
    """
    if _is_row_run(rows) and isinstance(matrix, sp.csr_matrix | sp.csr_array):
        return _row_run_parts(matrix, rows, np.dtype(np.int64))
    block = read_rows(matrix, rows)
    return block.indptr.astype(np.int64), block.indices.astype(np.int64), block.data


def measured_genes(matrix, batch_codes: np.ndarray, n_batch: int, chunk: int = 10_000) -> np.ndarray:
    """``(n_batch, G)`` bool: genes with any non-zero count in each batch.

    A gene that is zero in every cell of a batch (e.g. absent from that batch's panel after an
    outer join) is treated as not measured there: it is neither masked nor scored for those cells.
    An in-memory CSR matrix whose cells come in runs of one batch (e.g. batches concatenated) is
    read in place, run by run; otherwise rows are read in chunks, so dense and backed inputs never
    load whole.
    """
    n_obs, n_genes = matrix.shape
    run_starts = np.flatnonzero(np.diff(batch_codes)) + 1
    few_runs = len(run_starts) < max(n_batch, n_obs // 100)
    if n_obs and few_runs and isinstance(matrix, sp.csr_matrix | sp.csr_array):
        return _measured_genes_by_runs(matrix, batch_codes, n_batch, run_starts)
    counts = np.zeros((n_batch, n_genes), dtype=np.int64)
    for start in range(0, n_obs, chunk):
        rows = np.arange(start, min(start + chunk, n_obs))
        block = read_rows(matrix, rows)
        block.data = (block.data != 0).astype(np.float32)
        onehot = sp.csr_matrix(
            (np.ones(len(rows), np.float32), (batch_codes[rows], np.arange(len(rows)))),
            shape=(n_batch, len(rows)),
        )
        counts += (onehot @ block).toarray().astype(np.int64)
    return counts > 0


def _measured_genes_by_runs(
    matrix: sp.csr_matrix, batch_codes: np.ndarray, n_batch: int, run_starts: np.ndarray
) -> np.ndarray:
    """:func:`measured_genes` of a CSR matrix from the stored entries of each run of one batch.

    Entries are counted in stretches of :data:`~cellplm_scvi._constants.VALUES_PER_PASS` so that
    the counter's copy of their indices stays in cache.
    """
    measured = np.zeros((n_batch, matrix.shape[1]), dtype=bool)
    bounds = np.concatenate([[0], run_starts, [matrix.shape[0]]])
    for first, stop in zip(bounds[:-1], bounds[1:], strict=True):
        seen = np.zeros(matrix.shape[1], dtype=np.int64)
        for lo in range(matrix.indptr[first], matrix.indptr[stop], VALUES_PER_PASS):
            hi = min(lo + VALUES_PER_PASS, matrix.indptr[stop])
            genes, values = matrix.indices[lo:hi], matrix.data[lo:hi]
            if not values.all():
                genes = genes[values != 0]
            seen += np.bincount(genes, minlength=matrix.shape[1])
        measured[batch_codes[first]] |= seen > 0
    return measured


@dataclass
class TissueData:
    """What the pipeline needs from a registered AnnData, read once.

    Attributes
    ----------
    matrix
        ``(n_obs, G)`` counts (CSR, dense or backed).
    batch_codes
        ``(n_obs,)`` int64 batch code of each cell.
    coords
        ``(n_obs, 2)`` float64 coordinates, or ``None``.
    index
        Tissues and units.
    n_batch
        Number of batches (rows of :attr:`measured`).
    """

    matrix: object
    batch_codes: np.ndarray
    coords: np.ndarray | None
    index: TissueIndex
    n_batch: int

    @cached_property
    def measured(self) -> np.ndarray:
        """``(n_batch, G)`` bool, the measured genes of each batch (:func:`measured_genes`).

        Read from the matrix on first use: only masking and the loss need it, so embedding a
        dataset never makes this extra pass over its counts.
        """
        return measured_genes(self.matrix, self.batch_codes, self.n_batch)


class TokenSetDataset(Dataset):
    """Map a list of unit ids to one token-set minibatch (a dict of tensors, keys in :data:`BATCH_KEYS`).

    The units' cells are concatenated into one sequence; ``segment_ptr`` marks where each unit
    starts. Counts stay sparse (CSR parts). Coordinates are normalised per tissue to ``[0, 1]``.

    Parameters
    ----------
    data
        The registered data.
    index
        Units to serve (often ``data.index`` restricted to a split).
    drop_cell_rate
        Training-time context dropout: this fraction of each unit's cells is left out of the
        minibatch (at least one cell is kept), chosen with torch's global generator.
    with_measured
        Serve the measured-gene table (``MEASURED`` and ``MEASURED_ROW``), which masking and the
        loss need; inference alone does not.
    """

    def __init__(
        self, data: TissueData, index: TissueIndex, drop_cell_rate: float = 0.0, with_measured: bool = True
    ):
        if not 0.0 <= drop_cell_rate < 1.0:
            raise ValueError(f"drop_cell_rate must be in [0, 1), got {drop_cell_rate}.")
        self.data = data
        self.index = index
        self.drop_cell_rate = drop_cell_rate
        # read here, in the main process, not in every worker process a loader may start
        self.measured = data.measured if with_measured else None

    def __len__(self) -> int:
        return self.index.n_units

    def _cells(self, units: list[int]) -> tuple[np.ndarray, np.ndarray]:
        sizes = self.index.unit_sizes[units]
        cells = self.index.cells_of_units(np.asarray(units))
        if self.drop_cell_rate > 0:
            segment = np.repeat(np.arange(len(units)), sizes)
            rank_keys = torch.rand(len(cells)).numpy()
            order = np.lexsort((rank_keys, segment))
            rank = np.arange(len(cells)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            n_keep = np.maximum(1, sizes - (sizes * self.drop_cell_rate).astype(np.int64))
            kept = order[rank < np.repeat(n_keep, sizes)]
            cells, sizes = cells[np.sort(kept)], n_keep
        return cells, np.concatenate([[0], np.cumsum(sizes)])

    def __getitem__(self, units: list[int]) -> dict[str, torch.Tensor]:
        cells, segment_ptr = self._cells(list(units))
        indptr, indices, values = csr_parts(self.data.matrix, cells)
        batch = self.data.batch_codes[cells]
        if self.data.coords is not None:
            tissue = self.index.cell_tissue[cells]
            coords = (self.data.coords[cells] - self.index.tissue_origin[tissue]) / self.index.tissue_scale[
                tissue, None
            ]
            has_coords = np.ones(len(cells), dtype=bool)
        else:
            coords = np.zeros((len(cells), 2))
            has_coords = np.zeros(len(cells), dtype=bool)
        tensor = lambda array, dtype: torch.from_numpy(np.asarray(array).astype(dtype, copy=False))
        minibatch = {
            BATCH_KEYS.OBS_INDEX: tensor(cells, np.int64),  # first: Lightning reads N from it
            BATCH_KEYS.X_INDPTR: torch.from_numpy(indptr),
            BATCH_KEYS.X_INDICES: torch.from_numpy(indices),
            BATCH_KEYS.X_DATA: torch.from_numpy(values),
            BATCH_KEYS.BATCH: tensor(batch, np.int64),
            BATCH_KEYS.SEGMENT_PTR: tensor(segment_ptr, np.int64),
            BATCH_KEYS.COORDS: tensor(coords, np.float32),
            BATCH_KEYS.HAS_COORDS: torch.from_numpy(has_coords),
        }
        if self.measured is not None:
            batches_here, measured_row = np.unique(batch, return_inverse=True)
            minibatch[BATCH_KEYS.MEASURED] = torch.from_numpy(self.measured[batches_here])
            minibatch[BATCH_KEYS.MEASURED_ROW] = tensor(measured_row, np.int64)
        return minibatch
