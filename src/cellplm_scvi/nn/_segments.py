"""Operations on packed segments: tissues of a minibatch, and rows of a CSR matrix.

A minibatch holds ``T`` tissues as contiguous segments of its ``N`` cells, given by
``segment_ptr`` (``(T + 1,)`` cell offsets); a CSR matrix holds each row's entries contiguously,
given by its row pointer ``indptr``.
"""

from __future__ import annotations

import torch


def segment_ids(segment_ptr: torch.Tensor, n_items: int) -> torch.Tensor:
    """``(N,)`` segment of each item, from ``(T + 1,)`` offsets that end at ``n_items``."""
    lengths = segment_ptr.diff()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=segment_ptr.device), lengths, output_size=n_items
    )


def segment_sum(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum ``(N, ...)`` rows into ``(T, ...)``, row ``i`` into ``segment[i]``."""
    out = values.new_zeros((n_segments, *values.shape[1:]))
    # index_add_ reads strided rows (such as a view of the projections) several times slower on a
    # CPU than a contiguous copy
    return out.index_add_(0, segment, values.contiguous())


def csr_rows(indptr: torch.Tensor) -> torch.Tensor:
    """``(nnz,)`` row of each stored entry of a CSR matrix with row pointer ``indptr``."""
    return torch.repeat_interleave(indptr.diff(), output_size=int(indptr[-1]))
