"""Batch-aware expression decoder."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

#: The released model's mean activation, ``clamp(exp(.), 1e-5, 1e6)``, as a range of logits.
RELEASED_LOGIT_RANGE = (math.log(1e-5), math.log(1e6))


def _covariate(n_rows: int, n_hidden: int) -> nn.Sequential:
    """``GroupNorm(PReLU(Embedding(code)))``: a covariate vector added to a hidden block."""
    return nn.Sequential(nn.Embedding(max(n_rows, 1), n_hidden), nn.PReLU(), nn.GroupNorm(4, n_hidden))


class BatchAwareDecoder(nn.Module):
    """Decode a latent ``z`` and the cell's batch into per-gene outputs.

    ``n_layers`` hidden blocks of ``Linear → PReLU → Dropout → GroupNorm`` and an output head
    (``Linear``, or ``Linear → ReLU → Linear`` through a ``bottleneck``). The batch enters either
    at the input (``batch_injection="latent"``: ``h0 = z + b``, this package's default) or after
    every hidden block (``"hidden"``: ``h = block(h) + GroupNorm(PReLU(b))``, the released CellPLM
    layout). With ``n_datasets > 0`` (released checkpoints), a dataset covariate is added the same
    way, from the row ``dataset_row`` of its table or, when that is ``-1``, from the mean row.

    Parameters
    ----------
    n_latent
        Latent width ``L``.
    n_output
        Number of output genes ``G``.
    n_batch
        Number of batches (rows of the batch embedding).
    n_hidden
        Width of the hidden blocks.
    n_layers
        Number of hidden blocks.
    dropout
        Dropout rate.
    batch_injection
        ``"latent"`` or ``"hidden"``.
    bottleneck
        Width of the head's bottleneck (``None``: a single linear layer).
    n_datasets
        Rows of the dataset covariate table (0: none).
    logit_range
        Clamp the output logits to this range (the released model clamps its means).
    """

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        n_batch: int,
        n_hidden: int,
        n_layers: int,
        dropout: float,
        batch_injection: Literal["latent", "hidden"] = "latent",
        bottleneck: int | None = None,
        n_datasets: int = 0,
        logit_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        if batch_injection not in ("latent", "hidden"):
            raise ValueError(f"Unknown batch_injection={batch_injection!r}; choose 'latent' or 'hidden'.")
        if batch_injection == "hidden" and n_layers < 1:
            raise ValueError("batch_injection='hidden' needs at least one hidden decoder block.")
        self.batch_injection = batch_injection
        self.logit_range = logit_range
        if batch_injection == "latent":
            self.batch_embedding = nn.Embedding(max(n_batch, 1), n_latent)
            nn.init.zeros_(self.batch_embedding.weight)
        blocks, width = [], n_latent
        for _ in range(n_layers):
            blocks.append(
                nn.Sequential(
                    nn.Linear(width, n_hidden), nn.PReLU(), nn.Dropout(dropout), nn.GroupNorm(4, n_hidden)
                )
            )
            width = n_hidden
        self.blocks = nn.ModuleList(blocks)
        if batch_injection == "hidden":
            self.batch_covariates = nn.ModuleList(_covariate(n_batch, n_hidden) for _ in range(n_layers))
        if n_datasets:
            self.dataset_covariates = nn.ModuleList(_covariate(n_datasets, n_hidden) for _ in range(n_layers))
            self.register_buffer("dataset_row", torch.tensor(-1))
        if bottleneck:
            self.head = nn.Sequential(
                nn.Linear(width, bottleneck), nn.ReLU(), nn.Linear(bottleneck, n_output)
            )
        else:
            self.head = nn.Linear(width, n_output)

    def _dataset_vector(self, layer: int) -> torch.Tensor:
        embedding, activation, norm = self.dataset_covariates[layer]
        row = (
            embedding.weight.mean(0, keepdim=True)
            if self.dataset_row < 0
            else embedding.weight[self.dataset_row][None]
        )
        return norm(activation(row))

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
        ``(..., N, G)`` gene logits.
        """
        h = z + self.batch_embedding(batch_index) if self.batch_injection == "latent" else z
        lead = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])  # GroupNorm wants (cells, channels)
        batch_flat = batch_index.expand(lead).reshape(-1)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.batch_injection == "hidden":
                h = h + self.batch_covariates[i](batch_flat)
            if hasattr(self, "dataset_covariates"):
                h = h + self._dataset_vector(i)
        logits = self.head(h)
        logits = logits.reshape(*lead, logits.shape[-1])
        return logits.clamp(*self.logit_range) if self.logit_range else logits
