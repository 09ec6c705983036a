"""Batch-aware expression decoder."""

from __future__ import annotations

import torch
from torch import nn


class BatchAwareDecoder(nn.Module):
    """Decode ``h0 = z + b`` (``b`` a learned embedding of the cell's batch) into per-gene outputs.

    ``n_layers`` blocks of ``Linear → PReLU → Dropout → GroupNorm`` and a final ``Linear`` to the
    genes. The output is read by the likelihood: softmax-normalised expression for the negative
    binomial, log-normalised expression for the MSE objective.

    Parameters
    ----------
    n_latent
        Latent width ``L``.
    n_output
        Number of genes ``G``.
    n_batch
        Number of batches (rows of the batch embedding).
    n_hidden
        Width of the hidden blocks.
    n_layers
        Number of hidden blocks.
    dropout
        Dropout rate.
    """

    def __init__(
        self, n_latent: int, n_output: int, n_batch: int, n_hidden: int, n_layers: int, dropout: float
    ):
        super().__init__()
        self.batch_embedding = nn.Embedding(max(n_batch, 1), n_latent)
        nn.init.zeros_(self.batch_embedding.weight)
        blocks, width = [], n_latent
        for _ in range(n_layers):
            blocks += [nn.Linear(width, n_hidden), nn.PReLU(), nn.Dropout(dropout), nn.GroupNorm(4, n_hidden)]
            width = n_hidden
        self.blocks = nn.Sequential(*blocks)
        self.output = nn.Linear(width, n_output)

    def forward(self, z: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Decode.

        Parameters
        ----------
        z
            ``(..., N, L)`` latent.
        batch_index
            ``(N,)`` batch codes.

        Returns
        -------
        ``(..., N, G)`` unnormalised gene outputs.
        """
        h = z + self.batch_embedding(batch_index)
        lead = h.shape[:-1]
        h = self.blocks(h.reshape(-1, h.shape[-1]))  # GroupNorm wants (cells, channels)
        return self.output(h).reshape(*lead, -1)
