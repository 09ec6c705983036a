"""The gene bag on a CPU: a dense product above a density, column blocks that stay in cache below.

Gives :meth:`cellplm_scvi.nn.GeneBagEmbedder.forward` to float rounding. Chosen by
``benchmarks/embedder_paths.py`` (2,000 cells × 2,000 genes, 2 CPU threads, D = 128, 512 and
1,024): with gradients the dense product wins above 4 % non-zero entries (the bag's backward
with per-cell weights costs several times its forward); without, above ``0.35 + 24 / D``, and
the bag read in blocks of columns of about 1 MiB took half the time of one pass at D = 1,024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_BYTES = 1 << 20
"""Bytes of gene table read per pass of the bag without gradients (about half a core's L2)."""


def gene_bag(embedder, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` = ``log1p(counts) @ E`` for a CSR batch (see :class:`~cellplm_scvi.nn.GeneBagEmbedder`)."""
    n_cells, n_inputs = indptr.shape[0] - 1, embedder.gene_rows.numel()
    table, training = embedder.genes.weight, torch.is_grad_enabled() and embedder.genes.weight.requires_grad
    if indices.numel() > dense_threshold(embedder.n_hidden, training) * n_cells * n_inputs:
        weights = values.new_zeros(n_cells, n_inputs)
        rows = torch.repeat_interleave(indptr.diff(), output_size=indices.numel())
        weights.view(-1)[rows * n_inputs + indices] = torch.log1p(values)
        return weights @ (table if embedder.rows_are_columns else table[embedder.gene_rows])
    if training:
        rows = indices if embedder.rows_are_columns else embedder.gene_rows[indices]
        return F.embedding_bag(rows, table, indptr[:-1], mode="sum", per_sample_weights=torch.log1p(values))
    if not embedder.rows_are_columns:
        table = table[embedder.gene_rows]  # the panel's rows only, indexed by input column
    return bag_in_column_blocks(table, indices, indptr[:-1], torch.log1p(values))


def dense_threshold(n_hidden: int, training: bool) -> float:
    """Share of non-zero entries above which the dense product is taken."""
    return 0.04 if training else 0.35 + 24 / n_hidden


def block_columns(n_rows: int) -> int:
    """Columns of an ``n_rows``-row float32 table per pass so that one pass reads :data:`BLOCK_BYTES` (a power of two, at least 32)."""
    columns = BLOCK_BYTES // (4 * max(n_rows, 1))
    return max(32, 1 << max(columns, 1).bit_length() - 1)


def bag_in_column_blocks(
    table: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(N, D)`` weighted sums of the ``(G, D)`` table's rows per bag, one block of columns at a time (no autograd)."""
    width, block = table.shape[1], block_columns(table.shape[0])
    if width <= block:
        return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
    out = table.new_empty(offsets.numel(), width)
    for start in range(0, width, block):
        columns = slice(start, start + block)
        out[:, columns] = F.embedding_bag(
            indices, table[:, columns], offsets, mode="sum", per_sample_weights=weights
        )
    return out
