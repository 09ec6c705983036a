"""Cell tokens: a cell is the expression-weighted bag of its genes' embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu


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
    """

    def __init__(self, n_genes: int, n_hidden: int, gene_rows: torch.Tensor | None = None):
        super().__init__()
        self.genes = nn.EmbeddingBag(n_genes, n_hidden, mode="sum")
        nn.init.normal_(self.genes.weight, std=0.005)
        if gene_rows is None:
            gene_rows = torch.arange(n_genes)
        self.register_buffer("gene_rows", gene_rows.long(), persistent=False)
        self.rows_are_columns = torch.equal(self.gene_rows, torch.arange(n_genes))

    @property
    def n_hidden(self) -> int:
        """Embedding width ``D``."""
        return self.genes.embedding_dim

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
        if cpu.gene_bag_applies(self, values):
            return cpu.gene_bag(self, indptr, indices, values)
        rows = indices if self.rows_are_columns else self.gene_rows[indices]
        return F.embedding_bag(
            rows, self.genes.weight, indptr[:-1], mode="sum", per_sample_weights=torch.log1p(values)
        )


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
            nn.Dropout(dropout),
            nn.GroupNorm(n_groups, n_hidden),
        )
