"""The project's protocol for scoring cell embeddings, and the baselines it is compared with.

Every embedding-quality figure of the project (the ``cellplm-scvi demo`` command, the benchmarks
and the tutorials) is measured with these functions, so that numbers from different places compare:

1. The 15-nearest-neighbour graph of the embedding (``sc.pp.neighbors``), then Leiden (igraph
   flavour, 2 iterations) at each resolution of :data:`RESOLUTIONS` (0.1, 0.2, ..., 1.5):
   :func:`leiden_sweep`.
2. ARI and NMI of the clustering at the *matched resolution*, the one whose number of clusters is
   closest to the number of true labels (ties go to the lower resolution): :func:`matched_resolution`,
   :func:`score_sweep`. This is the figure to report first. The best ARI / NMI over all resolutions
   is reported beside it, in columns named ``*_best_over_resolutions``; it flatters every method.
3. The silhouette of the true labels on the embedding (scikit-learn, Euclidean): :func:`silhouette`.

:func:`score_embeddings` does all three for several embeddings and label columns of the same cells
and returns one table. The baselines of the same run are :func:`pca_embedding`,
:func:`scvi_embedding` and, for spatial data, :func:`neighbourhood_embedding`. Where a dataset has
batches and labels, :func:`scib_benchmark` adds the scib-metrics scores (it needs the optional
``scib-metrics`` package).

Two diagnostics say *why* an embedding scores as it does: :func:`latent_health` (how many
directions the embedding really uses, and whether its main axis only follows library size) and
:func:`mixture_scores` (how well a mixture latent's own component assignments match the labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "RESOLUTIONS",
    "clustering_scores",
    "latent_health",
    "leiden_sweep",
    "matched_resolution",
    "mixture_scores",
    "neighbourhood_embedding",
    "pca_embedding",
    "scib_benchmark",
    "score_embeddings",
    "score_sweep",
    "scvi_embedding",
    "silhouette",
]

RESOLUTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
"""Leiden resolutions of the sweep: 0.1, 0.2, ..., 1.5."""

N_NEIGHBORS = 15  # neighbours of the graph that Leiden clusters
N_TOP_GENES = 2000  # highly variable genes kept by the PCA baseline
N_PCS = 50  # principal components of the PCA baseline
N_SPATIAL_NEIGHBORS = 10  # cells averaged by the neighbourhood baseline, the cell itself included
ACTIVE_VARIANCE = 0.01  # a latent dimension is active when its variance across cells exceeds this
N_LIBRARY_AXES = 10  # principal axes compared with the library size by latent_health
MIN_COMPONENT_SHARE = 0.01  # a mixture component is in use when it holds at least this share of cells

SCORE_COLUMNS = [
    "method",
    "label_key",
    "n_labels",
    "matched_resolution",
    "n_clusters_matched",
    "ari_matched",
    "nmi_matched",
    "ari_best_over_resolutions",
    "nmi_best_over_resolutions",
    "silhouette",
]


# ------------------------------------------------------------------------------------ clustering


def leiden_sweep(
    adata, use_rep: str, *, resolutions: Sequence[float] = RESOLUTIONS, seed: int = 0
) -> dict[float, np.ndarray]:
    """Leiden clusterings of an embedding at each resolution of the sweep.

    Builds the 15-nearest-neighbour graph of ``adata.obsm[use_rep]`` with ``sc.pp.neighbors`` and
    runs Leiden (igraph flavour, 2 iterations, undirected) on it at each resolution. The graph is
    built in a scratch AnnData: ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``obsm[use_rep]``, shape ``(n_obs, n_dims)``.
    use_rep
        The ``obsm`` key of the embedding.
    resolutions
        Leiden resolutions; the protocol's are :data:`RESOLUTIONS`.
    seed
        Random state of the neighbour search and of Leiden.

    Returns
    -------
    dict
        ``{resolution: clusters}`` in increasing resolution, ``clusters`` an ``(n_obs,)`` int64
        array of cluster codes ``0, 1, ...``.
    """
    import anndata as ad
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep={use_rep!r} is not in adata.obsm; available: {list(adata.obsm.keys())}.")
    embedding = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    scratch = ad.AnnData(obs=pd.DataFrame(index=_positions(len(embedding))), obsm={"embedding": embedding})
    sc.pp.neighbors(scratch, n_neighbors=N_NEIGHBORS, use_rep="embedding", random_state=seed)
    sweep = {}
    for resolution in sorted(resolutions):
        sc.tl.leiden(
            scratch,
            resolution=resolution,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added="leiden",
        )
        sweep[float(resolution)] = scratch.obs["leiden"].cat.codes.to_numpy().astype(np.int64)
    return sweep


def matched_resolution(sweep: Mapping[float, np.ndarray], n_labels: int) -> float:
    """The resolution whose number of clusters is closest to ``n_labels``; ties go to the lower one.

    Parameters
    ----------
    sweep
        ``{resolution: clusters}``, as returned by :func:`leiden_sweep`; ``clusters`` has shape
        ``(n_obs,)``.
    n_labels
        The number of clusters to match, usually the number of distinct true labels.

    Returns
    -------
    float
        A key of ``sweep``.
    """
    if not sweep:
        raise ValueError("sweep is empty; it needs at least one resolution.")

    def distance_then_resolution(resolution: float) -> tuple[int, float]:
        n_clusters = np.unique(sweep[resolution]).size
        return abs(n_clusters - n_labels), resolution

    return min(sweep, key=distance_then_resolution)


def clustering_scores(labels, clusters) -> dict[str, float]:
    """ARI and NMI of a clustering against the true labels.

    Parameters
    ----------
    labels
        True labels, shape ``(n_obs,)``.
    clusters
        Cluster assignments of the same cells, shape ``(n_obs,)``.

    Returns
    -------
    dict
        ``{"ari": ..., "nmi": ...}`` (scikit-learn's adjusted Rand index and normalised mutual
        information, arithmetic normalisation).
    """
    labels, clusters = _as_labels(labels), _as_labels(clusters)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels and clusters differ in shape: {labels.shape} and {clusters.shape}.")
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
    }


def score_sweep(sweep: Mapping[float, np.ndarray], labels) -> dict:
    """ARI / NMI of a Leiden sweep at the matched resolution, and the best over all resolutions.

    Parameters
    ----------
    sweep
        ``{resolution: clusters}``, as returned by :func:`leiden_sweep`.
    labels
        True labels of the same cells, shape ``(n_obs,)``.

    Returns
    -------
    dict
        ``n_labels``, ``matched_resolution``, ``n_clusters_matched``, ``ari_matched``,
        ``nmi_matched`` (the figures to report), and ``ari_best_over_resolutions``,
        ``nmi_best_over_resolutions`` (each the maximum over the sweep, possibly at different
        resolutions).
    """
    labels = _as_labels(labels)
    n_labels = int(np.unique(labels).size)
    matched = matched_resolution(sweep, n_labels)
    scores = {resolution: clustering_scores(labels, clusters) for resolution, clusters in sweep.items()}
    return {
        "n_labels": n_labels,
        "matched_resolution": matched,
        "n_clusters_matched": int(np.unique(sweep[matched]).size),
        "ari_matched": scores[matched]["ari"],
        "nmi_matched": scores[matched]["nmi"],
        "ari_best_over_resolutions": max(s["ari"] for s in scores.values()),
        "nmi_best_over_resolutions": max(s["nmi"] for s in scores.values()),
    }


def silhouette(embedding, labels, *, sample_size: int | None = None, seed: int = 0) -> float:
    """Silhouette of the true labels on an embedding (scikit-learn, Euclidean distance).

    Parameters
    ----------
    embedding
        Array of shape ``(n_obs, n_dims)``.
    labels
        True labels, shape ``(n_obs,)``; at least two distinct values.
    sample_size
        Score a random subset of this many cells (the full score needs ``n_obs**2`` distances);
        ``None`` scores all cells.
    seed
        Random state of the subset.

    Returns
    -------
    float
        The mean silhouette coefficient, in ``[-1, 1]``.
    """
    embedding = np.asarray(embedding)
    labels = _as_labels(labels)
    if sample_size is not None and sample_size >= embedding.shape[0]:
        sample_size = None
    return float(
        silhouette_score(embedding, labels, metric="euclidean", sample_size=sample_size, random_state=seed)
    )


def score_embeddings(
    embeddings: Mapping[str, np.ndarray],
    obs: pd.DataFrame,
    label_keys: Sequence[str],
    *,
    seed: int = 0,
    silhouette_sample_size: int | None = None,
) -> pd.DataFrame:
    """Score several embeddings of the same cells against one or more label columns.

    Each embedding goes through :func:`leiden_sweep` once and is then scored against every label
    column with :func:`score_sweep` and :func:`silhouette`.

    Parameters
    ----------
    embeddings
        ``{method name: embedding}``, each embedding of shape ``(n_obs, n_dims)`` (``n_dims`` may
        differ between methods), rows in the order of ``obs``.
    obs
        Table of the cells, ``n_obs`` rows, holding the label columns (e.g. ``adata.obs``).
    label_keys
        Columns of ``obs`` with the true labels.
    seed
        Random state of the neighbour graph, Leiden and the silhouette subset.
    silhouette_sample_size
        Passed to :func:`silhouette` as ``sample_size``.

    Returns
    -------
    pandas.DataFrame
        One row per method and label key, in the order given, with the columns ``method``,
        ``label_key``, ``n_labels``, ``matched_resolution``, ``n_clusters_matched``,
        ``ari_matched``, ``nmi_matched``, ``ari_best_over_resolutions``,
        ``nmi_best_over_resolutions`` and ``silhouette``.
    """
    import anndata as ad

    missing = [key for key in label_keys if key not in obs.columns]
    if missing:
        raise KeyError(f"label keys {missing} are not columns of obs; available: {list(obs.columns)}.")
    rows = []
    for method, embedding in embeddings.items():
        embedding = np.asarray(embedding)
        if embedding.ndim != 2 or embedding.shape[0] != len(obs):
            raise ValueError(
                f"embedding {method!r} has shape {embedding.shape}; expected ({len(obs)}, n_dims), "
                "one row per row of obs."
            )
        cells = ad.AnnData(obs=pd.DataFrame(index=_positions(len(obs))), obsm={"embedding": embedding})
        sweep = leiden_sweep(cells, "embedding", seed=seed)
        for key in label_keys:
            labels = obs[key]
            rows.append(
                {
                    "method": method,
                    "label_key": key,
                    **score_sweep(sweep, labels),
                    "silhouette": silhouette(
                        embedding, labels, sample_size=silhouette_sample_size, seed=seed
                    ),
                }
            )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


# ------------------------------------------------------------------------------------- baselines


def pca_embedding(
    adata,
    *,
    layer: str | None = None,
    n_comps: int = N_PCS,
    n_top_genes: int = N_TOP_GENES,
    seed: int = 0,
) -> np.ndarray:
    """The PCA baseline: normalize_total, log1p, highly variable genes, PCA.

    Counts are scaled to the median library size (``sc.pp.normalize_total`` defaults) and
    log1p-transformed. When there are more than ``n_top_genes`` genes, the ``n_top_genes`` most
    variable ones are kept (``sc.pp.highly_variable_genes``, flavour ``"seurat"``, which expects
    log-normalised data). PCA then keeps ``min(n_comps, n_genes - 1, n_obs - 1)`` components:
    ``n_comps`` on real data, fewer only for very small data. The work is done on a copy of the
    counts; ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with raw counts, ``(n_obs, n_vars)``.
    layer
        Layer with the raw counts; ``None`` uses ``adata.X``.
    n_comps
        Number of principal components.
    n_top_genes
        Number of highly variable genes kept.
    seed
        Random state of the PCA solver.

    Returns
    -------
    numpy.ndarray
        Float32 array of shape ``(n_obs, min(n_comps, n_genes - 1, n_obs - 1))``, with ``n_genes =
        min(n_vars, n_top_genes)``.
    """
    import anndata as ad
    import scanpy as sc

    scratch = ad.AnnData(_counts(adata, layer).astype(np.float32, copy=True))
    scratch.var_names = adata.var_names.astype(str)
    sc.pp.normalize_total(scratch)
    sc.pp.log1p(scratch)
    if scratch.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(scratch, n_top_genes=n_top_genes, flavor="seurat", subset=True)
    n_comps = min(n_comps, scratch.n_vars - 1, scratch.n_obs - 1)
    sc.pp.pca(scratch, n_comps=n_comps, random_state=seed)
    return np.asarray(scratch.obsm["X_pca"], dtype=np.float32)


def scvi_embedding(
    adata,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    max_epochs: int | None = None,
    seed: int | None = 0,
    **train_kwargs,
) -> np.ndarray:
    """The scVI baseline: ``scvi.model.SCVI`` with its default settings, trained on the counts.

    The model is set up on a copy that holds only the counts (and the batch column): ``adata`` is
    not modified.

    Parameters
    ----------
    adata
        AnnData with raw counts, ``(n_obs, n_vars)``.
    layer
        Layer with the raw counts; ``None`` uses ``adata.X``.
    batch_key
        ``obs`` column with the batch of each cell, passed to ``SCVI.setup_anndata``.
    max_epochs
        Training epochs; ``None`` uses scvi-tools' default for the data size.
    seed
        Sets ``scvi.settings.seed`` (which seeds Python, NumPy and PyTorch globally) before the
        model is built; ``None`` leaves the random state as it is.
    **train_kwargs
        Passed to ``SCVI.train`` (e.g. ``accelerator="cpu"``, ``max_time``).

    Returns
    -------
    numpy.ndarray
        The latent means, float32, shape ``(n_obs, 10)`` with scVI's default ``n_latent``.
    """
    import anndata as ad
    import scvi

    if seed is not None:
        scvi.settings.seed = seed
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if batch_key is not None:
        if batch_key not in adata.obs:
            raise KeyError(
                f"batch_key={batch_key!r} is not a column of adata.obs; available: {list(adata.obs.columns)}."
            )
        obs[batch_key] = adata.obs[batch_key].to_numpy()
    scratch = ad.AnnData(_counts(adata, layer).copy(), obs=obs)
    scratch.var_names = adata.var_names.astype(str)
    scvi.model.SCVI.setup_anndata(scratch, batch_key=batch_key)
    model = scvi.model.SCVI(scratch)
    model.train(max_epochs=max_epochs, **train_kwargs)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def neighbourhood_embedding(
    adata,
    embedding,
    *,
    spatial_key: str = "spatial",
    groupby: str | None = None,
    n_neighbors: int = N_SPATIAL_NEIGHBORS,
) -> np.ndarray:
    """The spatial-neighbourhood baseline: an embedding averaged over each cell's nearest neighbours.

    Each cell's row is replaced by the mean of the rows of its ``n_neighbors`` nearest cells in
    space (Euclidean distance on the first two coordinates), the cell itself included. With
    ``groupby``, neighbours are searched within each group (tissue section, slice, field of view)
    only, so no average mixes cells of different groups; a group with fewer than ``n_neighbors``
    cells averages all of its cells.

    Parameters
    ----------
    adata
        AnnData with the coordinates in ``obsm[spatial_key]``, shape ``(n_obs, 2+)``.
    embedding
        The embedding to average, an array of shape ``(n_obs, n_dims)`` or an ``obsm`` key.
    spatial_key
        ``obsm`` key of the coordinates.
    groupby
        ``obs`` column with the section of each cell; ``None`` treats all cells as one section.
    n_neighbors
        Cells averaged per cell, the cell itself included.

    Returns
    -------
    numpy.ndarray
        Array of shape ``(n_obs, n_dims)``.
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    values = np.asarray(adata.obsm[embedding] if isinstance(embedding, str) else embedding)
    if values.ndim != 2 or values.shape[0] != adata.n_obs:
        raise ValueError(f"embedding has shape {values.shape}; expected ({adata.n_obs}, n_dims).")
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"spatial_key={spatial_key!r} is not in adata.obsm; available: {list(adata.obsm.keys())}."
        )
    coords = adata.obsm[spatial_key]
    coords = np.asarray(coords.to_numpy() if hasattr(coords, "to_numpy") else coords, dtype=np.float64)[:, :2]
    if groupby is None:
        groups = np.zeros(adata.n_obs, dtype=np.int64)
    else:
        groups = pd.Categorical(adata.obs[groupby]).codes

    averaged = np.empty(values.shape, dtype=np.result_type(values.dtype, np.float32))
    for group in np.unique(groups):
        cells = np.flatnonzero(groups == group)
        k = min(n_neighbors, cells.size)
        if k == 1:
            averaged[cells] = values[cells]
            continue
        # kneighbors() without query points leaves each point out of its own neighbours, so the
        # cell itself is added explicitly, even where other cells share its coordinates
        others = NearestNeighbors(n_neighbors=k - 1).fit(coords[cells]).kneighbors(return_distance=False)
        members = np.column_stack([np.arange(cells.size), others])
        averaged[cells] = values[cells][members].mean(axis=1)
    return averaged


