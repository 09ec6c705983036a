"""Matching an AnnData's genes to a pre-trained gene list."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData


def align_genes(
    adata: AnnData, gene_list: list[str], gene_id_key: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Match ``adata``'s genes to a pre-trained gene list by Ensembl ID.

    Parameters
    ----------
    adata
        The data.
    gene_list
        The checkpoint's ordered gene IDs (rows of its gene table).
    gene_id_key
        ``adata.var`` column with the Ensembl IDs; ``None`` reads ``adata.var_names``.

    Returns
    -------
    ``(kept, rows)``: positions of the matched genes in ``adata.var`` (ascending) and their rows in
    ``gene_list``.

    Raises
    ------
    ValueError
        When no gene matches, saying why and how to fix it.
    """
    if gene_id_key is not None and gene_id_key not in adata.var:
        raise KeyError(
            f"gene_id_key={gene_id_key!r} is not a column of adata.var; available: {list(adata.var.columns)}."
        )
    ids = (adata.var[gene_id_key] if gene_id_key else adata.var_names.to_series()).astype(str)
    ids = ids.str.split(".").str[0].to_numpy()  # drop Ensembl version suffixes (ENSG... .12)
    rows = pd.Index(gene_list).get_indexer(ids)
    kept = np.flatnonzero(rows >= 0)
    if len(kept) == 0:
        source = f"adata.var[{gene_id_key!r}]" if gene_id_key else "adata.var_names"
        example = ", ".join(ids[:3])
        raise ValueError(
            f"None of the {adata.n_vars} genes in {source} (e.g. {example}) is in the checkpoint's list of "
            f"{len(gene_list)} human Ensembl gene IDs (e.g. {gene_list[0]}). The checkpoint needs human Ensembl "
            "IDs: if your genes are symbols, map them to Ensembl IDs and pass that var column as gene_id_key=...; "
            "for another species, map to human orthologues first."
        )
    duplicated = pd.Index(ids[kept]).duplicated()
    if duplicated.any():
        raise ValueError(
            f"{int(duplicated.sum())} Ensembl IDs occur twice among the matched genes; make them unique."
        )
    if len(kept) < adata.n_vars:
        warnings.warn(
            f"{adata.n_vars - len(kept)} of {adata.n_vars} genes are not in the checkpoint's gene list and are "
            f"left out; {len(kept)} genes are used ({len(kept) / len(gene_list):.1%} of the pre-trained genes).",
            UserWarning,
            stacklevel=3,
        )
    return kept, rows[kept]
