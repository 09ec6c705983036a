"""Tissue index: which cells form one token set.

A *tissue* is one value of (batch, field of view). A tissue with more cells than the context
limit is cut into *units* of at most that many cells: spatially contiguous tiles when coordinates
exist, fixed pseudo-random chunks otherwise. Units are what the sampler packs and what the
encoder attends over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def stable_cell_keys(obs_names: np.ndarray, seed: int) -> np.ndarray:
    """``(n,)`` uint64 keys from cell names and a seed, independent of the row order."""
    names = np.asarray(obs_names).astype(str).astype(object)
    return pd.util.hash_array(names, hash_key=f"{seed % 10**16:016d}", categorize=False)


def spatial_tiles(coords: np.ndarray, keys: np.ndarray, max_cells: int) -> list[np.ndarray]:
    """Cut cells into spatially contiguous tiles of at most ``max_cells`` cells.

    Recursive bisection (a k-d split): the cell set is divided along its wider axis at the
    quantile that gives each side a whole number of tiles, so every tile is an axis-aligned box
    and tiles have nearly equal sizes.

    Parameters
    ----------
    coords
        ``(n, 2)`` coordinates.
    keys
        ``(n,)`` tie-breaking keys (see :func:`stable_cell_keys`).
    max_cells
        Largest tile.

    Returns
    -------
    Positions (into ``coords``) of the cells of each tile.
    """
    tiles: list[np.ndarray] = []
    stack = [np.arange(len(coords))]
    while stack:
        cells = stack.pop()
        n_parts = -(-len(cells) // max_cells)
        if n_parts <= 1:
            tiles.append(np.sort(cells))
            continue
        points = coords[cells]
        axis = int(np.ptp(points[:, 1]) > np.ptp(points[:, 0]))
        order = np.lexsort((keys[cells], points[:, axis]))
        n_left = round(len(cells) * (n_parts // 2) / n_parts)
        stack += [cells[order[n_left:]], cells[order[:n_left]]]
    return tiles


def random_chunks(keys: np.ndarray, max_cells: int) -> list[np.ndarray]:
    """Cut cells into nearly equal chunks of at most ``max_cells`` cells, in the pseudo-random order of ``keys``."""
    n_parts = max(1, -(-len(keys) // max_cells))
    order = np.argsort(keys, kind="stable")
    return [np.sort(part) for part in np.array_split(order, n_parts)]


@dataclass(frozen=True)
class TissueIndex:
    """Cells grouped into tissues and units (tissues cut to the context limit).

    Attributes
    ----------
    unit_ptr
        ``(U + 1,)`` offsets of each unit in ``unit_cells``.
    unit_cells
        ``(n,)`` obs indices, unit after unit (ascending inside a unit).
    unit_tissue
        ``(U,)`` tissue of each unit.
    cell_tissue
        ``(n_obs,)`` tissue of each cell.
    tissue_origin
        ``(n_tissues, 2)`` lower-left corner of each tissue (zeros without coordinates).
    tissue_scale
        ``(n_tissues,)`` the tissue's wider extent, so that ``(c - origin) / scale`` lies in ``[0, 1]``
        with the aspect ratio kept.
    """

    unit_ptr: np.ndarray
    unit_cells: np.ndarray
    unit_tissue: np.ndarray
    cell_tissue: np.ndarray
    tissue_origin: np.ndarray
    tissue_scale: np.ndarray

    @property
    def n_units(self) -> int:
        """Number of units."""
        return len(self.unit_tissue)

    @property
    def unit_sizes(self) -> np.ndarray:
        """``(U,)`` cells per unit."""
        return np.diff(self.unit_ptr)

    def unit(self, u: int) -> np.ndarray:
        """Obs indices of unit ``u``."""
        return self.unit_cells[self.unit_ptr[u] : self.unit_ptr[u + 1]]

    def restrict(self, cells: np.ndarray) -> TissueIndex:
        """The same units, keeping only ``cells``; units left empty are dropped."""
        keep = np.zeros(len(self.cell_tissue), dtype=bool)
        keep[np.asarray(cells, dtype=np.int64)] = True
        kept = keep[self.unit_cells]
        sizes = (
            np.add.reduceat(kept.astype(np.int64), self.unit_ptr[:-1])
            if self.n_units
            else np.zeros(0, np.int64)
        )
        nonempty = sizes > 0
        return TissueIndex(
            unit_ptr=np.concatenate([[0], np.cumsum(sizes[nonempty])]).astype(np.int64),
            unit_cells=self.unit_cells[kept],
            unit_tissue=self.unit_tissue[nonempty],
            cell_tissue=self.cell_tissue,
            tissue_origin=self.tissue_origin,
            tissue_scale=self.tissue_scale,
        )

    def units_containing(self, cells: np.ndarray) -> np.ndarray:
        """Ids of the units that hold any of ``cells``."""
        unit_of_cell = np.empty(len(self.cell_tissue), dtype=np.int64)
        unit_of_cell[:] = -1
        unit_of_cell[self.unit_cells] = np.repeat(np.arange(self.n_units), self.unit_sizes)
        found = unit_of_cell[np.asarray(cells, dtype=np.int64)]
        if (found < 0).any():
            raise IndexError("Some requested cells are not part of this tissue index.")
        return np.unique(found)

    def cells_of_units(self, units: np.ndarray) -> np.ndarray:
        """Obs indices of the given units, concatenated."""
        if len(units) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.unit(u) for u in units])


def build_tissue_index(
    tissue_codes: np.ndarray,
    obs_names: np.ndarray,
    coords: np.ndarray | None,
    max_cells_per_context: int,
    seed: int = 0,
) -> TissueIndex:
    """Group cells into tissues and cut large tissues into units.

    Parameters
    ----------
    tissue_codes
        ``(n_obs,)`` integer tissue of each cell (codes ``0 .. n_tissues - 1``).
    obs_names
        ``(n_obs,)`` cell names; chunks and tie-breaks depend on names, not on row order.
    coords
        ``(n_obs, 2)`` coordinates, or ``None`` for non-spatial data.
    max_cells_per_context
        Context limit: the largest unit.
    seed
        Seed of the pseudo-random chunking.

    Returns
    -------
    The index, with units ordered by tissue.
    """
    if max_cells_per_context < 1:
        raise ValueError(
            f"max_cells_per_context must be a positive number of cells, got {max_cells_per_context}."
        )
    tissue_codes = np.asarray(tissue_codes, dtype=np.int64)
    n_tissues = int(tissue_codes.max()) + 1 if len(tissue_codes) else 0
    obs_names = np.asarray(obs_names)
    order = np.argsort(tissue_codes, kind="stable")
    bounds = np.searchsorted(tissue_codes[order], np.arange(n_tissues + 1))
    origin = np.zeros((n_tissues, 2))
    scale = np.ones(n_tissues)
    units, unit_tissue = [], []
    for t in range(n_tissues):
        cells = order[bounds[t] : bounds[t + 1]]
        if len(cells) == 0:
            continue
        if coords is not None:
            points = coords[cells]
            origin[t] = points.min(0)
            extent = float(np.ptp(points, axis=0).max())
            scale[t] = extent if extent > 0 else 1.0
        if len(cells) <= max_cells_per_context:
            parts = [np.arange(len(cells))]  # one unit: no cut, so no keys to hash
        elif coords is not None:
            parts = spatial_tiles(points, stable_cell_keys(obs_names[cells], seed), max_cells_per_context)
        else:
            parts = random_chunks(stable_cell_keys(obs_names[cells], seed), max_cells_per_context)
        units += [cells[p] for p in parts]
        unit_tissue += [t] * len(parts)
    sizes = np.array([len(u) for u in units], dtype=np.int64)
    return TissueIndex(
        unit_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        unit_cells=np.concatenate(units).astype(np.int64) if units else np.zeros(0, np.int64),
        unit_tissue=np.asarray(unit_tissue, dtype=np.int64),
        cell_tissue=tissue_codes,
        tissue_origin=origin,
        tissue_scale=scale,
    )
