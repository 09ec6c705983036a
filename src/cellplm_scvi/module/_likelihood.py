"""What the loss reads from the sparse counts of a minibatch."""

from __future__ import annotations

import torch

from cellplm_scvi._constants import BATCH_KEYS
from cellplm_scvi.nn import csr_rows, segment_sum


def dense_counts(tensors: dict[str, torch.Tensor], n_genes: int) -> torch.Tensor:
    """``(N, G)`` dense counts of a minibatch from its CSR parts."""
    indptr, data = tensors[BATCH_KEYS.X_INDPTR], tensors[BATCH_KEYS.X_DATA]
    dense = data.new_zeros(indptr.numel() - 1, n_genes)
    dense[csr_rows(indptr), tensors[BATCH_KEYS.X_INDICES]] = data
    return dense


def library_sizes(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(N, 1)`` total counts of each cell."""
    indptr, data = tensors[BATCH_KEYS.X_INDPTR], tensors[BATCH_KEYS.X_DATA]
    return segment_sum(data, csr_rows(indptr), indptr.numel() - 1)[:, None]


def stored_entries(tensors: dict[str, torch.Tensor], cells: torch.Tensor):
    """``(row, column, count)`` of the stored counts of ``cells`` (ascending), rows numbered ``0 .. S-1``.

    Only the entries of ``cells`` are visited: their CSR spans are concatenated.
    """
    indptr = tensors[BATCH_KEYS.X_INDPTR]
    starts, lengths = indptr[cells], indptr[cells + 1] - indptr[cells]
    n_entries = int(lengths.sum())
    row = torch.repeat_interleave(lengths, output_size=n_entries)  # 0 .. S-1, each repeated
    # position of each kept entry: its cell's span start plus its rank within the span
    span_offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(n_entries, device=indptr.device) + (starts - span_offsets).index_select(0, row)
    return row, *(tensors[key].index_select(0, position) for key in (BATCH_KEYS.X_INDICES, BATCH_KEYS.X_DATA))
