"""Checks of user input that stop early with one clear message."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellplm_scvi._constants import VALUES_PER_PASS


def check_anndata(adata: AnnData) -> None:
    """Refuse empty data, views and duplicated gene names; warn about duplicated cell names."""
    check_anndata_not_empty(adata)
    if adata.is_view:
        raise ValueError(
            "adata is a view of another AnnData; setup writes registry columns into it. Run "
            "adata = adata.copy() first."
        )
    if adata.var_names.has_duplicates:
        duplicated = adata.var_names[adata.var_names.duplicated()].unique()
        raise ValueError(
            f"{len(duplicated)} gene names occur more than once (e.g. {list(duplicated[:3])}); gene-level outputs "
            "would be ambiguous. Run adata.var_names_make_unique() or drop the duplicates."
        )
    if adata.obs_names.has_duplicates:
        warnings.warn(
            "Cell names (adata.obs_names) are not unique; outputs indexed by cell name will repeat names. "
            "Consider adata.obs_names_make_unique().",
            UserWarning,
            stacklevel=3,
        )


def check_anndata_not_empty(adata) -> None:
    """Refuse an AnnData (or MuData) with no cells."""
    if adata.n_obs == 0:
        raise ValueError("adata has 0 cells; check the filtering that produced it.")


def check_genes(genes: pd.Index, model_genes: Sequence[str], model_genes_are_in: str) -> None:
    """Refuse data whose genes are not exactly the model's genes in the model's order.

    Parameters
    ----------
    genes
        Gene names of the data.
    model_genes
        Gene names the model was trained on, in its order.
    model_genes_are_in
        Python expression that gives ``model_genes``, for the message.
    """
    model_genes = pd.Index(model_genes)
    if genes.equals(model_genes):
        return
    if genes.has_duplicates:
        duplicated = genes[genes.duplicated()].unique()
        raise ValueError(
            f"{len(duplicated)} gene names occur more than once (e.g. {list(duplicated[:3])}); genes are "
            "matched to the model's by name. Drop the duplicates."
        )
    missing = model_genes.difference(genes, sort=False)
    extra = genes.difference(model_genes, sort=False)
    fix = f"adata = adata[:, model_genes].copy(), with model_genes = {model_genes_are_in}"
    if len(missing):
        raise ValueError(
            f"{len(missing)} of the model's {len(model_genes)} genes are not in the data (e.g. "
            f"{list(missing[:5])}); the model embeds only data that measures all of its genes. Train a "
            "model on the genes you have."
        )
    if len(extra):
        raise ValueError(
            f"The data has {len(extra)} genes that the model was not trained on (e.g. {list(extra[:5])}). "
            f"Keep the model's genes, in its order: {fix}."
        )
    first = int(np.flatnonzero(genes.to_numpy() != model_genes.to_numpy())[0])
    raise ValueError(
        f"The data has the model's {len(model_genes)} genes in another order (from position {first}: "
        f"{genes[first]!r} where the model has {model_genes[first]!r}); embeddings would be computed on "
        f"misaligned genes. Reorder them to the model's: {fix}."
    )


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise ``KeyError`` naming ``argument`` when ``key`` is not an ``obs`` column; ``ValueError`` on missing values."""
    if key is None:
        return
    if key not in adata.obs:
        raise KeyError(
            f"{argument}={key!r} is not a column of adata.obs; available: {list(adata.obs.columns)}."
        )
    if adata.obs[key].isna().any():
        n = int(adata.obs[key].isna().sum())
        raise ValueError(
            f"{argument}={key!r} has {n} missing values; fill them (e.g. with 'unknown') before setup."
        )


def check_layer(adata: AnnData, layer: str | None) -> None:
    """Raise ``KeyError`` when ``layer`` is not in ``adata.layers``."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers; available: {list(adata.layers.keys())}.")


def check_spatial(adata: AnnData, spatial_key: str | None) -> None:
    """Check that ``adata.obsm[spatial_key]`` holds finite numeric ``(n_obs, 2+)`` coordinates."""
    if spatial_key is None:
        return
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"spatial_key={spatial_key!r} is not in adata.obsm; available: {list(adata.obsm.keys())}."
        )
    coords = adata.obsm[spatial_key]
    coords = coords.to_numpy() if hasattr(coords, "to_numpy") else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must have shape (n_obs, 2) with x and y; got {coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number):
        raise ValueError(f"adata.obsm[{spatial_key!r}] must be numeric; got dtype {coords.dtype}.")
    bad = ~np.isfinite(coords[:, :2]).all(1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] has NaN or infinite coordinates for {int(bad.sum())} cells "
            f"(first: {adata.obs_names[bad][0]!r}); drop those cells or fill their positions."
        )


def check_counts(matrix, where: str, chunk: int = 10_000) -> bool:
    """Reject negative / NaN / infinite values; return whether all values are integers.

    Reads the stored values of an in-memory sparse matrix in stretches of
    :data:`~cellplm_scvi._constants.VALUES_PER_PASS`
    (each checked while it is in cache), other matrices (dense or backed) in chunks of ``chunk``
    rows.
    """
    integer = True
    if sp.issparse(matrix):
        stored = matrix.data
        blocks = (stored[start : start + VALUES_PER_PASS] for start in range(0, len(stored), VALUES_PER_PASS))
    else:
        blocks = (matrix[start : start + chunk] for start in range(0, matrix.shape[0], chunk))
    for block in blocks:
        values = block.data if sp.issparse(block) else np.asarray(block)
        low, high = values.min(initial=0), values.max(initial=0)  # NaN propagates to both
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"{where} contains NaN or infinite values; CellPLM needs finite raw counts.")
        if low < 0:
            raise ValueError(
                f"{where} contains negative values; CellPLM needs raw counts. "
                "Pass the counts with layer=... (e.g. layer='counts')."
            )
        integer = integer and bool(np.array_equal(values, np.rint(values)))
    return integer
