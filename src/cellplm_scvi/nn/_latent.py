"""Latent layers: Gaussian-mixture prior (the paper), the released checkpoint's mixture layout, or a plain Gaussian.

Each layer maps encoder states ``h`` (``(N, D)``) to a :class:`LatentOutput` and scores it with
:meth:`kl`, which returns per-cell terms (``(N,)`` each).

Distributions are built without argument checks: a NaN from a diverging run then reaches the loss,
where the training plan stops with :class:`~cellplm_scvi.model.NonFiniteLossError`.
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
        ``q(z|x)`` with ``(N, L)`` loc and scale.
    z
        ``(N, L)`` sample in training, the mean otherwise (or ``(S, N, L)`` for ``S`` samples).
    cluster_logits
        ``(N, K)`` logits of the mixture component, for mixture latents.
    prior
        ``p(z|y)`` for the released mixture layout.
    """

    qz: Normal
    z: torch.Tensor
    cluster_logits: torch.Tensor | None = None
    prior: Normal | None = None


def draw(qz: Normal, sample: bool, n_samples: int = 1) -> torch.Tensor:
    """``z`` from ``q(z|x)``: reparametrised samples when ``sample``, else the mean; ``(S, N, L)`` for ``S > 1``."""
    if sample:
        return qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
    return qz.loc if n_samples == 1 else qz.loc.expand(n_samples, *qz.loc.shape)


class _GaussianPosterior(nn.Module):
    """``q(z|x) = N(mean(h), scale(h)^2)`` with ``scale = sqrt(exp(clamp(logvar, -5, 5)) + 1e-4)``."""

    def __init__(self, n_hidden: int, n_latent: int):
        super().__init__()
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)

    def posterior(self, h: torch.Tensor) -> Normal:
        scale = torch.sqrt(self.logvar(h).clamp(-5.0, 5.0).exp() + 1e-4)
        return Normal(self.mean(h), scale, validate_args=False)

    def forward(self, h: torch.Tensor, n_samples: int = 1) -> LatentOutput:
        qz = self.posterior(h)
        z = draw(qz, self.training, n_samples)
        return LatentOutput(qz, z)


class GaussianMixtureLatent(_GaussianPosterior):
    """Gaussian posterior under a learnable Gaussian-mixture prior (CellPLM paper, Eq. 5–8).

    ``q(z|x) = N(mu, sigma^2)``; ``q(y|z) = softmax(log p(y) + log p(z|y) + f(z))`` with a small
    network ``f`` (see :meth:`cluster_logits`);
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
        self.n_components = n_components
        self.classifier = nn.Sequential(
            nn.Linear(n_latent, n_latent), nn.ReLU(), nn.Linear(n_latent, n_components)
        )
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

        self.component_means = nn.Parameter(torch.randn(n_components, n_latent))
        self.register_buffer("placed", torch.tensor(False))
        self.component_log_scales = nn.Parameter(torch.zeros(n_components, n_latent))
        self.component_logits = nn.Parameter(torch.zeros(n_components))

    def forward(self, h: torch.Tensor, n_samples: int = 1) -> LatentOutput:
        out = super().forward(h, n_samples)
        if self.training and not self.placed and out.qz.loc.shape[0] >= self.n_components:
            self._place_components(out.qz.loc.detach())
        out.cluster_logits = self.cluster_logits(out.z)
        return out

    @torch.no_grad()
    def _place_components(self, mu: torch.Tensor) -> None:
        """Put the component means on the posterior means of random cells of the first training minibatch.

        Means drawn independently of the data leave all cells nearest to one component, which
        then takes every cell (seen on real and simulated data: 1–2 of 16 components used).
        """
        self.component_means.copy_(mu[torch.randperm(mu.shape[0], device=mu.device)[: self.n_components]])
        self.placed.fill_(True)

    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` → ``(..., K)`` logits of ``q(y|z)``: the prior's posterior plus a learned correction.

        ``log p(y=k) + log N(z; m_k, s_k^2) + f(z)``, with ``f`` a small network whose last layer
        starts at zero, so that ``q(y|z)`` starts as the exact mixture responsibility.
        """
        log_prior = F.log_softmax(self.component_logits, dim=-1)
        log_density = (
            Normal(self.component_means, self.component_log_scales.exp(), validate_args=False)
            .log_prob(z[..., None, :])
            .sum(-1)
        )
        return log_prior + log_density + self.classifier(z)

    def kl(self, out: LatentOutput) -> dict[str, torch.Tensor]:
        """Per-cell ``{"kl_z": L_cond, "kl_y": L_Y}``, each ``(N,)``."""
        mu, sigma = out.qz.loc, out.qz.scale
        log_q_y = F.log_softmax(out.cluster_logits, dim=-1)  # (N, K)
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


