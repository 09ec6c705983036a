"""Latent layers: Gaussian-mixture prior (the paper), plain Gaussian, or deterministic.

Each layer maps encoder states ``h`` (``(N, D)``) to a :class:`LatentOutput` and scores it with
:meth:`kl`, which returns per-cell terms (``(N,)`` each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal


@dataclass
class LatentOutput:
    """What a latent layer produces for ``N`` cells.

    Attributes
    ----------
    qz
        ``q(z|x)`` with ``(N, L)`` loc and scale, or ``None`` for the deterministic layer.
    z
        ``(N, L)`` sample in training, the mean otherwise (or ``(S, N, L)`` for ``S`` samples).
    """

    qz: Normal | None
    z: torch.Tensor


class _GaussianPosterior(nn.Module):
    """``q(z|x) = N(mean(h), scale(h)^2)`` with ``scale = sqrt(exp(clamp(logvar, -5, 5)) + 1e-4)``."""

    def __init__(self, n_hidden: int, n_latent: int):
        super().__init__()
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)

    def posterior(self, h: torch.Tensor) -> Normal:
        scale = torch.sqrt(self.logvar(h).clamp(-5.0, 5.0).exp() + 1e-4)
        return Normal(self.mean(h), scale)

    def forward(self, h: torch.Tensor, n_samples: int = 1) -> LatentOutput:
        qz = self.posterior(h)
        if self.training:
            z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        else:
            z = qz.loc if n_samples == 1 else qz.loc.expand(n_samples, *qz.loc.shape)
        return LatentOutput(qz, z)


class GaussianMixtureLatent(_GaussianPosterior):
    """Gaussian posterior under a learnable Gaussian-mixture prior (CellPLM paper, Eq. 5–8).

    ``q(z|x) = N(mu, sigma^2)``; ``q(y|z) = softmax(f(z))`` with a small network ``f``;
    ``p(z|y=k) = N(m_k, s_k^2)``; ``p(y) = softmax(pi)``. Per cell::

        L_cond = sum_k q(y=k|z) KL(q(z|x) || p(z|y=k))   (analytic Gaussian KL)
        L_Y    = KL(q(y|z) || p(y))

    ``z`` is sampled in training and equals the mean at inference, so embeddings and cluster
    probabilities are deterministic. No free-bits floor is applied to either term.

    Parameters
    ----------
    n_hidden
        Input width ``D``.
    n_latent
        Latent width ``L``.
    n_components
        Number of mixture components ``K``.
    """

    kind = "gmm"

    def __init__(self, n_hidden: int, n_latent: int, n_components: int):
        super().__init__(n_hidden, n_latent)
        self.classifier = nn.Sequential(
            nn.Linear(n_latent, n_latent), nn.ReLU(), nn.Linear(n_latent, n_components)
        )
        self.component_means = nn.Parameter(torch.randn(n_components, n_latent))
        self.component_log_scales = nn.Parameter(torch.zeros(n_components, n_latent))
        self.component_logits = nn.Parameter(torch.zeros(n_components))

    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` → ``(N, K)`` logits of ``q(y|z)``."""
        return self.classifier(z)

    def kl(self, out: LatentOutput) -> dict[str, torch.Tensor]:
        """Per-cell ``{"kl_z": L_cond, "kl_y": L_Y}``, each ``(N,)``."""
        mu, sigma = out.qz.loc, out.qz.scale
        log_q_y = F.log_softmax(self.cluster_logits(out.z), dim=-1)  # (N, K)
        # KL(N(mu, sigma) || N(m_k, s_k)) summed over L, for all (cell, k) pairs with matmuls only.
        inv_var = torch.exp(-2.0 * self.component_log_scales)  # (K, L)
        quadratic = (
            (sigma.square() + mu.square()) @ inv_var.T
            - 2.0 * mu @ (self.component_means * inv_var).T
            + (self.component_means.square() * inv_var).sum(-1)
        )
        kl_components = (
            0.5 * quadratic
            + self.component_log_scales.sum(-1)
            - sigma.log().sum(-1, keepdim=True)
            - 0.5 * mu.shape[-1]
        )  # (N, K)
        q_y = log_q_y.exp()
        log_p_y = F.log_softmax(self.component_logits, dim=-1)
        return {
            "kl_z": (q_y * kl_components).sum(-1),
            "kl_y": (q_y * (log_q_y - log_p_y)).sum(-1),
        }


class NormalLatent(_GaussianPosterior):
    """Gaussian posterior under a standard normal prior (plain VAE; the released ``20231027`` layout).

    Parameters
    ----------
    n_hidden
        Input width ``D``.
    n_latent
        Latent width ``L``.
    """

    kind = "normal"

    def kl(self, out: LatentOutput) -> dict[str, torch.Tensor]:
        """Per-cell ``{"kl_z": KL(q(z|x) || N(0, I))}``, ``(N,)``."""
        mu, sigma = out.qz.loc, out.qz.scale
        return {"kl_z": 0.5 * (sigma.square() + mu.square() - 1.0 - 2.0 * sigma.log()).sum(-1)}


class DeterministicLatent(nn.Module):
    """``z = Linear(h)``: a deterministic autoencoder bottleneck with no KL term.

    Parameters
    ----------
    n_hidden
        Input width ``D``.
    n_latent
        Latent width ``L``.
    """

    kind = "none"

    def __init__(self, n_hidden: int, n_latent: int):
        super().__init__()
        self.mean = nn.Linear(n_hidden, n_latent)

    def forward(self, h: torch.Tensor, n_samples: int = 1) -> LatentOutput:
        z = self.mean(h)
        return LatentOutput(None, z if n_samples == 1 else z.expand(n_samples, *z.shape))

    def kl(self, out: LatentOutput) -> dict[str, torch.Tensor]:
        """No KL term: an empty dict."""
        return {}


LATENT_KINDS = {"gmm": GaussianMixtureLatent, "normal": NormalLatent, "none": DeterministicLatent}

__all__ = ["LATENT_KINDS", "DeterministicLatent", "GaussianMixtureLatent", "LatentOutput", "NormalLatent"]
