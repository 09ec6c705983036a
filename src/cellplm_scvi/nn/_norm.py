"""Group normalisation of per-cell feature vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` computed on CPUs as a layer norm per group for ``(N, C)`` inputs.

    For one feature vector per row (cells, channels), group normalisation is a layer norm over
    each group of ``C / num_groups`` channels followed by the per-channel affine map. Computed
    that way on a CPU it gives the same result (to float rounding) with the same parameters and
    state dict, faster than GroupNorm's CPU kernel, which is written for images with a spatial
    extent (``benchmarks/group_norm.py``). It returns the input's dtype; under autocast it normalises in float32 first. Other
    devices and input shapes use :class:`torch.nn.GroupNorm` itself.

    Parameters
    ----------
    num_groups
        Number of groups (divides ``num_channels``).
    num_channels
        Channels ``C``.
    eps
        Added to the variance.
    affine
        Learn a per-channel scale and shift.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` → ``(N, C)`` (other shapes as :class:`torch.nn.GroupNorm`)."""
        if x.dim() != 2 or x.device.type != "cpu":
            return super().forward(x)
        n_rows, n_channels = x.shape
        if n_channels != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} channels, got input of shape {tuple(x.shape)}.")
        dtype = x.dtype
        if torch.is_autocast_enabled("cpu"):
            x = x.float()
        width = n_channels // self.num_groups
        normalised = F.layer_norm(x.reshape(n_rows, self.num_groups, width), (width,), eps=self.eps)
        normalised = normalised.view(n_rows, n_channels)
        if self.affine:  # without autograd, into the normalised tensor: no second (N, C) tensor
            out = None if torch.is_grad_enabled() else normalised
            normalised = torch.addcmul(self.bias, normalised, self.weight, out=out)
        return normalised.to(dtype)
