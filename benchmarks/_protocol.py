"""Evaluation protocol shared by the benchmark scripts (see the project's evaluation notes).

Embedding → 15-NN graph → Leiden (igraph, 2 iterations) at resolutions 0.1 … 1.5. The headline
ARI / NMI are taken at the *matched* resolution, whose cluster count is closest to the number of
labels (ties → the lower resolution); the best over resolutions is reported beside it, labelled.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

RESOLUTIONS = np.round(np.arange(0.1, 1.51, 0.1), 1)


def leiden_scores(adata, rep: str, label_keys: list[str], seed: int = 0) -> dict:
    """ARI / NMI at the matched and best resolutions, and the silhouette, for each label."""
    work = adata.copy()
    sc.pp.neighbors(work, n_neighbors=15, use_rep=rep, random_state=seed)
    clusterings = {}
    for resolution in RESOLUTIONS:
        sc.tl.leiden(
            work, resolution=resolution, flavor="igraph", n_iterations=2, key_added="_l", random_state=seed
        )
        clusterings[float(resolution)] = work.obs["_l"].to_numpy().copy()
    scores = {}
    for key in label_keys:
        labels = work.obs[key].astype(str).to_numpy()
        n_labels = len(np.unique(labels))
        counts = {r: len(np.unique(c)) for r, c in clusterings.items()}
        matched = min(counts, key=lambda r: (abs(counts[r] - n_labels), r))
        ari = {r: adjusted_rand_score(labels, c) for r, c in clusterings.items()}
        nmi = {r: normalized_mutual_info_score(labels, c) for r, c in clusterings.items()}
        scores[key] = {
            "n_labels": n_labels,
            "matched_resolution": matched,
            "n_clusters_matched": counts[matched],
            "ari_matched": round(ari[matched], 4),
            "nmi_matched": round(nmi[matched], 4),
            "ari_best_over_resolutions": round(max(ari.values()), 4),
            "nmi_best_over_resolutions": round(max(nmi.values()), 4),
            "silhouette": round(float(silhouette_score(work.obsm[rep], labels)), 4),
        }
    return scores


def pca_embedding(adata, layer: str = "counts", n_pcs: int = 50) -> np.ndarray:
    """normalize_total → log1p → (HVG 2,000 if more genes) → PCA."""
    work = adata.copy()
    work.X = work.layers[layer].copy()
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    if work.n_vars > 2000:
        sc.pp.highly_variable_genes(work, n_top_genes=2000, subset=True)
    sc.pp.pca(work, n_comps=min(n_pcs, work.n_vars - 1))
    return work.obsm["X_pca"]


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(path: Path, results: dict, table_rows: list[str]) -> None:
    """JSON of everything plus a markdown table beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text("\n".join(table_rows) + "\n")
    print("\n".join(table_rows))
