"""The negative-binomial loss on a CPU: row chunks that stay in cache, with the backward pass written out.

Gives :func:`cellplm_scvi.nn.nb_reconstruction` and its gradients to float rounding. Every term
of the log-likelihood but the first vanishes where the count is zero, so the gamma functions run
over the stored counts only; forward and backward visit the cells in chunks of
:data:`CHUNK_ENTRIES` matrix entries and keep nothing of size ``(S, G)`` but the logits and their
gradient. Chosen by ``benchmarks/training_speed.py`` (10,000 genes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cellplm_scvi.nn import _likelihood as reference

CHUNK_ENTRIES = 1 << 19
"""Matrix entries per row chunk of :func:`nb_reconstruction`: 2 MiB per float32 temporary, about
a core's L2 cache on the 2-core benchmark machine, where 2^19 and 2^20 gave the fastest training
steps at 10,000 genes and 2^18 and 2^21 were 10–20 % slower."""


def nb_reconstruction(logits, library, theta, measured, masked, full_profile_weight, entries, eps):
    """:func:`cellplm_scvi.nn.nb_reconstruction` in row chunks (same arguments and result)."""
    return _ChunkedNegativeBinomialNLL.apply(
        logits, theta, library, measured, masked, full_profile_weight, *entries, eps
    )


class _ChunkedNegativeBinomialNLL(torch.autograd.Function):
    """Autograd of :func:`nb_reconstruction` with respect to ``logits`` and ``theta``."""

    @staticmethod
    def forward(ctx, logits, theta, library, measured, masked, full_weight, rows, cols, counts, eps):
        inputs = _Inputs(logits, theta, library, measured, masked, rows, cols, counts)
        ctx.save_for_backward(*inputs)
        ctx.full_weight, ctx.eps = full_weight, eps
        out = logits.new_empty(logits.shape[0], dtype=_compute_dtype(logits))
        log_theta, lgamma_theta = torch.log(theta + eps), torch.lgamma(theta)
        for chunk in _row_chunks(inputs, full_weight, eps):
            w, mu, log_theta_mu, (r, c, x) = chunk.weights, chunk.mu, chunk.log_theta_mu, chunk.entries
            dense = (w * theta * (log_theta - log_theta_mu)).sum(-1)
            stored = (
                torch.lgamma(x + theta.index_select(0, c))
                - lgamma_theta.index_select(0, c)
                - torch.lgamma(x + 1.0)
                + x * (torch.log(chunk.at_entries(mu) + eps) - chunk.at_entries(log_theta_mu))
            )
            out[chunk.cells] = -dense.index_add_(0, r, chunk.at_entries(w) * stored)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        inputs = _Inputs(*ctx.saved_tensors)
        logits, theta, eps = inputs.logits, inputs.theta, ctx.eps
        grad_logits = torch.empty_like(logits)
        grad_theta = torch.zeros_like(theta)
        log_theta, digamma_theta = torch.log(theta + eps), torch.digamma(theta)
        for chunk in _row_chunks(inputs, ctx.full_weight, eps):
            w, mu, log_theta_mu, (r, c, x) = chunk.weights, chunk.mu, chunk.log_theta_mu, chunk.entries
            theta_mu = chunk.theta_mu
            upstream = grad_out[chunk.cells, None]
            w_stored = chunk.at_entries(w) * upstream[:, 0].index_select(0, r)
            theta_mu_stored = chunk.at_entries(theta_mu)
            # d/d mu of the per-entry loss: the zero-count term everywhere, the count terms where stored
            d_mu = w * theta / theta_mu
            d_mu *= upstream
            d_mu.view(-1).index_add_(
                0, chunk.flat, -w_stored * x * (1.0 / (chunk.at_entries(mu) + eps) - 1.0 / theta_mu_stored)
            )
            # mu = library * softmax(logits): d/d logits = mu * (d_mu - <d_mu, rho>)
            grad_logits[chunk.cells] = mu * (d_mu - (d_mu * chunk.rho).sum(-1, keepdim=True))
            d_theta = w * upstream * (log_theta - log_theta_mu + theta / (theta + eps) - theta / theta_mu)
            digamma_stored = torch.digamma(x + theta.index_select(0, c)) - digamma_theta.index_select(0, c)
            d_theta_stored = w_stored * (digamma_stored - x / theta_mu_stored)
            grad_theta -= d_theta.sum(0)
            grad_theta.index_add_(0, c, -d_theta_stored)
        return grad_logits, grad_theta, *([None] * 8)


class _Inputs(NamedTuple):
    """The tensors :class:`_ChunkedNegativeBinomialNLL` works from (see :func:`nb_reconstruction`)."""

    logits: torch.Tensor
    theta: torch.Tensor
    library: torch.Tensor
    measured: torch.Tensor
    masked: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor
    counts: torch.Tensor


class _Chunk:
    """What a row chunk of :class:`_ChunkedNegativeBinomialNLL` recomputes from its inputs."""

    def __init__(self, inputs: _Inputs, full_weight: float, eps: float, cells: slice, entry_span: slice):
        logits, theta, library, measured, masked, rows, cols, counts = inputs
        self.cells = cells
        keep = measured[cells]
        dtype = _compute_dtype(logits)
        unmeasured = logits.new_full((), float("-inf"), dtype=dtype)
        self.rho = torch.log_softmax(torch.where(keep, logits[cells].to(dtype), unmeasured), dim=-1).exp()
        self.mu = library[cells].to(dtype) * self.rho
        self.theta_mu = self.mu + (theta + eps)
        self.log_theta_mu = torch.log(self.theta_mu)
        self.weights = reference.entry_weights(
            keep, None if masked is None else masked[cells], full_weight, dtype
        )
        self.entries = (rows[entry_span] - cells.start, cols[entry_span], counts[entry_span])
        self.flat = self.entries[0] * logits.shape[1] + self.entries[1]

    def at_entries(self, values: torch.Tensor) -> torch.Tensor:
        """``(nnz_chunk,)`` values of a contiguous ``(rows, G)`` chunk tensor at the chunk's stored entries."""
        return values.view(-1).index_select(0, self.flat)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits (half-precision logits are computed in float32)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _row_chunks(inputs: _Inputs, full_weight: float, eps: float):
    """Row chunks of about :data:`CHUNK_ENTRIES` entries, each with the span of its stored counts."""
    (n_cells, n_genes), rows = inputs.logits.shape, inputs.rows
    step = max(1, CHUNK_ENTRIES // max(n_genes, 1))
    bounds = list(range(0, n_cells, step)) + [n_cells]
    spans = torch.searchsorted(rows, torch.tensor(bounds, device=rows.device)).tolist()
    for i in range(len(bounds) - 1):
        yield _Chunk(inputs, full_weight, eps, slice(bounds[i], bounds[i + 1]), slice(spans[i], spans[i + 1]))
