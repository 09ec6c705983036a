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
    """Query, key and value projections as one ``(3D, D)`` linear map, and the output projection.

    ``qkv.weight`` rows ``[0, D)`` project queries, ``[D, 2D)`` keys and ``[2D, 3D)`` values: one
    matrix product instead of three. State dicts with separate ``query``, ``key`` and ``value``
    linear maps (written before they were fused) load unchanged.
    """

    def __init__(self, n_hidden: int, n_heads: int):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden ({n_hidden}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.qkv = nn.Linear(n_hidden, 3 * n_hidden)
        self.out = nn.Linear(n_hidden, n_hidden)

    def heads(self, x: torch.Tensor, sigmoid_query_key: bool = False) -> tuple[torch.Tensor, ...]:
        """``(N, D)`` → query, key and value, each ``(N, H, D/H)`` (views of one ``(N, 3D)`` tensor).

        With ``sigmoid_query_key``, queries and keys pass through a sigmoid (in place when no
        gradient is recorded).
        """
        n, width = x.shape
        qkv = self.qkv(x)
        if sigmoid_query_key:
            query_key = qkv[:, : 2 * width]
            query_key = torch.sigmoid(query_key) if torch.is_grad_enabled() else query_key.sigmoid_()
            q, k, v = query_key[:, :width], query_key[:, width:], qkv[:, 2 * width :]
        else:
            q, k, v = qkv.split(width, dim=1)
        return tuple(t.view(n, self.n_heads, -1) for t in (q, k, v))

    def attend(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` → ``(N, D)`` concatenated heads, before the output projection."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """Attend within the segments of ``segment_ptr`` (``(T + 1,)`` cell offsets).

        Parameters
        ----------
        x
            ``(N, D)`` cell states.
        segment_ptr
            ``(T + 1,)`` cell offsets of the tissues.

        Returns
        -------
        ``(N, D)`` attention output, ``out(attend(x))``.
        """
        return self.out(self.attend(x, segment_ptr))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fuse_projections(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


SEPARATE_PROJECTIONS = ("query", "key", "value")
"""Row blocks of ``qkv``, in order; the names of the separate linear maps they replace."""


def fuse_projections(state_dict: dict, prefix: str) -> None:
    """Replace ``{prefix}query/key/value.{weight,bias}`` by ``{prefix}qkv.{weight,bias}``, in place.

    Does nothing unless all six tensors are in ``state_dict``.
    """
    names = [f"{prefix}{name}.{p}" for name in SEPARATE_PROJECTIONS for p in ("weight", "bias")]
    if all(name in state_dict for name in names):
        for p in ("weight", "bias"):
            parts = [state_dict.pop(f"{prefix}{name}.{p}") for name in SEPARATE_PROJECTIONS]
            state_dict[f"{prefix}qkv.{p}"] = torch.cat(parts)


def loop_threshold(n_hidden: int) -> int:
    """Mean tissue size from which :class:`FlowAttention` attends tissues one by one: ``32768 / D``, at least 64.

    One by one, no ``(N, H, d)`` temporary holds per-tissue sums; all at once, a minibatch of many
    small tissues avoids a Python loop over them. Both give the same result. In two runs of
    ``benchmarks/attention_packing.py`` (4,000 cells, 2 CPU threads) one by one was faster from
    256 cells per tissue at ``D`` = 128 (inference: from 128 in one run; training: a tie at 256
    in the other) and from 64 at ``D`` = 1,024 (at 16 the runs disagreed, within 8 %): the
    threshold is 256 and 64 cells there.
    """
    return max(64, 32_768 // n_hidden)


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
        self.loop_above_cells_per_tissue = loop_threshold(n_hidden)
        """Mean tissue size from which tissues are attended one by one (see :func:`loop_threshold`)."""

    def attend(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` cell states → ``(N, D)`` concatenated heads, attending within segments."""
        n_cells = x.shape[0]
        q, k, v = self.heads(x, sigmoid_query_key=True)
        n_segments = segment_ptr.numel() - 1
        if n_segments == 1:
            out = self._attend_tissue(q, k, v)
        elif n_cells >= self.loop_above_cells_per_tissue * n_segments:
            out = torch.empty_like(v, memory_format=torch.contiguous_format)
            bounds = segment_ptr.tolist()
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                out[start:stop] = self._attend_tissue(q[start:stop], k[start:stop], v[start:stop])
        else:
            out = self._attend_packed(q, k, v, segment_ptr)
        return out.reshape(n_cells, -1)

    def _attend_tissue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Flow attention among the ``n`` cells of one tissue: ``(n, H, d)`` ×3 → ``(n, H, d)``.

        Every ``<a_i + eps, s + eps>`` is taken as ``<a_i, s + eps> + eps * sum(s + eps)``, so that
        no ``(n, H, d)`` temporary is made for it. Per-head products with an ``(H, d)`` summary and
        per-head weighted sums over cells run as single matrix products over all heads (through a
        block-diagonal ``(D, H)`` matrix), which read the cells once, in their own layout.
        """
        eps, (n, n_heads, head_width) = self.eps, q.shape
        eye = torch.eye(n_heads, dtype=q.dtype, device=q.device)

        def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
            """``<cells_i + eps, summary>`` per head: ``(n, H, d)`` cells, ``(H, d)`` summary → ``(n, H)``."""
            block_diagonal = (summary[:, :, None] * eye[:, None, :]).reshape(-1, n_heads)  # (D, H)
            return torch.mm(cells.reshape(n, -1), block_diagonal) + eps * summary.sum(-1)

        def weighted_sum(cells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            """``sum_i weights_ih cells_ih``: ``(n, H, d)`` cells, ``(n, H)`` weights → ``(H, d)``."""
            # (D, H): every head's cells against every head's weights; the head-matched blocks are kept
            all_pairs = torch.mm(cells.reshape(n, -1).t(), weights)
            return all_pairs.view(n_heads, head_width, n_heads).diagonal(dim1=0, dim2=2).t()

        incoming = 1.0 / dot(q, k.sum(0) + eps)  # (n, H)
        outgoing = 1.0 / dot(k, q.sum(0) + eps)
        allocation = torch.sigmoid(dot(q, weighted_sum(k, outgoing) + eps))
        # The clamp to [-1, 1] bounds exp(), so the softmax over cells needs no max subtraction.
        source = dot(k, weighted_sum(q, incoming) + eps).clamp(-1.0, 1.0).exp()
        competition = source * (n / source.sum(0))
        # batched over heads straight on the strided views (einsum would copy them head-major first)
        context = torch.bmm(k.permute(1, 2, 0), (v * competition[..., None]).transpose(0, 1))  # (H, d, d)
        heads = torch.bmm(q.transpose(0, 1), context).transpose(0, 1)  # (n, H, d), a head-major view
        scale = (incoming * allocation)[..., None]
        if torch.is_grad_enabled():
            return heads * scale
        # scaled straight into a cell-major tensor: no copy when the heads are concatenated
        return torch.mul(heads, scale, out=torch.empty(heads.shape, dtype=heads.dtype, device=heads.device))

    def _attend_packed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor
    ) -> torch.Tensor:
        """Flow attention for all tissues at once: ``(N, H, d)`` ×3 → ``(N, H, d)``.

        Per-tissue sums are gathered back to every cell, which costs ``(N, H, d)`` temporaries;
        only the final ``(H, d, d)`` contractions run tissue by tissue.
        """
        n_cells, eps = q.shape[0], self.eps
        n_segments = segment_ptr.numel() - 1
        segment = segment_ids(segment_ptr, n_cells)
        lengths = segment_ptr.diff().to(q.dtype)

        def per_tissue(values: torch.Tensor) -> torch.Tensor:
            return segment_sum(values, segment, n_segments)[segment]

        incoming = 1.0 / ((q + eps) * (per_tissue(k) + eps)).sum(-1)  # (N, H)
        outgoing = 1.0 / ((k + eps) * (per_tissue(q) + eps)).sum(-1)
        allocation = torch.sigmoid(((q + eps) * (per_tissue(k * outgoing[..., None]) + eps)).sum(-1))
        source = ((k + eps) * (per_tissue(q * incoming[..., None]) + eps)).sum(-1).clamp(-1.0, 1.0).exp()
        competition = source / per_tissue(source) * lengths[segment, None]
        q = q * (incoming * allocation)[..., None]
        v = v * competition[..., None]
        out = torch.empty_like(v)
        bounds = segment_ptr.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            k_s, v_s, q_s = (t[start:stop].transpose(0, 1) for t in (k, v, q))  # (H, n, d)
            out[start:stop] = (q_s @ (k_s.transpose(1, 2) @ v_s)).transpose(0, 1)
        return out


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

    def attend(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` cell states → ``(N, D)`` concatenated heads, attending within segments."""
        q, k, v = self.heads(x)
        out = torch.empty_like(v, memory_format=torch.contiguous_format)
        bounds = segment_ptr.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            q_s, k_s, v_s = (t[start:stop].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, d)
            out[start:stop] = F.scaled_dot_product_attention(q_s, k_s, v_s)[0].transpose(0, 1)
        return out.reshape(x.shape[0], -1)


ATTENTION_KINDS = {"flow": FlowAttention, "softmax": SoftmaxAttention}
