"""Random masks from 16 bits per entry, and the dropout built on them."""

from __future__ import annotations

import math

import torch
from torch import nn


def bernoulli_mask(shape: tuple[int, ...], rate: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of ``shape``, each entry True with probability ``rate`` (to a multiple of 2^-16).

    Each entry reads 16 bits of a full-range 64-bit draw of torch's generator (seeded as usual):
    on the CPU twice as fast as one ``torch.rand`` float per entry.
    """
    n = math.prod(shape)
    if rate <= 0 or rate >= 1 or n == 0:
        return torch.full(shape, rate >= 1, dtype=torch.bool, device=device)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = min(round(rate * 2**16), 2**16 - 1) - 2**15  # int16 draws are uniform on [-2^15, 2^15)
    return (bits.view(torch.int16)[:n] < threshold).view(shape)


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose CPU masks come from :func:`bernoulli_mask`.

    Zeroes each entry with probability ``p`` (to a multiple of 2^-16) and scales the others by
    ``1 / (1 - p)`` in training; the identity in evaluation. Torch's CPU dropout draws one float
    per entry; on other devices its fused kernel is used. ``inplace`` is not supported.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p == 1:
            return super().forward(x)
        keep = bernoulli_mask(tuple(x.shape), 1.0 - self.p, x.device)
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))