class ReleasedGaussianMixtureLatent(nn.Module):
    """The released CellPLM ``20230926`` mixture layout: ``q(y|h)`` first, then ``q(z|h, y)``.

    ``q(y|h) = softmax(Linear(h))``; ``y`` is a one-hot of its argmax at inference (the released
    code adds Gumbel noise there, which makes embeddings random; we do not) and a Gumbel-softmax
    sample (temperature 1) in training. ``q(z|h,y) = N(mu, var)`` from
    ``Linear(D+K → 512) → ReLU`` then ``mu = Linear``, ``var = softplus(Linear)``; prior
    ``p(z|y) = N(Linear(y), softplus(Linear(y)))``. Per cell, ``kl_z = KL(q(z|h,y) || p(z|y))``
    (analytic) and ``kl_y = KL(q(y|h) || Uniform(K))``, with no free-bits floor.

    Parameters
    ----------
    n_hidden
        Input width ``D``.
    n_latent
        Latent width ``L``.
    n_components
        Mixture components ``K``.
    n_inner
        Width of the ``q(z|h,y)`` hidden layer (512 in the release).
    """

    kind = "released_gmm"

    def __init__(self, n_hidden: int, n_latent: int, n_components: int, n_inner: int = 512):
        super().__init__()
        self.n_components = n_components
        self.cluster = nn.Linear(n_hidden, n_components)
        self.inner = nn.Linear(n_hidden + n_components, n_inner)
        self.mean = nn.Linear(n_inner, n_latent)
        self.var = nn.Linear(n_inner, n_latent)
        self.prior_mean = nn.Linear(n_components, n_latent)
        self.prior_var = nn.Linear(n_components, n_latent)

    def forward(self, h: torch.Tensor, n_samples: int = 1) -> LatentOutput:
        logits = self.cluster(h)
        if self.training:
            y = F.gumbel_softmax(logits, tau=1.0, hard=False)
        else:
            y = F.one_hot(logits.argmax(-1), self.n_components).to(h.dtype)
        inner = F.relu(self.inner(torch.cat((h, y), dim=-1)))
        qz = Normal(self.mean(inner), torch.sqrt(F.softplus(self.var(inner)) + 1e-10), validate_args=False)
        z = draw(qz, self.training, n_samples)
        prior = Normal(
            self.prior_mean(y), torch.sqrt(F.softplus(self.prior_var(y)) + 1e-8), validate_args=False
        )
        return LatentOutput(qz, z, logits, prior)

    def kl(self, out: LatentOutput) -> dict[str, torch.Tensor]:
        """Per-cell ``{"kl_z", "kl_y"}``, each ``(N,)``."""
        log_q_y = F.log_softmax(out.cluster_logits, dim=-1)
        kl_y = (log_q_y.exp() * log_q_y).sum(-1) + torch.log(torch.tensor(float(self.n_components)))
        return {"kl_z": torch.distributions.kl_divergence(out.qz, out.prior).sum(-1), "kl_y": kl_y}


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


LATENT_KINDS = {
    "gmm": GaussianMixtureLatent,
    "released_gmm": ReleasedGaussianMixtureLatent,
    "normal": NormalLatent,
}

__all__ = [
    "LATENT_KINDS",
    "GaussianMixtureLatent",
    "LatentOutput",
    "NormalLatent",
    "ReleasedGaussianMixtureLatent",
]