# ----------------------------------------------------------------------------------- diagnostics


def latent_health(embedding, library_size, *, active_variance: float = ACTIVE_VARIANCE) -> dict:
    """How many directions an embedding uses, and whether its main axes only follow library size.

    A collapsed embedding puts almost all of its variance on one axis (participation ratio near
    1, top-axis share near 1); an embedding that learned sequencing depth instead of cell identity
    has a principal axis strongly correlated with the log library size.

    Parameters
    ----------
    embedding
        Array of shape ``(n_obs, n_dims)``: the posterior means of a latent model, or any other
        embedding (PCA scores...).
    library_size
        Total counts of each cell, shape ``(n_obs,)`` (the row sums of the raw counts). Its
        logarithm is taken after raising values below 1 to 1, so empty cells stay finite.
    active_variance
        A dimension is *active* when its variance across cells exceeds this (the usual
        "active units" criterion applied to the posterior means).

    Returns
    -------
    dict
        * ``n_dims``: ``L``, the number of columns.
        * ``participation_ratio``: ``(sum λ)^2 / sum λ^2`` of the eigenvalues ``λ`` of the
          embedding's ``L x L`` covariance, between 1 (one direction) and ``L`` (isotropic); 0
          for a constant embedding.
        * ``top_axis_share``: ``λ_max / sum λ``, the share of the variance on the first principal
          axis (0 for a constant embedding).
        * ``max_abs_corr_log_library``: the largest absolute Pearson correlation between the
          scores of one of the first ``min(10, L)`` principal axes and ``log(library_size)``
          (axes with no variance count as 0).
        * ``library_axis``: the 0-based rank of that principal axis.
        * ``n_active_dims``: the number of columns whose variance exceeds ``active_variance``.
    """
    values = np.asarray(embedding, dtype=np.float64)
    library = np.asarray(library_size, dtype=np.float64).ravel()
    if values.ndim != 2:
        raise ValueError(f"embedding must be 2-d (n_obs, n_dims); got shape {values.shape}.")
    if library.shape != (values.shape[0],):
        raise ValueError(
            f"library_size has {library.size} values; expected one per cell ({values.shape[0]})."
        )
    if values.shape[0] < 2:
        raise ValueError("latent_health needs at least two cells.")
    centred = values - values.mean(axis=0)
    covariance = centred.T @ centred / (values.shape[0] - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # eigh returns ascending eigenvalues; round-off may leave tiny negative ones
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]
    total = float(eigenvalues.sum())
    if total > 0:
        participation = total**2 / float(np.sum(eigenvalues**2))
        top_share = float(eigenvalues[0]) / total
    else:
        participation = top_share = 0.0

    log_library = np.log(np.maximum(library, 1.0))
    n_axes = min(N_LIBRARY_AXES, values.shape[1])
    scores = centred @ eigenvectors[:, :n_axes]
    # an axis without variance (rank-deficient embedding) holds only round-off: it counts as 0
    has_variance = eigenvalues[:n_axes] > 1e-12 * max(total, np.finfo(float).tiny)
    correlations = np.array(
        [_pearson(scores[:, axis], log_library) if has_variance[axis] else 0.0 for axis in range(n_axes)]
    )
    library_axis = int(np.argmax(np.abs(correlations)))
    return {
        "n_dims": int(values.shape[1]),
        "participation_ratio": float(participation),
        "top_axis_share": float(top_share),
        "max_abs_corr_log_library": float(abs(correlations[library_axis])),
        "library_axis": library_axis,
        "n_active_dims": int(np.sum(values.var(axis=0, ddof=1) > active_variance)),
    }


