"""Small datasets that ship with the package (no download, no files outside the package).

Two datasets cover the two kinds of input CellPLM handles:

* :func:`pbmc68k_counts` -- 700 dissociated PBMCs (scRNA-seq, no coordinates), the integer counts
  recovered from :func:`scanpy.datasets.pbmc68k_reduced`, which ships inside scanpy.
* :func:`synthetic_spatial_tissue` -- a seeded, multi-FOV spatial tissue with known cell types and
  niches, where a cell's spatial context carries information beyond its own type.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = ["pbmc68k_counts", "synthetic_spatial_tissue"]

_PBMC_TARGET_SUM = 1e4
_FOV_SIDE_UM = 1000.0
_FOV_SPACING_UM = 1500.0
_MEDIAN_LIBRARY = 100.0


def pbmc68k_counts() -> ad.AnnData:
    """Integer counts of the 700 PBMCs of :func:`scanpy.datasets.pbmc68k_reduced`.

    ``pbmc68k_reduced().raw`` holds ``log1p(counts / n_counts * 1e4)`` for 765 genes, stored with
    three decimals. The counts are recovered as ``round(expm1(raw.X) * obs.n_counts / 1e4)``.
    Before rounding the values are within 0.1 % (relative) of an integer, so the rounding is exact.
    ``obs.n_counts`` is the library size over *all* genes of the original experiment, so the row
    sums here (765 genes only) are roughly 11--28 % of it.

    Returns
    -------
    anndata.AnnData
        ``n_obs x n_vars = 700 x 765``.

        * ``X`` and ``layers["counts"]``: the counts, ``scipy.sparse.csr_matrix`` of ``float32``
          holding integers, shape ``(700, 765)`` (two separate copies).
        * ``obs["bulk_labels"]`` (10 categories), ``obs["louvain"]`` (11 categories),
          ``obs["n_counts"]`` (the original library size, float) and ``obs["sample"]``
          (one category, ``"pbmc68k"``).
        * ``var_names``: the gene symbols of ``raw``.
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    counts = _pbmc_counts_before_rounding(reduced)
    counts = np.rint(counts).astype(np.float32)
    matrix = sparse.csr_matrix(counts)
    matrix.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "bulk_labels": reduced.obs["bulk_labels"].astype("category"),
            "louvain": reduced.obs["louvain"].astype("category"),
            "n_counts": reduced.obs["n_counts"].to_numpy(dtype=np.float64),
            "sample": pd.Categorical(["pbmc68k"] * reduced.n_obs),
        },
        index=reduced.obs_names.copy(),
    )
    var = pd.DataFrame(index=reduced.raw.var_names.copy())
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.layers["counts"] = matrix.copy()
    return adata


def _pbmc_counts_before_rounding(reduced: ad.AnnData) -> np.ndarray:
    """Undo the ``log1p(normalize_total(1e4))`` of ``pbmc68k_reduced().raw``.

    Parameters
    ----------
    reduced
        The AnnData returned by :func:`scanpy.datasets.pbmc68k_reduced`.

    Returns
    -------
    numpy.ndarray
        ``(n_obs, n_raw_vars)`` float64, close to integers but not rounded.
    """
    log_norm = reduced.raw.X
    log_norm = log_norm.toarray() if sparse.issparse(log_norm) else np.asarray(log_norm)
    library = reduced.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    return np.expm1(log_norm.astype(np.float64)) * library / _PBMC_TARGET_SUM


