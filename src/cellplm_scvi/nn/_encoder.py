"""Pre-norm transformer over the cells of each tissue."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import cpu
from ._attention import ATTENTION_KINDS


class CellTransformerLayer(nn.Module):
    """``x + Dropout(Attn(LN(x)))`` then ``x + FF(LN(x))``, ``FF = Linear(D, 2D) → GELU → Dropout → Linear(2D, D) → Dropout``.

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
        self.attention_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(n_hidden)
        self.feed_forward = nn.Sequential(
            nn.Linear(n_hidden, 2 * n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * n_hidden, n_hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` → ``(N, D)``; attention stays within the segments of ``segment_ptr`` (``(T + 1,)``)."""
        x = x + self.attention_dropout(self.attention(self.norm1(x), segment_ptr))
        return x + self.feed_forward(self.norm2(x))


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

    def forward(self, x: torch.Tensor, segment_ptr: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` cell tokens → ``(N, D)``, with ``(T + 1,)`` tissue offsets ``segment_ptr``."""
        if cpu.encoder_in_blocks_applies(self, x):
            return cpu.encoder_in_blocks(self, x, segment_ptr)
        for layer in self.layers:
            x = layer(x, segment_ptr)
        return x
