"""Reconstruction likelihoods computed from the sparse counts of a minibatch."""

from __future__ import annotations

import torch

from cellplm_scvi._constants import BATCH_KEYS


def entry_rows(indptr: torch.Tensor) -> torch.Tensor:
    """``(nnz,)`` row of each stored entry of a CSR matrix with row pointer ``indptr``."""
    n_rows = indptr.numel() - 1
    return torch.repeat_interleave(
        torch.arange(n_rows, device=indptr.device), indptr.diff(), output_size=int(indptr[-1])
    )


def dense_counts(tensors: dict[str, torch.Tensor], n_genes: int) -> torch.Tensor:
    """``(N, G)`` dense counts of a minibatch from its CSR parts."""
    indptr, data = tensors[BATCH_KEYS.X_INDPTR], tensors[BATCH_KEYS.X_DATA]
    dense = data.new_zeros(indptr.numel() - 1, n_genes)
    dense[entry_rows(indptr), tensors[BATCH_KEYS.X_INDICES]] = data
    return dense


def library_sizes(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(N, 1)`` total counts of each cell."""
    indptr, data = tensors[BATCH_KEYS.X_INDPTR], tensors[BATCH_KEYS.X_DATA]
    return data.new_zeros(indptr.numel() - 1).index_add_(0, entry_rows(indptr), data)[:, None]


def weighted_nb_nll(
    tensors: dict[str, torch.Tensor],
    rows: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    weights: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``sum_j w_ij * NLL_NB(x_ij; mu_ij, theta_j)`` for the cells ``rows``, reading the counts sparsely.

    With ``log NB(x; mu, theta) = theta (log theta - log(theta + mu)) + x (log mu - log(theta + mu))
    + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, every term but the first vanishes where
    ``x = 0``, so the gamma functions (the costly part, with their backward) run over the stored
    entries only and ``theta`` stays a per-gene vector. Equal to scvi-tools' dense
    ``NegativeBinomial(mu, theta).log_prob`` (same ``eps``).

    Parameters
    ----------
    tensors
        The minibatch (CSR counts of all ``N`` cells).
    rows
        ``(S,)`` cells to score.
    mu
        ``(S, G)`` means.
    theta
        ``(G,)`` inverse dispersions.
    weights
        ``(S, G)`` weight of each entry.

    Returns
    -------
    ``(S,)`` weighted negative log-likelihood of each scored cell.
    """
    indptr = tensors[BATCH_KEYS.X_INDPTR]
    position = torch.full((indptr.numel() - 1,), -1, dtype=torch.long, device=indptr.device)
    position[rows] = torch.arange(rows.numel(), device=indptr.device)
    entry_position = position[entry_rows(indptr)]
    kept = entry_position >= 0
    r, c, x = entry_position[kept], tensors[BATCH_KEYS.X_INDICES][kept], tensors[BATCH_KEYS.X_DATA][kept]

    log_theta_mu = torch.log(theta + mu + eps)
    dense = (weights * theta * (torch.log(theta + eps) - log_theta_mu)).sum(-1)
    theta_c = theta[c]
    stored = (
        torch.lgamma(x + theta_c)
        - torch.lgamma(theta_c)
        - torch.lgamma(x + 1.0)
        + x * (torch.log(mu[r, c] + eps) - log_theta_mu[r, c])
    )
    sparse = torch.zeros_like(dense).index_add_(0, r, weights[r, c] * stored)
    return -(dense + sparse)
