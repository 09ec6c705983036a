"""Pre-norm transformer over the cells of each tissue."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ._activation import GELU
from ._attention import ATTENTION_KINDS, block_rows, row_blocks, visits_in_blocks
from ._dropout import Dropout


class CellTransformerLayer(nn.Module):
    """``x + Attn(LN(x))`` then ``x + FF(LN(x))``, with ``FF = Linear(D, 2D) → GELU → Dropout → Linear(2D, D) → Dropout``.

    Parameters
    ----------
    n_hidden
        Width ``D``.
    n_heads
        Attention heads.
    dropout
        Dropout after the attention and inside the feed-forward block.
    attention
        ``"flow"`` (linear) or ``"softmax"`` (exact).
    """

    def __init__(self, n_hidden: int, n_heads: int, dropout: float, attention: Literal["flow", "softmax"]):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_hidden)
        self.attention = ATTENTION_KINDS[attention](n_hidden, n_heads)
        self.attention_dropout = Dropout(dropout)
        self.norm2 = nn.LayerNorm(n_hidden)
        self.feed_forward = nn.Sequential(
            nn.Linear(n_hidden, 2 * n_hidden),
            GELU(inplace=True),  # in place only without autograd
            Dropout(dropout),
            nn.Linear(2 * n_hidden, n_hidden),
            Dropout(dropout),
        )

        self.block_rows = block_rows(n_hidden)
        """Cells per block where the layer runs in blocks (see :meth:`runs_in_blocks`)."""

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` → ``(N, D)``; attention stays within the segments of ``segment_ptr``."""
        if self.runs_in_blocks(x):
            return self.forward_in_blocks(
                x, segment_ptr, x.new_empty(x.shape[0], 3 * x.shape[1]), torch.empty_like(x)
            )
        heads = self.attention.attend(self.norm1(x), segment_ptr)
        x = add_linear(x, heads, self.attention.out, self.attention_dropout)
        *hidden_layers, out_linear, out_dropout = self.feed_forward
        hidden = self.norm2(x)
        for module in hidden_layers:
            hidden = module(hidden)
        # x is this layer's own tensor now: without autograd the last sum may overwrite it
        return add_linear(x, hidden, out_linear, out_dropout, in_place=not torch.is_grad_enabled())

    def runs_in_blocks(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` visits the cells of ``(N, D)`` ``x`` in blocks of :attr:`block_rows`.

        So it does for more than :attr:`block_rows` cells on a CPU, in evaluation mode, without
        autograd and without autocast: every row-wise step (normalisations, projections,
        feed-forward) then runs block by block, and the attention gathers its per-tissue sums block
        by block, so that no temporary grows with ``N``. The result is the same up to float
        rounding. Elsewhere (GPUs, where no benchmark has measured the blocks) the whole
        minibatch goes at once.
        """
        return (
            x.shape[0] > self.block_rows
            and not self.training
            and visits_in_blocks(x)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def forward_in_blocks(
        self, x: torch.Tensor, segment_ptr: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """The layer without autograd, block by block (see :meth:`runs_in_blocks`).

        Parameters
        ----------
        x
            ``(N, D)`` cell states.
        segment_ptr
            ``(T + 1,)`` cell offsets of the tissues.
        qkv
            ``(N, 3D)`` workspace for the projections; the attention heads overwrite the queries.
        out
            ``(N, D)`` destination of the result; it may be ``x`` itself.

        Returns
        -------
        ``out``.
        """
        width = x.shape[1]
        blocks = row_blocks(x.shape[0], self.block_rows)
        for rows in blocks:
            self.attention.project_into(self.norm1(x[rows]), qkv[rows])
        q, k, v = self.attention.split_heads(qkv)
        self.attention.attend_heads(q, k, v, segment_ptr, out=q)
        heads = qkv[:, :width]
        *hidden_layers, out_linear, out_dropout = self.feed_forward
        for rows in blocks:
            y = out[rows]
            if out is not x:
                y.copy_(x[rows])
            add_linear(y, heads[rows], self.attention.out, self.attention_dropout, in_place=True)
            hidden = self.norm2(y)
            for module in hidden_layers:
                hidden = module(hidden)
            add_linear(y, hidden, out_linear, out_dropout, in_place=True)
        return out


def add_linear(
    residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, dropout: nn.Dropout, in_place: bool = False
) -> torch.Tensor:
    """``residual + dropout(linear(x))`` for ``(N, D_in)`` ``x`` and an ``(N, D_out)`` residual.

    Where the dropout is inactive (evaluation, or rate 0) and no autocast is on, the residual is
    added inside the matrix product (``addmm``): no separate pass over ``(N, D_out)`` for the bias
    copy and the sum, and one temporary fewer. With ``in_place`` (only where no gradient flows
    through ``residual``) the result is written into ``residual``. Under autocast the sum keeps
    ``residual``'s dtype.
    """
    if (dropout.training and dropout.p > 0) or torch.is_autocast_enabled(x.device.type):
        return residual + dropout(linear(x))
    out = residual.addmm_(x, linear.weight.t()) if in_place else torch.addmm(residual, x, linear.weight.t())
    return out if linear.bias is None else out.add_(linear.bias)


class CellEncoder(nn.Module):
    """A stack of :class:`CellTransformerLayer`.

    Parameters
    ----------
    n_hidden
        Width ``D``.
    n_layers
        Number of layers.
    n_heads
        Attention heads.
    dropout
        Dropout rate.
    attention
        ``"flow"`` or ``"softmax"``.
    """

    def __init__(
        self,
        n_hidden: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
        attention: Literal["flow", "softmax"],
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            CellTransformerLayer(n_hidden, n_heads, dropout, attention) for _ in range(n_layers)
        )

    def forward(
        self, x: torch.Tensor, segment_ptr: torch.Tensor, overwrite_input: bool = False
    ) -> torch.Tensor:
        """``(N, D)`` → ``(N, D)``.

        Parameters
        ----------
        x
            ``(N, D)`` cell tokens.
        segment_ptr
            ``(T + 1,)`` cell offsets of the tissues.
        overwrite_input
            Where the layers run in blocks (see :meth:`CellTransformerLayer.runs_in_blocks`),
            write the result into ``x`` itself, whose values are then lost: one ``(N, D)``
            tensor fewer. Elsewhere ``x`` is left alone either way.
        """
        if self.layers and self.layers[0].runs_in_blocks(x):
            # one projection workspace and one output for every layer; each after the first
            # overwrites its input, so that nothing tissue-sized is allocated per layer
            qkv = x.new_empty(x.shape[0], 3 * x.shape[1])
            out = x if overwrite_input else torch.empty_like(x)
            for layer in self.layers:
                x = layer.forward_in_blocks(x, segment_ptr, qkv, out)
            return x
        for layer in self.layers:
            x = layer(x, segment_ptr)
        return x
