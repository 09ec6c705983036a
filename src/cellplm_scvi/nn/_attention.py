"""Attention among the cells of a tissue; packed tissues never attend to each other.

A minibatch is one sequence of ``N`` cells made of ``T`` contiguous segments (tissues), given by
``segment_ptr`` (``(T + 1,)`` cell offsets). There is no padding.
"""

from __future__ import annotations

from collections.abc import Callable

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
    # on a CPU, index_add_ reads strided rows (such as a view of the projections) ~7x slower
    # than a copy followed by a contiguous read
    return out.index_add_(0, segment, values.contiguous())


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

    sigmoid_query_key = False
    """Whether queries and keys pass through a sigmoid after their projection."""

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, D)`` → query, key and value, each ``(N, H, D/H)`` (views of one ``(N, 3D)`` tensor).

        Where :attr:`sigmoid_query_key` is set, queries and keys pass through a sigmoid (in place
        when no gradient is recorded; with autograd they are views of a second tensor).
        """
        qkv = self.qkv(x)
        if not self.sigmoid_query_key:
            return self.split_heads(qkv)
        query_key = qkv[:, : 2 * x.shape[1]]
        if not torch.is_grad_enabled():
            query_key.sigmoid_()
            return self.split_heads(qkv)
        q, k = torch.sigmoid(query_key).chunk(2, dim=1)
        v = qkv[:, 2 * x.shape[1] :]
        return tuple(t.view(x.shape[0], self.n_heads, -1) for t in (q, k, v))

    def project_into(self, x: torch.Tensor, qkv: torch.Tensor) -> None:
        """Write the projections of ``(n, D)`` ``x`` into ``(n, 3D)`` ``qkv`` (no autograd).

        ``split_heads(qkv)`` then gives what :meth:`heads` returns for ``x``.
        """
        torch.addmm(self.qkv.bias, x, self.qkv.weight.t(), out=qkv)
        if self.sigmoid_query_key:
            qkv[:, : 2 * x.shape[1]].sigmoid_()

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, 3D)`` projections → query, key and value views, each ``(N, H, D/H)``."""
        return tuple(part.view(qkv.shape[0], self.n_heads, -1) for part in qkv.chunk(3, dim=1))

    def attend(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` → ``(N, D)`` concatenated heads, before the output projection."""
        return self.attend_heads(*self.heads(x), segment_ptr).reshape(x.shape[0], -1)

    def attend_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segment_ptr: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention within segments: ``(N, H, d)`` query, key and value → ``(N, H, d)`` heads.

        ``out`` (only without autograd) receives the result; it may be ``q`` itself, whose rows
        are each read before they are overwritten.
        """
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


def each_segment(
    attend: Callable[..., torch.Tensor],
    segment_ptr: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attend(*pieces, dest)`` segment by segment on the ``(n, ...)`` pieces of ``(N, ...)`` ``inputs``, stacked to ``(N, ...)``.

    Without autograd each segment writes its result into its rows of ``out`` (``dest``; ``out``
    is a new tensor shaped like the last input where None). With autograd ``dest`` is None and
    the results are concatenated. The inputs are cut with one ``split`` and the results joined
    with one ``cat``: per-segment slices and slice assignments would each cost the backward pass
    a whole-minibatch gradient, quadratic in the number of segments.
    """
    lengths = segment_ptr.diff().tolist()
    pieces = zip(*(t.split(lengths) for t in inputs), strict=True)
    if torch.is_grad_enabled():
        return torch.cat([attend(*piece, None) for piece in pieces])
    if out is None:
        out = torch.empty(inputs[-1].shape, dtype=inputs[-1].dtype, device=inputs[-1].device)
    for piece, dest in zip(pieces, out.split(lengths), strict=True):
        attend(*piece, dest)
    return out


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


SQUARE_BELOW_CELLS_PER_TISSUE = 32
"""Mean tissue size below which :class:`FlowAttention` contracts packed tissues through their scores.

For tissues of a few cells, ``(Q K^T) V`` on one padded batch (:func:`padded_square_attention`)
beats a Python loop over the tissues' ``Q (K^T V)``. In ``benchmarks/attention_packing.py``
(4,000 cells in equal tissues of 4 to 1,000 cells, 2 CPU threads) the squares were faster at
D = 128 up to 32 cells per tissue (1.1–2.0× in inference, 1.2–3.7× in training), and at
D = 1,024 tied in inference up to 32 cells and 1.1–1.4× faster in training up to 16; from 64
to 128 cells on, the loop was as fast or faster.
"""


def block_rows(n_hidden: int) -> int:
    """Rows per block where a large minibatch goes in blocks (CPU, no autograd): ``2**20 / D``, at least 256.

    A block's widest temporary (the ``(rows, 3D)`` projections) then takes 12 MiB in float32,
    whatever the width: it stays in cache and its memory is reused from block to block, instead
    of freshly mapped, page by page, for every tissue-sized temporary.
    """
    return max(256, (1 << 20) // n_hidden)


def visits_in_blocks(x: torch.Tensor) -> bool:
    """Whether work on ``x`` goes in row blocks: on a CPU (where blocks were measured) without autograd."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def row_blocks(n_rows: int, rows_per_block: int) -> list[slice]:
    """Consecutive slices of at most ``rows_per_block`` rows covering ``range(n_rows)`` (one if empty)."""
    return [
        slice(start, min(start + rows_per_block, n_rows))
        for start in range(0, max(n_rows, 1), rows_per_block)
    ]


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
        self.loop_above_cells_per_tissue = loop_threshold(n_hidden)
        """Mean tissue size from which tissues are attended one by one (see :func:`loop_threshold`)."""
        self.square_below_cells_per_tissue = SQUARE_BELOW_CELLS_PER_TISSUE
        """Mean tissue size below which packed tissues contract through their scores (see :meth:`_attend_packed`)."""
        self.block_rows = block_rows(n_hidden)
        """Cells per block where a tissue is attended in blocks (see :func:`block_rows`)."""

    def attend_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segment_ptr: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow attention within segments: ``(N, H, d)`` ×3 → ``(N, H, d)`` (written into ``out`` if given)."""
        n_cells, n_segments = q.shape[0], segment_ptr.numel() - 1
        if n_segments == 1:
            return self._attend_tissue(q, k, v, out)
        if n_cells < self.loop_above_cells_per_tissue * n_segments:
            return self._attend_packed(q, k, v, segment_ptr, out)
        return each_segment(self._attend_tissue, segment_ptr, (q, k, v), out)

    def _attend_tissue(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flow attention among the ``n`` cells of one tissue: ``(n, H, d)`` ×3 → ``(n, H, d)``.

        Every ``<a_i + eps, s + eps>`` is taken as ``<a_i, s + eps> + eps * sum(s + eps)``, so that
        no ``(n, H, d)`` temporary is made for it. Per-head products with an ``(H, d)`` summary and
        per-head weighted sums over cells run as single matrix products over all heads (through a
        block-diagonal ``(D, H)`` matrix), which read the cells once, in their own layout.

        On a CPU without autograd the cells are visited in blocks of :attr:`block_rows` (three
        passes gather the tissue's sums, a fourth writes each block's heads into ``out``), so that
        no temporary grows with the tissue. The competition's softmax denominator scales the
        ``(H, d, d)`` context once all blocks are summed.
        """
        eps, (n, n_heads, head_width) = self.eps, q.shape
        eye = torch.eye(n_heads, dtype=q.dtype, device=q.device)

        def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
            """``<cells_i + eps, summary>`` per head: ``(m, H, d)`` cells, ``(H, d)`` summary → ``(m, H)``."""
            block_diagonal = (summary[:, :, None] * eye[:, None, :]).reshape(-1, n_heads)  # (D, H)
            return torch.mm(cells.reshape(cells.shape[0], -1), block_diagonal) + eps * summary.sum(-1)

        def weighted_sum(cells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            """``sum_i weights_ih cells_ih``: ``(m, H, d)`` cells, ``(m, H)`` weights → ``(H, d)``."""
            # (D, H): every head's cells against every head's weights; the head-matched blocks are kept
            all_pairs = torch.mm(cells.reshape(cells.shape[0], -1).t(), weights)
            return all_pairs.view(n_heads, head_width, n_heads).diagonal(dim1=0, dim2=2).t()

        grad = torch.is_grad_enabled()
        blocks = row_blocks(n, self.block_rows) if visits_in_blocks(q) else [slice(0, n)]
        key_sum, query_sum = k.sum(0) + eps, q.sum(0) + eps
        incoming = [1.0 / dot(q[b], key_sum) for b in blocks]  # (m, H) per block
        key_flow = sum(weighted_sum(k[b], 1.0 / dot(k[b], query_sum)) for b in blocks) + eps
        query_flow = sum(weighted_sum(q[b], i) for b, i in zip(blocks, incoming, strict=True)) + eps
        # The clamp to [-1, 1] bounds exp(), so the softmax over cells needs no max subtraction.
        source_total, context = 0.0, 0.0
        for b in blocks:
            source = dot(k[b], query_flow).clamp(-1.0, 1.0).exp()
            source_total = source_total + source.sum(0)
            # batched over heads straight on the strided views (einsum would copy them head-major first)
            context = context + torch.bmm(k[b].permute(1, 2, 0), (v[b] * source[..., None]).transpose(0, 1))
        context = context * (n / source_total)[:, None, None]  # (H, d, d), with the competition's n / sum

        def scaled_heads(b: slice, incoming_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """A block's ``(m, H, d)`` heads (a head-major view) and their ``(m, H, 1)`` scale."""
            allocation = torch.sigmoid(dot(q[b], key_flow))
            heads = torch.bmm(q[b].transpose(0, 1), context).transpose(0, 1)
            return heads, (incoming_b * allocation)[..., None]

        if grad:
            heads, scale = scaled_heads(blocks[0], incoming[0])
            return heads * scale
        if out is None:
            out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        for b, incoming_b in zip(blocks, incoming, strict=True):
            # scaled straight into a cell-major tensor: no copy when the heads are concatenated
            torch.mul(*scaled_heads(b, incoming_b), out=out[b])
        return out

    def _attend_packed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segment_ptr: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow attention for all tissues at once: ``(N, H, d)`` ×3 → ``(N, H, d)``.

        Per-tissue sums, ``(T, H, d)``, are gathered back to the cells only inside the per-cell
        products ``<a_i + eps, s_t(i)>``, which take ``<a_i, s> + eps * sum(s)`` as in
        :meth:`_attend_tissue` and sum each head's columns with one matrix product. The final
        contraction ``(I_i Q_i) @ sum_j K_j^T (C_j V_j)`` runs tissue by tissue, or, for tissues of
        a few cells of similar sizes, for all of them at once through their ``n × n`` scores (see
        :meth:`_contracts_through_scores`).
        """
        n_cells, n_heads, head_width = q.shape
        n_segments, eps = segment_ptr.numel() - 1, self.eps
        segment = segment_ids(segment_ptr, n_cells)
        # (D, H): column c of the concatenated heads belongs to head c // d
        head_of_column = torch.eye(n_heads, dtype=q.dtype, device=q.device).repeat_interleave(head_width, 0)

        def tissue_sum(values: torch.Tensor) -> torch.Tensor:
            return segment_sum(values, segment, n_segments)

        def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
            """``<cells_i + eps, summary_t(i)>`` per head: ``(N, H, d)`` cells, ``(T, H, d)`` summaries → ``(N, H)``."""
            own = summary.reshape(n_segments, -1).index_select(0, segment)  # (N, D)
            offset = eps * summary.sum(-1).index_select(0, segment)  # (N, H)
            return torch.addmm(offset, cells.reshape(n_cells, -1) * own, head_of_column)

        incoming = 1.0 / dot(q, tissue_sum(k) + eps)  # (N, H)
        outgoing = 1.0 / dot(k, tissue_sum(q) + eps)
        allocation = torch.sigmoid(dot(q, tissue_sum(k * outgoing[..., None]) + eps))
        source = dot(k, tissue_sum(q * incoming[..., None]) + eps).clamp(-1.0, 1.0).exp()
        # (T, H): the competition's n / sum of the tissue's sources
        competition_scale = segment_ptr.diff().to(source.dtype)[:, None] / tissue_sum(source)
        q = q * (incoming * allocation)[..., None]
        v = v * (source * competition_scale.index_select(0, segment))[..., None]
        if self._contracts_through_scores(segment_ptr):
            heads = padded_square_attention(q, k, v, segment_ptr, segment)
            return heads if out is None else out.copy_(heads)

        def contract(q_s, k_s, v_s, dest: torch.Tensor | None) -> torch.Tensor:
            q_s, k_s, v_s = (t.transpose(0, 1) for t in (q_s, k_s, v_s))  # (H, n, d)
            heads = torch.bmm(q_s, torch.bmm(k_s.transpose(1, 2), v_s)).transpose(0, 1)
            return heads if dest is None else dest.copy_(heads)

        return each_segment(contract, segment_ptr, (q, k, v), out)

    def _contracts_through_scores(self, segment_ptr: torch.Tensor) -> bool:
        """Whether :meth:`_attend_packed` ends with :func:`padded_square_attention`.

        So it does where tissues hold fewer than :attr:`square_below_cells_per_tissue` cells on
        average and padding every tissue to the largest at most doubles the rows, which bounds
        the padded batch (one large tissue among many small ones would blow it up).
        """
        lengths = segment_ptr.diff()
        n_cells, n_segments = int(lengths.sum()), lengths.numel()
        return (
            n_cells < self.square_below_cells_per_tissue * n_segments
            and int(lengths.max()) * n_segments <= 2 * n_cells
        )


def padded_square_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor, segment: torch.Tensor
) -> torch.Tensor:
    """``sum_j <q_i, k_j> v_j`` over the cells ``j`` of each cell's tissue, per head, for all tissues at once.

    Every (tissue, head) pair becomes one zero-padded ``(n_max, d)`` matrix of a ``(T H, n_max, d)``
    batch, and the result is ``(Q K^T) V`` in two batched products: ``T H n_max^2 d`` multiply-adds
    against ``N H d^2`` for ``Q (K^T V)``, and no Python loop over tissues, which pays for tissues
    of a few cells. Padded keys and values are zero, so they add nothing.

    Parameters
    ----------
    q, k, v
        ``(N, H, d)`` queries, keys and values.
    segment_ptr
        ``(T + 1,)`` cell offsets of the tissues.
    segment
        ``(N,)`` tissue of each cell (:func:`segment_ids`).

    Returns
    -------
    ``(N, H, d)`` heads.
    """
    n_cells, n_heads, head_width = q.shape
    n_max = int(segment_ptr.diff().max())
    position = torch.arange(n_cells, device=q.device) - segment_ptr[:-1].index_select(0, segment)
    heads = torch.arange(n_heads, device=q.device)
    # (N H,): row of each (cell, head) in the (T H n_max, d) padded layout
    slot = (((segment * n_heads)[:, None] + heads) * n_max + position[:, None]).reshape(-1)
    n_rows = (segment_ptr.numel() - 1) * n_heads * n_max

    def padded(cells: torch.Tensor) -> torch.Tensor:
        rows = cells.new_zeros(n_rows, head_width).index_copy_(0, slot, cells.reshape(-1, head_width))
        return rows.view(-1, n_max, head_width)

    scores = torch.bmm(padded(q), padded(k).transpose(1, 2))  # (T H, n_max, n_max)
    out = torch.bmm(scores, padded(v)).view(n_rows, head_width)
    return out.index_select(0, slot).view(n_cells, n_heads, head_width)


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
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segment_ptr: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact attention within segments: ``(N, H, d)`` ×3 → ``(N, H, d)`` (written into ``out`` if given)."""

        def attend(q_s, k_s, v_s, dest: torch.Tensor | None) -> torch.Tensor:
            q_s, k_s, v_s = (t.transpose(0, 1)[None] for t in (q_s, k_s, v_s))  # (1, H, n, d)
            heads = F.scaled_dot_product_attention(q_s, k_s, v_s)[0].transpose(0, 1)
            return heads if dest is None else dest.copy_(heads)

        return each_segment(attend, segment_ptr, (q, k, v), out)


ATTENTION_KINDS = {"flow": FlowAttention, "softmax": SoftmaxAttention}