def mixture_scores(assignments, labels, *, min_share: float = MIN_COMPONENT_SHARE) -> dict:
    """Agreement of a mixture latent's component assignments with the true labels.

    The assignments are taken as a clustering as they are (no Leiden, no resolution to match), so
    the score says whether the mixture components themselves have become cell types.

    Parameters
    ----------
    assignments
        Most probable mixture component of each cell, shape ``(n_obs,)`` (e.g.
        ``CellPLM.get_cluster_assignments()``).
    labels
        True labels of the same cells, shape ``(n_obs,)``.
    min_share
        A component is *in use* when it holds at least this share of the cells (1 % by default),
        so that a few stray cells do not count as a cluster.

    Returns
    -------
    dict
        ``ari`` and ``nmi`` (as :func:`clustering_scores`), ``n_components_used`` (components
        holding at least ``min_share`` of the cells) and ``n_components_nonempty`` (components
        holding at least one cell).
    """
    assignments = _as_labels(assignments)
    scores = clustering_scores(labels, assignments)
    _, sizes = np.unique(assignments, return_counts=True)
    return {
        **scores,
        "n_components_used": int(np.sum(sizes >= min_share * assignments.size)),
        "n_components_nonempty": int(sizes.size),
    }


# -------------------------------------------------------------------------------- scib-metrics


