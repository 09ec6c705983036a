"""GELU that may overwrite its input where no gradient is recorded."""

from __future__ import annotations

import torch
from torch import nn


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` with an ``inplace`` option.

    With ``inplace=True`` and gradients off (``torch.no_grad`` or ``torch.inference_mode``) the
    input is overwritten: no new tensor, so one temporary fewer at the peak of a feed-forward
    block. Where autograd records, a new tensor is returned, as GELU's backward pass needs its
    input.

    Parameters
    ----------
    approximate
        ``"none"`` (exact, erf) or ``"tanh"``.
    inplace
        Overwrite the input when no gradient is recorded.
    """

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__(approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not torch.is_grad_enabled():
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, inplace={self.inplace}"
