"""Flow attention on a CPU: tissue by tissue in row blocks, or packed tissues at once.

Gives :meth:`cellplm_scvi.nn.FlowAttention.attend_heads` to float rounding. Chosen by
``benchmarks/attention_packing.py`` (4,000 cells in equal tissues of 4 to 1,000 cells, 2 CPU
threads): tissues from :func:`loop_threshold` cells on go one by one, smaller ones together,
and tissues of a few cells contract through their padded ``n × n`` scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cellplm_scvi.nn._segments import segment_ids, segment_sum

SQUARE_BELOW_CELLS_PER_TISSUE = 32
"""Mean tissue size below which packed tissues contract through their scores (:func:`padded_square_attention`)."""


def loop_threshold(n_hidden: int) -> int:
    """Mean tissue size from which tissues are attended one by one: ``32768 / D``, at least 64."""
    return max(64, 32_768 // n_hidden)


def block_rows(n_hidden: int) -> int:
    """Rows per block where a large minibatch goes in blocks: ``2**20 / D``, at least 256.

    A block's widest temporary (the ``(rows, 3D)`` projections) then takes 12 MiB in float32,
    whatever the width: it stays in cache and its memory is reused from block to block.
    """
    return max(256, (1 << 20) // n_hidden)


def row_blocks(n_rows: int, rows_per_block: int) -> list[slice]:
    """Consecutive slices of at most ``rows_per_block`` rows covering ``range(n_rows)`` (one if empty)."""
    return [
        slice(start, min(start + rows_per_block, n_rows))
        for start in range(0, max(n_rows, 1), rows_per_block)
    ]


def each_segment(
    attend: Callable[..., torch.Tensor],
    segment_ptr: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attend(*pieces, dest)`` segment by segment, stacked to ``(N, ...)``.

    Without autograd each segment writes into its rows of ``out`` (``dest``); with autograd
    ``dest`` is None and the results are concatenated (one ``split``, one ``cat``: per-segment
    slice assignments would each cost the backward pass a whole-minibatch gradient).
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


def flow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ptr: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow attention within segments: ``(N, H, d)`` ×3 → ``(N, H, d)``, written into ``out`` if given.

    ``out`` (only without autograd) may be ``q`` itself, whose rows are read before they are
    overwritten.
    """
    n_cells, n_heads, head_width = q.shape
    n_segments, n_hidden = segment_ptr.numel() - 1, n_heads * head_width
    rows = block_rows(n_hidden)
    if n_segments == 1:
        return _one_tissue(q, k, v, eps, rows, out)
    if n_cells < loop_threshold(n_hidden) * n_segments:
        return _packed(q, k, v, segment_ptr, eps, out)

    def attend(q_t, k_t, v_t, dest):
        return _one_tissue(q_t, k_t, v_t, eps, rows, dest)

    return each_segment(attend, segment_ptr, (q, k, v), out)


