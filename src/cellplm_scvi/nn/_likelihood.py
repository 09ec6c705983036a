"""The negative-binomial reconstruction loss of the decoder's logits."""

from __future__ import annotations

import torch

from . import cpu


def entry_weights(
    measured: torch.Tensor, masked: torch.Tensor | None, full_weight: float, dtype: torch.dtype
) -> torch.Tensor:
    """``(S, G)`` loss weight of each entry: ``masked + full_weight * measured`` (``measured`` without a mask)."""
    weights = measured.to(dtype)
    if masked is not None:
        weights = masked.to(dtype) + full_weight * weights
    return weights


def nb_reconstruction(
    logits: torch.Tensor,
    library: torch.Tensor,
    theta: torch.Tensor,
    measured: torch.Tensor,
    masked: torch.Tensor | None,
    full_profile_weight: float,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    eps: float = 1e-8,
) -> torch.Tensor:
    """Weighted negative-binomial negative log-likelihood of each cell.

    For cell ``i`` and gene ``j``: ``rho_i = softmax(logits_i)`` over the measured genes,
    ``mu_ij = library_i * rho_ij``, weight ``w_ij = masked_ij + full_profile_weight * measured_ij``
    (``measured_ij`` alone when ``masked`` is ``None``), and the result is
    ``-sum_j w_ij log NB(x_ij; mu_ij, theta_j)`` with

    ``log NB(x; mu, theta) = theta (log theta - log(theta + mu)) + x (log mu - log(theta + mu))
    + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``,

    equal to scvi-tools' ``NegativeBinomial(mu, theta).log_prob`` (same ``eps``). Computed in
    float32 (float64 for float64 logits).

    Parameters
    ----------
    logits
        ``(S, G)`` decoder logits of the scored cells.
    library
        ``(S, 1)`` observed total counts.
    theta
        ``(G,)`` inverse dispersions.
    measured
        ``(S, G)`` bool, the genes measured in each cell's batch.
    masked
        ``(S, G)`` bool masked entries (a subset of ``measured``), or ``None``.
    full_profile_weight
        Weight of every measured entry when ``masked`` is given.
    entries
        ``(row, column, count)`` of the stored counts of the scored cells, rows ascending.

    Returns
    -------
    ``(S,)`` weighted negative log-likelihood of each cell.
    """
    if cpu.nb_reconstruction_applies(logits):
        return cpu.nb_reconstruction(
            logits, library, theta, measured, masked, full_profile_weight, entries, eps
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    rows, columns, stored = entries
    x = logits.new_zeros(logits.shape).index_put((rows, columns), stored.to(logits.dtype))
    rho = torch.softmax(logits.masked_fill(~measured, float("-inf")), dim=-1)
    mu = library * rho
    log_theta_mu = torch.log(theta + mu + eps)
    log_nb = (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )
    return -(entry_weights(measured, masked, full_profile_weight, logits.dtype) * log_nb).sum(-1)
