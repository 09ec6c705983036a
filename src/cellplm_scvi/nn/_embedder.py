"""Cell tokens: a cell is the expression-weighted bag of its genes' embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dropout import Dropout
from ._norm import GroupNorm

BLOCK_BYTES = 1 << 20
"""Bytes of gene table read per pass of the sparse bag without gradients (about half a core's L2)."""


def _bag_block_columns(n_rows: int) -> int:
    """Columns of an ``n_rows``-row float32 table per pass so that one pass reads ``BLOCK_BYTES``.

    A power of two, at least 32. Summing each cell's rows one block of columns at a time keeps the
    block in cache: at 2,000 cells × 2,000 genes (10 % non-zero) and D = 1,024, the bag took
    20.5 ms in blocks of 128 columns and 39.4 ms in one pass (``benchmarks/embedder_paths.py``,
    2 CPU threads).
    """
    columns = BLOCK_BYTES // (4 * max(n_rows, 1))
    return max(32, 1 << max(columns, 1).bit_length() - 1)


def _bag_in_column_blocks(
    table: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``(N, D)`` weighted sums of the ``(G, D)`` table's rows per bag, one block of columns at a time.

    ``indices`` and ``weights`` are ``(nnz,)``, ``offsets`` the ``(N,)`` start of each bag; block
    width from :func:`_bag_block_columns`. Without autograd only (the blocks are written in place).
    """
    width, block = table.shape[1], _bag_block_columns(table.shape[0])
    if width <= block:
        return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
    out = table.new_empty(offsets.numel(), width)
    for start in range(0, width, block):
        columns = slice(start, start + block)
        out[:, columns] = F.embedding_bag(
            indices, table[:, columns], offsets, mode="sum", per_sample_weights=weights
        )
    return out


class GeneBagEmbedder(nn.Module):
    """Embed cells as ``log1p(counts) @ E``, computed sparsely.

    The gene table ``E`` has one row per known gene. An input panel is any subset of those genes
    in any order: ``gene_rows`` maps input column ``j`` to its row of ``E``.

    Parameters
    ----------
    n_genes
        Number of rows of the gene table.
    n_hidden
        Embedding width ``D``.
    gene_rows
        ``(G_in,)`` rows of the table used by the input columns; ``None`` means the input columns
        are the table rows in order.
    dense_above
        Share of non-zero entries above which the product is taken as a dense matrix product
        instead of a sparse bag. Both give the same result. ``None`` chooses by cost, as measured
        by ``benchmarks/embedder_paths.py`` (2,000 cells × 2,000 genes, 2 CPU threads, D = 128,
        512 and 1,024): with gradients, above 4 % (the bag's backward with per-cell weights costs
        several times its forward); without, above ``0.35 + 24 / D`` (the bag, read in blocks
        of columns that stay in cache, costs about as much per entry at every width; the dense
        product has a fixed cost per matrix entry that weighs most at small ``D``): 37 % at
        ``D`` = 1,024, 54 % at ``D`` = 128.
    """

    def __init__(
        self,
        n_genes: int,
        n_hidden: int,
        gene_rows: torch.Tensor | None = None,
        dense_above: float | None = None,
    ):
        super().__init__()
        self.dense_above = dense_above
        self.genes = nn.EmbeddingBag(n_genes, n_hidden, mode="sum")
        nn.init.normal_(self.genes.weight, std=0.005)
        if gene_rows is None:
            gene_rows = torch.arange(n_genes)
        self.register_buffer("gene_rows", gene_rows.long(), persistent=False)
        self.rows_are_columns = torch.equal(self.gene_rows, torch.arange(n_genes))

    def forward(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Embed a CSR batch of cells.

        Parameters
        ----------
        indptr
            ``(N + 1,)`` CSR row pointer.
        indices
            ``(nnz,)`` input gene columns.
        values
            ``(nnz,)`` counts (masked entries already zero).

        Returns
        -------
        ``(N, D)`` bag-of-genes embedding of each cell.
        """
        n_cells, n_inputs = indptr.shape[0] - 1, self.gene_rows.numel()
        if indices.numel() == 0:
            return self.genes.weight.new_zeros(n_cells, self.genes.embedding_dim)
        if indices.numel() > self._dense_threshold() * n_cells * n_inputs:
            weights = values.new_zeros(n_cells, n_inputs)
            rows = torch.repeat_interleave(indptr.diff(), output_size=indices.numel())
            weights.view(-1)[rows * n_inputs + indices] = torch.log1p(values)
            table = self.genes.weight if self.rows_are_columns else self.genes.weight[self.gene_rows]
            return weights @ table
        weights, table = torch.log1p(values), self.genes.weight
        if torch.is_grad_enabled() and table.requires_grad:
            rows = indices if self.rows_are_columns else self.gene_rows[indices]
            return F.embedding_bag(rows, table, indptr[:-1], mode="sum", per_sample_weights=weights)
        if not self.rows_are_columns:
            table = table[self.gene_rows]  # the panel's rows only, indexed by input column
        return _bag_in_column_blocks(table, indices, indptr[:-1], weights)

    def _dense_threshold(self) -> float:
        """Share of non-zero entries above which the dense product is used now."""
        if self.dense_above is not None:
            return self.dense_above
        if torch.is_grad_enabled() and self.genes.weight.requires_grad:
            return 0.04
        return 0.35 + 24 / self.genes.embedding_dim


class TokenProjection(nn.Sequential):
    """``GroupNorm(Dropout(ReLU(Linear(h))))``: the per-cell projection after embedding.

    GroupNorm works on each cell's channels alone, so no statistic is shared between cells.

    Parameters
    ----------
    n_hidden
        Width ``D`` (divisible by ``n_groups``).
    dropout
        Dropout rate.
    n_groups
        Number of GroupNorm groups.
    """

    def __init__(self, n_hidden: int, dropout: float, n_groups: int = 4):
        super().__init__(
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(inplace=True),
            Dropout(dropout),
            GroupNorm(n_groups, n_hidden),
        )
