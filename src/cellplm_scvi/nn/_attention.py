"""Attention among the cells of a tissue; packed tissues never attend to each other.

A minibatch is one sequence of ``N`` cells made of ``T`` contiguous segments (tissues), given by
``segment_ptr`` (``(T + 1,)`` cell offsets). There is no padding. Heads are ``(N, H, d)`` with
``d = D / H``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from ._segments import segment_ids, segment_sum


def each_segment(
    attend: Callable[..., torch.Tensor], segment_ptr: torch.Tensor, *inputs: torch.Tensor
) -> torch.Tensor:
    """``attend(*pieces)`` on the ``(n_t, ...)`` pieces of ``(N, ...)`` ``inputs``, tissue by tissue, joined to ``(N, ...)``."""
    if segment_ptr.numel() == 2:
        return attend(*inputs)
    lengths = segment_ptr.diff().tolist()
    return torch.cat([attend(*pieces) for pieces in zip(*(t.split(lengths) for t in inputs), strict=True)])


class _MultiHeadProjections(nn.Module):
    """Query, key and value projections as one ``(3D, D)`` linear map, and the output projection.

    ``qkv.weight`` rows ``[0, D)`` project queries, ``[D, 2D)`` keys and ``[2D, 3D)`` values.
    State dicts with separate ``query``, ``key`` and ``value`` linear maps load unchanged.
    """

    sigmoid_query_key = False
    """Whether queries and keys pass through a sigmoid after their projection."""

    def __init__(self, n_hidden: int, n_heads: int):
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"n_hidden ({n_hidden}) must be divisible by n_heads ({n_heads}).")
        self.n_heads = n_heads
        self.qkv = nn.Linear(n_hidden, 3 * n_hidden)
        self.out = nn.Linear(n_hidden, n_hidden)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, D)`` → query, key and value, each ``(N, H, d)``."""
        q, k, v = self.qkv(x).chunk(3, dim=1)
        if self.sigmoid_query_key:
            q, k = torch.sigmoid(q), torch.sigmoid(k)
        return tuple(t.reshape(x.shape[0], self.n_heads, -1) for t in (q, k, v))

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor
    ) -> torch.Tensor:
        """Attention within segments: ``(N, H, d)`` query, key and value → ``(N, H, d)`` heads."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """Attend within the segments of ``segment_ptr``.

        Parameters
        ----------
        x
            ``(N, D)`` cell states.
        segment_ptr
            ``(T + 1,)`` cell offsets of the tissues.

        Returns
        -------
        ``(N, D)``: the heads, concatenated, through the output projection.
        """
        heads = self.attend_heads(*self.heads(x), segment_ptr)
        return self.out(heads.reshape(x.shape[0], -1))

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

    sigmoid_query_key = True

    def __init__(self, n_hidden: int, n_heads: int, eps: float = 1e-6):
        super().__init__(n_hidden, n_heads)
        self.eps = eps

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor
    ) -> torch.Tensor:
        """Flow attention within segments: ``(N, H, d)`` ×3 → ``(N, H, d)``."""
        if cpu.flow_attention_applies(q):
            return cpu.flow_attention(q, k, v, segment_ptr, self.eps)
        eps, n_cells, n_segments = self.eps, q.shape[0], segment_ptr.numel() - 1
        segment = segment_ids(segment_ptr, n_cells)

        def tissue_sum(cells: torch.Tensor) -> torch.Tensor:
            """``(N, ...)`` → ``(T, ...)``: the sum over each tissue's cells."""
            return segment_sum(cells, segment, n_segments)

        def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
            """``<cells_i + eps, summary_t(i) + eps>`` per head: ``(N, H, d)``, ``(T, H, d)`` → ``(N, H)``."""
            return ((cells + eps) * (summary + eps).index_select(0, segment)).sum(-1)

        incoming = 1.0 / dot(q, tissue_sum(k))
        outgoing = 1.0 / dot(k, tissue_sum(q))
        allocation = torch.sigmoid(dot(q, tissue_sum(k * outgoing[..., None])))
        source = dot(k, tissue_sum(q * incoming[..., None])).clamp(-1.0, 1.0).exp()
        n_per_tissue = segment_ptr.diff().to(source.dtype)[:, None]
        competition = source * (n_per_tissue / tissue_sum(source)).index_select(0, segment)

        def contract(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
            """``q_i @ sum_j k_j^T v_j`` per head, over one tissue's ``(n, H, d)`` cells."""
            return torch.einsum("ihd,hde->ihe", q_t, torch.einsum("jhd,jhe->hde", k_t, v_t))

        q = q * (incoming * allocation)[..., None]
        v = v * competition[..., None]
        return each_segment(contract, segment_ptr, q, k, v)


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

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor
    ) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d)) v`` within segments: ``(N, H, d)`` ×3 → ``(N, H, d)``."""

        def attend(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
            q_t, k_t, v_t = (
                t.transpose(0, 1)[None] for t in (q_t, k_t, v_t)
            )  # (1, H, n, d): torch's fused kernels
            return F.scaled_dot_product_attention(q_t, k_t, v_t)[0].transpose(0, 1)

        return each_segment(attend, segment_ptr, q, k, v)


ATTENTION_KINDS = {"flow": FlowAttention, "softmax": SoftmaxAttention}