def scib_benchmark(
    adata, embedding_keys: Sequence[str], *, batch_key: str, label_key: str, n_jobs: int = 1
) -> pd.DataFrame:
    """The scib-metrics ``Benchmarker`` scores (bio conservation, batch correction, total).

    Needs the optional ``scib-metrics`` package (``pip install scib-metrics``); it is not a
    dependency of cellplm-scvi.

    Parameters
    ----------
    adata
        AnnData with the embeddings in ``obsm``, the batches and the labels in ``obs``.
    embedding_keys
        ``obsm`` keys of the embeddings to score, each of shape ``(n_obs, n_dims)``.
    batch_key
        ``obs`` column with the batch of each cell.
    label_key
        ``obs`` column with the true labels.
    n_jobs
        Parallel jobs of the neighbour search.

    Returns
    -------
    pandas.DataFrame
        One row per embedding key, one column per metric plus ``"Bio conservation"``, ``"Batch
        correction"`` and ``"Total"``; the scores are not min-max scaled.

    Raises
    ------
    ImportError
        When ``scib_metrics`` is not installed.
    """
    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError as err:
        raise ImportError(
            "scib_benchmark needs the optional scib-metrics package: pip install scib-metrics"
        ) from err

    benchmarker = Benchmarker(
        adata,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(embedding_keys),
        n_jobs=n_jobs,
    )
    benchmarker.benchmark()
    results = benchmarker.get_results(min_max_scale=False)
    # the last row names each column's metric type, not an embedding
    return results.loc[list(embedding_keys)].astype(float)


# -------------------------------------------------------------------------------------- helpers


def _counts(adata, layer: str | None):
    """``adata.layers[layer]`` (or ``adata.X``) as an in-memory matrix."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers; available: {list(adata.layers.keys())}.")
    counts = adata.X if layer is None else adata.layers[layer]
    if sp.issparse(counts):
        return sp.csr_matrix(counts)
    return np.asarray(counts)


def _positions(n: int) -> pd.Index:
    """Unique cell names ``"0", "1", ...`` for scratch AnnData objects."""
    return pd.RangeIndex(n).astype(str)


def _as_labels(values) -> np.ndarray:
    """Labels as a 1-d array of strings, so that categories, integers and mixed types compare alike."""
    return np.asarray(values).astype(str).ravel()


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-d arrays; 0 when either is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # centring a constant may leave round-off, not signal
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    scale = float(np.sqrt(np.sum(x**2) * np.sum(y**2)))
    return float(np.sum(x * y) / scale) if scale > 0 else 0.0
