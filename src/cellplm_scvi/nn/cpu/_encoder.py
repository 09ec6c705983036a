"""The encoder on a CPU without autograd: every layer visits the cells in row blocks.

Gives :class:`cellplm_scvi.nn.CellEncoder` to float rounding. Every row-wise step
(normalisations, projections, feed-forward) runs block by block and the flow attention gathers
its per-tissue sums block by block, so no temporary grows with the minibatch: one projection
workspace and one output serve every layer. Chosen by ``benchmarks/embedding_speed.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _attention
from ._attention import flow_attention, row_blocks


def encoder_in_blocks(encoder, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
    """``encoder(x, segment_ptr)`` for ``(N, D)`` ``x``, in row blocks (no autograd, evaluation mode)."""
    qkv = x.new_empty(x.shape[0], 3 * x.shape[1])
    out = torch.empty_like(x)
    for layer in encoder.layers:
        x = _layer_in_blocks(
            layer, x, segment_ptr, qkv, out
        )  # every layer after the first overwrites its input
    return x


def _layer_in_blocks(
    layer, x: torch.Tensor, segment_ptr: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """One :class:`~cellplm_scvi.nn.CellTransformerLayer`, writing ``(N, D)`` into ``out`` (which may be ``x``)."""
    attention, width = layer.attention, x.shape[1]
    blocks = row_blocks(x.shape[0], _attention.block_rows(width))
    for rows in blocks:
        torch.addmm(attention.qkv.bias, layer.norm1(x[rows]), attention.qkv.weight.t(), out=qkv[rows])
        if attention.sigmoid_query_key:
            qkv[rows, : 2 * width].sigmoid_()
    q, k, v = (part.view(x.shape[0], attention.n_heads, -1) for part in qkv.chunk(3, dim=1))
    if attention.sigmoid_query_key:
        flow_attention(q, k, v, segment_ptr, attention.eps, out=q)  # the heads overwrite the queries
    else:
        q.copy_(attention.attend_heads(q, k, v, segment_ptr))
    heads = qkv[:, :width]
    first, _, _, second, _ = layer.feed_forward
    for rows in blocks:
        y = out[rows]
        if out is not x:
            y.copy_(x[rows])
        _add_linear_(y, heads[rows], attention.out)
        hidden = F.gelu(first(layer.norm2(y)))
        _add_linear_(y, hidden, second)
    return out


def _add_linear_(residual: torch.Tensor, x: torch.Tensor, linear: torch.nn.Linear) -> None:
    """``residual += linear(x)`` inside the matrix product: no separate pass for the bias and the sum."""
    residual.addmm_(x, linear.weight.t()).add_(linear.bias)