def synthetic_spatial_tissue(
    n_fovs: int = 4,
    cells_per_fov: int = 500,
    n_genes: int = 200,
    n_cell_types: int = 6,
    n_niches: int = 3,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate a spatial tissue imaged in several fields of view (FOVs).

    The generative story, all drawn from one ``numpy.random.Generator`` seeded with ``seed``:

    1. **Niches.** Each FOV is a 1,000 x 1,000 square (micrometre-like units). It holds
       ``2 * n_niches`` niche centres, each labelled with a niche (every niche at least once per
       FOV); a cell belongs to the niche of its nearest centre (a Voronoi partition).
    2. **Cell types.** Each niche has its own cell-type composition (a Dirichlet draw with
       concentration 0.5, so niches differ clearly); a cell's type is drawn from its niche's
       composition.
    3. **Expression.** Gene ``g`` has a baseline log-rate. Each cell type up-regulates its own
       block of ``n_genes // (2 * n_cell_types)`` marker genes (log fold change 1--2); each niche
       up-regulates a smaller block of ``n_genes // (6 * n_niches)`` niche genes (log fold change
       0.5--0.9). The niche genes are expressed by every cell type in that niche, weakly enough
       that a single cell's niche is uncertain from its own counts but clear from its
       neighbours': spatial context is informative beyond the cell's own type.
    4. **Counts.** Library sizes are log-normal (median 100, log-sd 0.5); the counts are negative
       binomial (a Poisson-Gamma mixture) with a gene-wise inverse dispersion between 2 and 10.
       With the defaults about 70 % of the entries are zero.

    Parameters
    ----------
    n_fovs
        Number of fields of view, each with its own coordinate offset.
    cells_per_fov
        Number of cells per FOV; the tissue has ``n_fovs * cells_per_fov`` cells.
    n_genes
        Number of genes. Must be at least ``2 * (n_cell_types + n_niches)`` so that every program
        has genes of its own.
    n_cell_types
        Number of cell types (at least 2).
    n_niches
        Number of spatial niches (at least 2).
    seed
        Seed of the random generator; the same arguments give an identical AnnData.

    Returns
    -------
    anndata.AnnData
        ``n_obs x n_vars = (n_fovs * cells_per_fov) x n_genes``.

        * ``X`` and ``layers["counts"]``: integer counts, ``scipy.sparse.csr_matrix`` of
          ``float32``, shape ``(n_obs, n_genes)`` (two separate copies).
        * ``obs["fov"]`` (``"fov0"``, ...), ``obs["sample"]`` (one category), ``obs["cell_type"]``
          (``"type0"``, ...), ``obs["niche"]`` (``"niche0"``, ...): categoricals.
        * ``obsm["spatial"]``: ``(n_obs, 2)`` float64 coordinates in micrometres; FOV ``i`` is
          offset by a different amount, so FOVs never overlap.
        * ``var["program"]``: which program a gene belongs to (``"type3"``, ``"niche1"`` or
          ``"background"``).
        * ``uns["synthetic_tissue"]``: the arguments and the niche-by-type composition matrix,
          ``(n_niches, n_cell_types)``.

    Raises
    ------
    ValueError
        If a size argument is too small.
    """
    _check_sizes(n_fovs, cells_per_fov, n_genes, n_cell_types, n_niches)
    rng = np.random.default_rng(seed)
    programs = _gene_programs(rng, n_genes, n_cell_types, n_niches)
    composition = rng.dirichlet(np.full(n_cell_types, 0.5), size=n_niches)

    coords, fov, niche = _layout(rng, n_fovs, cells_per_fov, n_niches)
    cell_type = _draw_cell_types(rng, composition, niche)
    log_rate = programs["baseline"] + programs["type_effect"][cell_type] + programs["niche_effect"][niche]
    counts = _negative_binomial_counts(rng, log_rate, programs["inverse_dispersion"])

    return _assemble_tissue(
        counts=counts,
        coords=coords,
        fov=fov,
        cell_type=cell_type,
        niche=niche,
        program_names=programs["names"],
        n_fovs=n_fovs,
        n_cell_types=n_cell_types,
        n_niches=n_niches,
        uns={
            "n_fovs": n_fovs,
            "cells_per_fov": cells_per_fov,
            "n_genes": n_genes,
            "n_cell_types": n_cell_types,
            "n_niches": n_niches,
            "seed": seed,
            "niche_type_composition": composition,
        },
    )


def _check_sizes(n_fovs: int, cells_per_fov: int, n_genes: int, n_cell_types: int, n_niches: int) -> None:
    """Raise ``ValueError`` for sizes the generator cannot honour."""
    if n_fovs < 1 or cells_per_fov < 1:
        raise ValueError(f"need n_fovs >= 1 and cells_per_fov >= 1, got {n_fovs} and {cells_per_fov}")
    if n_cell_types < 2 or n_niches < 2:
        raise ValueError(f"need n_cell_types >= 2 and n_niches >= 2, got {n_cell_types} and {n_niches}")
    if n_genes < 2 * (n_cell_types + n_niches):
        raise ValueError(
            f"n_genes={n_genes} is too small: need at least 2 * (n_cell_types + n_niches) = "
            f"{2 * (n_cell_types + n_niches)}"
        )


def _gene_programs(rng: np.random.Generator, n_genes: int, n_cell_types: int, n_niches: int) -> dict:
    """Draw the baseline, the cell-type and niche programs and the dispersions.

    Returns
    -------
    dict
        ``baseline`` ``(G,)`` log relative rate; ``type_effect`` ``(n_cell_types, G)`` and
        ``niche_effect`` ``(n_niches, G)`` additive log effects; ``inverse_dispersion`` ``(G,)``;
        ``names`` ``(G,)`` the program each gene belongs to.
    """
    order = rng.permutation(n_genes)
    per_type = max(2, n_genes // (2 * n_cell_types))
    per_niche = max(2, n_genes // (6 * n_niches))
    baseline = rng.normal(-1.0, 1.0, size=n_genes)
    type_effect = np.zeros((n_cell_types, n_genes))
    niche_effect = np.zeros((n_niches, n_genes))
    names = np.full(n_genes, "background", dtype=object)
    start = 0
    for t in range(n_cell_types):
        genes = order[start : start + per_type]
        type_effect[t, genes] = rng.uniform(1.0, 2.0, size=genes.size)
        names[genes] = f"type{t}"
        start += per_type
    for n in range(n_niches):
        genes = order[start : start + per_niche]
        niche_effect[n, genes] = rng.uniform(0.5, 0.9, size=genes.size)
        names[genes] = f"niche{n}"
        start += per_niche
    inverse_dispersion = rng.uniform(2.0, 10.0, size=n_genes)
    return {
        "baseline": baseline,
        "type_effect": type_effect,
        "niche_effect": niche_effect,
        "inverse_dispersion": inverse_dispersion,
        "names": names,
    }


def _layout(
    rng: np.random.Generator, n_fovs: int, cells_per_fov: int, n_niches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place cells in FOVs and assign each to the niche of its nearest niche centre.

    Returns
    -------
    tuple of numpy.ndarray
        ``coords`` ``(N, 2)`` float64 in micrometres (with the FOV offset), ``fov`` ``(N,)`` int and
        ``niche`` ``(N,)`` int, where ``N = n_fovs * cells_per_fov``.
    """
    coords, fovs, niches = [], [], []
    for f in range(n_fovs):
        local = rng.uniform(0.0, _FOV_SIDE_UM, size=(cells_per_fov, 2))
        centres = rng.uniform(0.0, _FOV_SIDE_UM, size=(2 * n_niches, 2))
        centre_niche = rng.permutation(np.tile(np.arange(n_niches), 2))
        dist = ((local[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        niches.append(centre_niche[dist.argmin(1)])
        offset = np.array([f * _FOV_SPACING_UM, (f % 2) * 0.5 * _FOV_SPACING_UM]) + rng.uniform(0, 100, 2)
        coords.append(local + offset)
        fovs.append(np.full(cells_per_fov, f))
    return np.concatenate(coords), np.concatenate(fovs), np.concatenate(niches)


def _draw_cell_types(rng: np.random.Generator, composition: np.ndarray, niche: np.ndarray) -> np.ndarray:
    """Draw each cell's type from its niche's composition.

    Parameters
    ----------
    composition
        ``(n_niches, n_cell_types)``, rows sum to one.
    niche
        ``(N,)`` niche index of each cell.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int cell-type index.
    """
    cumulative = np.cumsum(composition, axis=1)[niche]
    u = rng.uniform(size=(niche.size, 1))
    return np.minimum((u > cumulative).sum(1), composition.shape[1] - 1)


def _negative_binomial_counts(
    rng: np.random.Generator, log_rate: np.ndarray, inverse_dispersion: np.ndarray
) -> np.ndarray:
    """Draw negative binomial counts as a Poisson-Gamma mixture.

    Parameters
    ----------
    log_rate
        ``(N, G)`` unnormalised log expression rates; each row is normalised to proportions.
    inverse_dispersion
        ``(G,)`` the Gamma shape ``theta``; the variance is ``mu + mu**2 / theta``.

    Returns
    -------
    numpy.ndarray
        ``(N, G)`` float32 integer counts.
    """
    proportions = np.exp(log_rate - log_rate.max(1, keepdims=True))
    proportions /= proportions.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(_MEDIAN_LIBRARY), 0.5, size=(log_rate.shape[0], 1)))
    mean = library * proportions
    rate = rng.gamma(shape=inverse_dispersion, scale=mean / inverse_dispersion)
    return rng.poisson(rate).astype(np.float32)


def _assemble_tissue(
    *,
    counts: np.ndarray,
    coords: np.ndarray,
    fov: np.ndarray,
    cell_type: np.ndarray,
    niche: np.ndarray,
    program_names: np.ndarray,
    n_fovs: int,
    n_cell_types: int,
    n_niches: int,
    uns: dict,
) -> ad.AnnData:
    """Wrap the simulated arrays into an AnnData (see :func:`synthetic_spatial_tissue`)."""
    n_obs, n_genes = counts.shape
    obs = pd.DataFrame(
        {
            "fov": _categorical("fov", fov, n_fovs),
            "sample": pd.Categorical(["synthetic_tissue"] * n_obs),
            "cell_type": _categorical("type", cell_type, n_cell_types),
            "niche": _categorical("niche", niche, n_niches),
        },
        index=[f"fov{f}_cell{i}" for f, i in zip(fov, _rank_within(fov), strict=True)],
    )
    var = pd.DataFrame({"program": pd.Categorical(program_names.astype(str))})
    var.index = [f"gene{g:03d}" for g in range(n_genes)]
    matrix = sparse.csr_matrix(counts)
    matrix.eliminate_zeros()
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.layers["counts"] = matrix.copy()
    adata.obsm["spatial"] = coords.astype(np.float64)
    adata.uns["synthetic_tissue"] = uns
    return adata


def _categorical(prefix: str, codes: np.ndarray, n: int) -> pd.Categorical:
    """Turn integer codes into a categorical ``prefix0, prefix1, ...`` with all ``n`` categories."""
    return pd.Categorical.from_codes(codes, categories=[f"{prefix}{i}" for i in range(n)])


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """Position of each element among the elements of its group, in order of appearance."""
    rank = np.empty(groups.size, dtype=np.int64)
    for g in np.unique(groups):
        where = np.flatnonzero(groups == g)
        rank[where] = np.arange(where.size)
    return rank
