"""Attention among the cells of a tissue; packed tissues never attend to each other.

A minibatch is one sequence of ``N`` cells made of ``T`` contiguous segments (tissues), given by
``segment_ptr`` (``(T + 1,)`` cell offsets). There is no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def segment_ids(segment_ptr: torch.Tensor, n_cells: int) -> torch.Tensor:
    """``(N,)`` segment index of each cell, from ``(T + 1,)`` offsets."""
    lengths = segment_ptr.diff()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=segment_ptr.device), lengths, output_size=n_cells
    )


def segment_sum(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum ``(N, ...)`` rows into ``(T, ...)`` per segment."""
    out = values.new_zeros((n_segments, *values.shape[1:]))
    return out.index_add_(0, segment, values)


class _MultiHeadProjections(nn.Module):
    """Query, key, value and output projections shared by both attention kinds."""

    def __init__(self, n_hidden: int, n_heads: int):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden ({n_hidden}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.query = nn.Linear(n_hidden, n_hidden)
        self.key = nn.Linear(n_hidden, n_hidden)
        self.value = nn.Linear(n_hidden, n_hidden)
        self.out = nn.Linear(n_hidden, n_hidden)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` → three ``(N, H, D/H)`` tensors."""
        n = x.shape[0]
        split = lambda t: t.view(n, self.n_heads, -1)
        return split(self.query(x)), split(self.key(x)), split(self.value(x))


class FlowAttention(_MultiHeadProjections):
    """Flowformer attention (Wu et al., 2022), linear in the number of cells, per tissue.

    Per head, for the cells of one tissue (``n`` cells, ``eps`` = ``1e-6``)::

        Q = sigmoid(x Wq + bq),  K = sigmoid(x Wk + bk),  V = x Wv + bv
        I_i = 1 / <Q_i + eps, sum_j K_j + eps>        (incoming flow)
        O_j = 1 / <K_j + eps, sum_i Q_i + eps>        (outgoing flow)
        A_i = sigmoid(<Q_i + eps, sum_j O_j K_j + eps>)            (allocation)
        C_j = n * softmax_j(clamp(<K_j + eps, sum_i I_i Q_i + eps>, -1, 1))   (competition)
        out_i = A_i * (I_i Q_i) @ sum_j K_j^T (C_j V_j)

    Every sum runs over the cells of the same tissue. Heads are concatenated and projected.

    Parameters
    ----------
    n_hidden
        Width ``D``.
    n_heads
        Number of heads ``H``.
    eps
        Stabiliser of the flow normalisation.
    """

    def __init__(self, n_hidden: int, n_heads: int, eps: float = 1e-6):
        super().__init__(n_hidden, n_heads)
        self.eps = eps

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """Attend within segments.

        Parameters
        ----------
        x
            ``(N, D)`` cell states.
        segment_ptr
            ``(T + 1,)`` cell offsets of the tissues.

        Returns
        -------
        ``(N, D)`` attention output.
        """
        n_cells, eps = x.shape[0], self.eps
        n_segments = segment_ptr.numel() - 1
        q, k, v = self.heads(x)
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        segment = segment_ids(segment_ptr, n_cells)
        lengths = segment_ptr.diff().to(x.dtype)

        k_sum = segment_sum(k, segment, n_segments)[segment]  # (N, H, d)
        q_sum = segment_sum(q, segment, n_segments)[segment]
        incoming = 1.0 / ((q + eps) * (k_sum + eps)).sum(-1)  # (N, H)
        outgoing = 1.0 / ((k + eps) * (q_sum + eps)).sum(-1)
        k_out = segment_sum(k * outgoing[..., None], segment, n_segments)[segment]
        q_in = segment_sum(q * incoming[..., None], segment, n_segments)[segment]
        allocation = torch.sigmoid(((q + eps) * (k_out + eps)).sum(-1))
        # The clamp to [-1, 1] bounds exp(), so the per-tissue softmax needs no max subtraction.
        source = ((k + eps) * (q_in + eps)).sum(-1).clamp(-1.0, 1.0).exp()
        competition = source / segment_sum(source, segment, n_segments)[segment] * lengths[segment, None]

        q = q * incoming[..., None]
        v = v * competition[..., None]
        out = torch.empty_like(v)
        bounds = segment_ptr.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            k_s, v_s, q_s = (t[start:stop].transpose(0, 1) for t in (k, v, q))  # (H, n, d)
            out[start:stop] = (q_s @ (k_s.transpose(1, 2) @ v_s)).transpose(0, 1)
        out = out * allocation[..., None]
        return self.out(out.reshape(n_cells, -1))


class SoftmaxAttention(_MultiHeadProjections):
    """Exact scaled dot-product attention among the cells of each tissue.

    Equivalent to one attention call with a block-diagonal tissue mask, computed tissue by tissue
    so that memory grows with the largest tissue, not with the whole minibatch.

    Parameters
    ----------
    n_hidden
        Width ``D``.
    n_heads
        Number of heads ``H``.
    """

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """Attend within segments; see :meth:`FlowAttention.forward`."""
        q, k, v = self.heads(x)
        out = torch.empty_like(v)
        bounds = segment_ptr.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            q_s, k_s, v_s = (t[start:stop].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, d)
            out[start:stop] = F.scaled_dot_product_attention(q_s, k_s, v_s)[0].transpose(0, 1)
        return self.out(out.reshape(x.shape[0], -1))


ATTENTION_KINDS = {"flow": FlowAttention, "softmax": SoftmaxAttention}