def _one_tissue(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    rows_per_block: int,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Flow attention among the ``n`` cells of one tissue: ``(n, H, d)`` ×3 → ``(n, H, d)``.

    Every ``<a_i + eps, s + eps>`` is taken as ``<a_i, s + eps> + eps * sum(s + eps)``, so that
    no ``(n, H, d)`` temporary is made for it; per-head products with an ``(H, d)`` summary run
    as one matrix product over all heads through a block-diagonal ``(D, H)`` matrix. Without
    autograd the cells are visited in blocks of ``rows_per_block`` (three passes gather the
    sums, a fourth writes each block's heads into ``out``), so that no temporary grows with the
    tissue.
    """
    n, n_heads, head_width = q.shape
    eye = torch.eye(n_heads, dtype=q.dtype, device=q.device)

    def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """``<cells_i + eps, summary>`` per head: ``(m, H, d)`` cells, ``(H, d)`` summary → ``(m, H)``."""
        block_diagonal = (summary[:, :, None] * eye[:, None, :]).reshape(-1, n_heads)  # (D, H)
        return torch.mm(cells.reshape(cells.shape[0], -1), block_diagonal) + eps * summary.sum(-1)

    def weighted_sum(cells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_i weights_ih cells_ih``: ``(m, H, d)`` cells, ``(m, H)`` weights → ``(H, d)``."""
        all_pairs = torch.mm(cells.reshape(cells.shape[0], -1).t(), weights)  # (D, H)
        return all_pairs.view(n_heads, head_width, n_heads).diagonal(dim1=0, dim2=2).t()

    grad = torch.is_grad_enabled()
    blocks = [slice(0, n)] if grad else row_blocks(n, rows_per_block)
    key_sum, query_sum = k.sum(0) + eps, q.sum(0) + eps
    incoming = [1.0 / dot(q[b], key_sum) for b in blocks]
    key_flow = sum(weighted_sum(k[b], 1.0 / dot(k[b], query_sum)) for b in blocks) + eps
    query_flow = sum(weighted_sum(q[b], i) for b, i in zip(blocks, incoming, strict=True)) + eps
    # the clamp to [-1, 1] bounds exp(), so the softmax over cells needs no max subtraction
    source_total, context = 0.0, 0.0
    for b in blocks:
        source = dot(k[b], query_flow).clamp(-1.0, 1.0).exp()
        source_total = source_total + source.sum(0)
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
        torch.mul(*scaled_heads(b, incoming_b), out=out[b])  # straight into a cell-major tensor
    return out


def _packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ptr: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Flow attention for all tissues at once: ``(N, H, d)`` ×3 → ``(N, H, d)``.

    Per-tissue sums are gathered back to the cells only inside the per-cell products, which sum
    each head's columns with one matrix product. The final contraction runs tissue by tissue, or,
    for tissues of a few cells of similar sizes, for all at once through their ``n × n`` scores.
    """
    n_cells, n_heads, head_width = q.shape
    n_segments = segment_ptr.numel() - 1
    segment = segment_ids(segment_ptr, n_cells)
    head_of_column = torch.eye(n_heads, dtype=q.dtype, device=q.device).repeat_interleave(head_width, 0)

    def tissue_sum(values: torch.Tensor) -> torch.Tensor:
        return segment_sum(values, segment, n_segments)

    def dot(cells: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """``<cells_i + eps, summary_t(i)>`` per head: ``(N, H, d)``, ``(T, H, d)`` → ``(N, H)``."""
        own = summary.reshape(n_segments, -1).index_select(0, segment)  # (N, D)
        offset = eps * summary.sum(-1).index_select(0, segment)  # (N, H)
        return torch.addmm(offset, cells.reshape(n_cells, -1) * own, head_of_column)

    incoming = 1.0 / dot(q, tissue_sum(k) + eps)
    outgoing = 1.0 / dot(k, tissue_sum(q) + eps)
    allocation = torch.sigmoid(dot(q, tissue_sum(k * outgoing[..., None]) + eps))
    source = dot(k, tissue_sum(q * incoming[..., None]) + eps).clamp(-1.0, 1.0).exp()
    competition_scale = segment_ptr.diff().to(source.dtype)[:, None] / tissue_sum(source)  # (T, H)
    q = q * (incoming * allocation)[..., None]
    v = v * (source * competition_scale.index_select(0, segment))[..., None]
    if contracts_through_scores(segment_ptr):
        heads = padded_square_attention(q, k, v, segment_ptr, segment)
        return heads if out is None else out.copy_(heads)

    def contract(q_s, k_s, v_s, dest: torch.Tensor | None) -> torch.Tensor:
        q_s, k_s, v_s = (t.transpose(0, 1) for t in (q_s, k_s, v_s))  # (H, n, d)
        heads = torch.bmm(q_s, torch.bmm(k_s.transpose(1, 2), v_s)).transpose(0, 1)
        return heads if dest is None else dest.copy_(heads)

    return each_segment(contract, segment_ptr, (q, k, v), out)


def contracts_through_scores(segment_ptr: torch.Tensor) -> bool:
    """Whether packed tissues end with :func:`padded_square_attention`.

    So they do where tissues hold fewer than :data:`SQUARE_BELOW_CELLS_PER_TISSUE` cells on
    average and padding every tissue to the largest at most doubles the rows.
    """
    lengths = segment_ptr.diff()
    n_cells, n_segments = int(lengths.sum()), lengths.numel()
    return (
        n_cells < SQUARE_BELOW_CELLS_PER_TISSUE * n_segments
        and int(lengths.max()) * n_segments <= 2 * n_cells
    )


def padded_square_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ptr: torch.Tensor, segment: torch.Tensor
) -> torch.Tensor:
    """``sum_j <q_i, k_j> v_j`` over the cells ``j`` of each cell's tissue, per head, for all tissues at once.

    Every (tissue, head) pair becomes one zero-padded ``(n_max, d)`` matrix of a ``(T H, n_max, d)``
    batch and the result is ``(Q K^T) V`` in two batched products, with no Python loop over
    tissues. Padded keys and values are zero, so they add nothing.

    Parameters
    ----------
    q, k, v
        ``(N, H, d)`` queries, keys and values.
    segment_ptr
        ``(T + 1,)`` cell offsets of the tissues.
    segment
        ``(N,)`` tissue of each cell.

    Returns
    -------
    ``(N, H, d)`` heads.
    """
    n_cells, n_heads, head_width = q.shape
    n_max = int(segment_ptr.diff().max())
    position = torch.arange(n_cells, device=q.device) - segment_ptr[:-1].index_select(0, segment)
    heads = torch.arange(n_heads, device=q.device)
    slot = (((segment * n_heads)[:, None] + heads) * n_max + position[:, None]).reshape(-1)  # (N H,)
    n_rows = (segment_ptr.numel() - 1) * n_heads * n_max

    def padded(cells: torch.Tensor) -> torch.Tensor:
        rows = cells.new_zeros(n_rows, head_width).index_copy_(0, slot, cells.reshape(-1, head_width))
        return rows.view(-1, n_max, head_width)

    scores = torch.bmm(padded(q), padded(k).transpose(1, 2))  # (T H, n_max, n_max)
    out = torch.bmm(scores, padded(v)).view(n_rows, head_width)
    return out.index_select(0, slot).view(n_cells, n_heads, head_width)
