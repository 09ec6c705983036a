from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellplm_scvi import evaluation


def _blobs(n_per_blob: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated 2-d Gaussian blobs and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], dtype=float)
    labels = np.repeat(np.arange(4), n_per_blob)
    return centres[labels] + rng.normal(size=(labels.size, 2)), labels


def _counts(n_obs: int, n_vars: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(2.0, 1.0, size=(1, n_vars)), size=(n_obs, n_vars)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.layers["counts"] = adata.X.copy()
    adata.obs_names = [f"cell{i}" for i in range(n_obs)]
    adata.var_names = [f"gene{j}" for j in range(n_vars)]
    return adata


# ------------------------------------------------------------------------------ matched resolution


def test_resolutions_are_the_protocols():
    assert evaluation.RESOLUTIONS == (
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
        1.1,
        1.2,
        1.3,
        1.4,
        1.5,
    )


def test_matched_resolution_prefers_the_closest_count_then_the_lower_resolution():
    def clusters(k):
        return np.arange(12) % k

    sweep = {0.1: clusters(2), 0.2: clusters(4), 0.3: clusters(6), 0.4: clusters(7)}
    assert evaluation.matched_resolution(sweep, 4) == 0.2
    assert evaluation.matched_resolution(sweep, 5) == 0.2  # 4 and 6 tie: the lower resolution wins
    assert evaluation.matched_resolution(sweep, 9) == 0.4
    assert evaluation.matched_resolution(sweep, 1) == 0.1
    # the order of the mapping does not matter
    assert evaluation.matched_resolution(dict(reversed(sweep.items())), 5) == 0.2
    # equal counts at several resolutions: the lowest of them
    assert evaluation.matched_resolution({0.5: clusters(3), 0.3: clusters(3), 0.9: clusters(5)}, 3) == 0.3


def test_matched_resolution_of_an_empty_sweep_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluation.matched_resolution({}, 3)


def test_score_sweep_reports_matched_and_best_separately():
    labels = np.repeat([0, 1], 6)
    sweep = {0.1: labels.copy(), 0.2: np.arange(12) % 3}  # 0.1 is perfect and matched
    score = evaluation.score_sweep(sweep, labels)
    assert score["matched_resolution"] == 0.1
    assert score["n_labels"] == 2 and score["n_clusters_matched"] == 2
    assert score["ari_matched"] == pytest.approx(1.0)
    # the best over resolutions can come from a resolution other than the matched one
    sweep = {0.1: np.arange(12) % 2, 0.2: labels.copy(), 0.3: labels.copy()}  # 0.1 matched, but bad
    sweep[0.2][0] = 1 - sweep[0.2][0]
    score = evaluation.score_sweep({r: c for r, c in sweep.items() if r != 0.3}, labels)
    assert score["matched_resolution"] == 0.1  # both have 2 clusters: the lower resolution
    assert score["ari_matched"] < 0.1
    assert score["ari_best_over_resolutions"] > 0.5
    assert score["nmi_best_over_resolutions"] >= score["nmi_matched"]


# ------------------------------------------------------------------------------------ sweep


def test_leiden_sweep_recovers_separated_blobs_and_leaves_the_input_alone():
    embedding, labels = _blobs()
    adata = ad.AnnData(np.zeros((labels.size, 1), dtype=np.float32))
    adata.obsm["emb"] = embedding
    sweep = evaluation.leiden_sweep(adata, "emb", seed=0)
    assert list(sweep) == list(evaluation.RESOLUTIONS)
    assert all(c.shape == (labels.size,) and c.dtype == np.int64 for c in sweep.values())
    assert not adata.obsp and "neighbors" not in adata.uns and list(adata.obs.columns) == []

    score = evaluation.score_sweep(sweep, pd.Series(labels.astype(str)))
    assert score["n_labels"] == 4
    assert score["n_clusters_matched"] == 4
    assert score["ari_matched"] == pytest.approx(1.0)
    assert score["nmi_matched"] == pytest.approx(1.0)


def test_leiden_sweep_names_a_missing_embedding():
    adata = ad.AnnData(np.zeros((5, 1), dtype=np.float32))
    with pytest.raises(KeyError, match="X_nothing"):
        evaluation.leiden_sweep(adata, "X_nothing")


def test_silhouette_is_high_on_blobs_and_low_on_shuffled_labels():
    embedding, labels = _blobs()
    assert evaluation.silhouette(embedding, labels) > 0.8
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(evaluation.silhouette(embedding, shuffled)) < 0.1


# ------------------------------------------------------------------------------- score table


def test_score_embeddings_returns_one_row_per_method_and_label_key():
    embedding, labels = _blobs()
    rng = np.random.default_rng(2)
    obs = pd.DataFrame(
        {"blob": pd.Categorical(labels.astype(str)), "half": np.where(labels < 2, "a", "b")},
        index=[f"c{i}" for i in range(labels.size)],
    )
    embeddings = {"blobs": embedding, "noise": rng.normal(size=(labels.size, 5))}
    table = evaluation.score_embeddings(embeddings, obs, ["blob", "half"], seed=0)

    assert list(table.columns) == [
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
    assert list(zip(table["method"], table["label_key"], strict=True)) == [
        ("blobs", "blob"),
        ("blobs", "half"),
        ("noise", "blob"),
        ("noise", "half"),
    ]
    assert list(table["n_labels"]) == [4, 2, 4, 2]
    best = table.set_index(["method", "label_key"])
    assert best.loc[("blobs", "blob"), "ari_matched"] == pytest.approx(1.0)
    assert best.loc[("noise", "blob"), "ari_matched"] < 0.2
    assert (table["ari_best_over_resolutions"] >= table["ari_matched"] - 1e-12).all()
    assert table["matched_resolution"].isin(evaluation.RESOLUTIONS).all()


def test_score_embeddings_refuses_mismatched_rows_and_missing_labels():
    obs = pd.DataFrame({"label": list("aabb")})
    with pytest.raises(ValueError, match="shape"):
        evaluation.score_embeddings({"x": np.zeros((3, 2))}, obs, ["label"])
    with pytest.raises(KeyError, match="cell_type"):
        evaluation.score_embeddings({"x": np.zeros((4, 2))}, obs, ["cell_type"])


# ------------------------------------------------------------------------------------- PCA


def test_pca_embedding_leaves_its_input_alone_and_gives_50_components():
    adata = _counts(120, 300)
    before = adata.copy()
    pcs = evaluation.pca_embedding(adata, layer="counts")
    assert pcs.shape == (120, 50) and pcs.dtype == np.float32
    assert np.isfinite(pcs).all()
    # nothing of the caller's data changed or was added
    assert (adata.X != before.X).nnz == 0 and (adata.layers["counts"] != before.layers["counts"]).nnz == 0
    assert list(adata.obs.columns) == [] and list(adata.var.columns) == []
    assert not adata.uns and not adata.obsm and not adata.varm


def test_pca_embedding_keeps_2000_variable_genes_when_there_are_more(monkeypatch):
    import scanpy as sc

    seen = {}
    pca = sc.pp.pca

    def spy(data, **kwargs):
        seen["n_vars"] = data.n_vars
        return pca(data, **kwargs)

    monkeypatch.setattr(sc.pp, "pca", spy)
    adata = _counts(80, 2100)
    assert evaluation.pca_embedding(adata).shape == (80, 50)
    assert seen["n_vars"] == 2000


def test_pca_embedding_of_tiny_data_keeps_fewer_components():
    # at most min(n_genes, n_obs) - 1 components exist
    assert evaluation.pca_embedding(_counts(200, 12)).shape == (200, 11)
    assert evaluation.pca_embedding(_counts(30, 100)).shape == (30, 29)


def test_pca_embedding_names_a_missing_layer():
    with pytest.raises(KeyError, match="raw"):
        evaluation.pca_embedding(_counts(10, 10), layer="raw")


# ---------------------------------------------------------------------------- neighbourhood


def test_neighbourhood_embedding_matches_a_hand_computed_mean_within_each_slice():
    # two slices with the same coordinates on a line: 0, 1, 2, 10 (slice a) and the same for b
    x = np.array([0.0, 1.0, 2.0, 10.0])
    adata = ad.AnnData(np.zeros((8, 1), dtype=np.float32))
    adata.obsm["spatial"] = np.column_stack([np.concatenate([x, x]), np.zeros(8)])
    adata.obs["slice"] = ["a"] * 4 + ["b"] * 4
    values = np.array([[1.0], [2.0], [3.0], [4.0], [100.0], [200.0], [300.0], [400.0]])

    averaged = evaluation.neighbourhood_embedding(adata, values, groupby="slice", n_neighbors=2)
    # each cell with its nearest other cell of its own slice: 0 with 1, 2 with 1, 10 with 2; the cell
    # at 1 has two nearest cells (0 and 2, both at distance 1), either may be taken
    assert averaged[0, 0] == pytest.approx((1 + 2) / 2)
    assert averaged[1, 0] in (pytest.approx((2 + 1) / 2), pytest.approx((2 + 3) / 2))
    assert averaged[2, 0] == pytest.approx((3 + 2) / 2)
    assert averaged[3, 0] == pytest.approx((4 + 3) / 2)
    np.testing.assert_allclose(averaged[4:], 100 * averaged[:4])  # slice b alike, never mixed with a

    averaged = evaluation.neighbourhood_embedding(adata, values, groupby="slice", n_neighbors=3)
    np.testing.assert_allclose(averaged[:4, 0], [2.0, 2.0, 2.0, 3.0])  # {0,1,2}, {0,1,2}, {0,1,2}, {1,2,3}
    np.testing.assert_allclose(averaged[4:, 0], [200.0, 200.0, 200.0, 300.0])


def test_neighbourhood_embedding_without_groups_mixes_cells_at_the_same_place():
    adata = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    adata.obsm["spatial"] = np.array([[0.0, 0.0], [0.0, 0.0], [50.0, 0.0], [50.0, 0.0]])
    adata.obs["slice"] = ["a", "b", "a", "b"]
    adata.obsm["emb"] = np.array([[0.0, 2.0], [4.0, 6.0], [10.0, 10.0], [20.0, 30.0]])

    pooled = evaluation.neighbourhood_embedding(adata, "emb", n_neighbors=2)
    np.testing.assert_allclose(pooled, [[2.0, 4.0], [2.0, 4.0], [15.0, 20.0], [15.0, 20.0]])
    by_slice = evaluation.neighbourhood_embedding(adata, "emb", groupby="slice", n_neighbors=2)
    np.testing.assert_allclose(by_slice, [[5.0, 6.0], [12.0, 18.0], [5.0, 6.0], [12.0, 18.0]])


def test_neighbourhood_embedding_includes_the_cell_itself_among_duplicates_and_small_slices():
    adata = ad.AnnData(np.zeros((5, 1), dtype=np.float32))
    adata.obsm["spatial"] = np.zeros((5, 2))  # every cell at the same place
    adata.obs["slice"] = ["a", "a", "a", "a", "b"]
    values = np.arange(5, dtype=float)[:, None]
    # k = 10 > slice size: each cell of slice a averages all of slice a; the lone cell of b is itself
    averaged = evaluation.neighbourhood_embedding(adata, values, groupby="slice")
    np.testing.assert_allclose(averaged[:, 0], [1.5, 1.5, 1.5, 1.5, 4.0])
    # k = 1: the embedding itself
    np.testing.assert_allclose(evaluation.neighbourhood_embedding(adata, values, n_neighbors=1), values)


# -------------------------------------------------------------------------------- baselines


def test_scvi_embedding_leaves_its_input_alone():
    adata = _counts(60, 30)
    adata.obs["batch"] = ["x", "y"] * 30
    before_obs = adata.obs.copy()
    z = evaluation.scvi_embedding(adata, layer="counts", batch_key="batch", max_epochs=1, accelerator="cpu")
    assert z.shape == (60, 10) and np.isfinite(z).all()
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert not adata.uns


def test_scib_benchmark_explains_the_missing_optional_package():
    try:
        import scib_metrics  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install scib-metrics"):
            evaluation.scib_benchmark(ad.AnnData(np.zeros((2, 1))), ["X"], batch_key="b", label_key="l")
    else:
        pytest.skip("scib-metrics is installed")


# ------------------------------------------------------------------------------------- diagnostics


def test_latent_health_of_an_isotropic_gaussian_uses_every_dimension():
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(20_000, 8))
    library = np.exp(rng.normal(5.0, 0.5, size=20_000))  # independent of the embedding
    health = evaluation.latent_health(embedding, library)
    assert health["n_dims"] == 8
    assert health["participation_ratio"] == pytest.approx(8.0, rel=0.02)
    assert health["top_axis_share"] == pytest.approx(1 / 8, rel=0.1)
    assert health["max_abs_corr_log_library"] < 0.05
    assert health["n_active_dims"] == 8


def test_latent_health_of_a_rank_one_embedding_is_one_direction():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=6)
    embedding = rng.normal(size=(500, 1)) * direction  # every row on one line through the origin
    health = evaluation.latent_health(embedding, np.full(500, 100.0))
    assert health["participation_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert health["top_axis_share"] == pytest.approx(1.0, abs=1e-9)
    # a constant library size correlates with nothing
    assert health["max_abs_corr_log_library"] == 0.0


def test_latent_health_finds_the_axis_that_follows_library_size():
    rng = np.random.default_rng(2)
    library = np.exp(rng.normal(6.0, 1.0, size=1_000))
    # column 0 is the log library size (variance 1); columns 1-2 are larger independent noise, so
    # the library axis is the third principal axis, not the first
    embedding = np.column_stack([np.log(library), 3 * rng.normal(size=1_000), 2 * rng.normal(size=1_000)])
    health = evaluation.latent_health(embedding, library)
    assert health["max_abs_corr_log_library"] == pytest.approx(1.0, abs=1e-3)
    assert health["library_axis"] == 2
    # a negated axis is as much a library axis
    flipped = evaluation.latent_health(-embedding, library)
    assert flipped["max_abs_corr_log_library"] == pytest.approx(1.0, abs=1e-3)


def test_latent_health_counts_active_dims_by_variance_and_handles_constants():
    rng = np.random.default_rng(3)
    n = 2_000
    # variances 1, 0.04 (active) and 0.0025, 0 (inactive) against the 0.01 threshold
    embedding = np.column_stack(
        [rng.normal(size=n), 0.2 * rng.normal(size=n), 0.05 * rng.normal(size=n), np.full(n, 3.0)]
    )
    assert evaluation.latent_health(embedding, np.ones(n))["n_active_dims"] == 2
    assert evaluation.latent_health(embedding, np.ones(n), active_variance=0.001)["n_active_dims"] == 3
    constant = evaluation.latent_health(np.ones((10, 3)), np.arange(1, 11))
    assert constant["participation_ratio"] == 0.0 and constant["top_axis_share"] == 0.0
    assert constant["max_abs_corr_log_library"] == 0.0 and constant["n_active_dims"] == 0
    # empty cells (library 0) stay finite
    assert np.isfinite(evaluation.latent_health(embedding, np.zeros(n))["max_abs_corr_log_library"])


def test_latent_health_only_compares_the_first_ten_axes_with_the_library():
    rng = np.random.default_rng(4)
    library = np.exp(rng.normal(size=3_000))
    # twelve columns of decreasing variance; the smallest (rank 11) is the log library size
    noise = rng.normal(size=(3_000, 11)) * np.linspace(10, 2, 11)
    embedding = np.column_stack([noise, 0.1 * np.log(library)])
    health = evaluation.latent_health(embedding, library)
    assert health["n_dims"] == 12
    assert health["max_abs_corr_log_library"] < 0.1


def test_latent_health_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one per cell"):
        evaluation.latent_health(np.zeros((5, 2)), np.ones(4))
    with pytest.raises(ValueError, match="2-d"):
        evaluation.latent_health(np.zeros(5), np.ones(5))


def test_mixture_scores_of_relabelled_components_are_perfect():
    labels = np.repeat(["a", "b", "c"], 100)
    assignments = np.repeat([7, 2, 11], 100)  # the same partition, other names
    scores = evaluation.mixture_scores(assignments, labels)
    assert scores["ari"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)
    assert scores["n_components_used"] == 3 and scores["n_components_nonempty"] == 3


def test_mixture_scores_count_only_components_with_one_percent_of_the_cells():
    # 1,000 cells: components of 500, 480, 10 (1 %: in use) and 9 + 1 (below 1 %: not in use)
    assignments = np.repeat([0, 1, 2, 3, 4], [500, 480, 10, 9, 1])
    labels = np.where(assignments == 0, "x", "y")
    scores = evaluation.mixture_scores(assignments, labels)
    assert scores["n_components_used"] == 3
    assert scores["n_components_nonempty"] == 5
    assert evaluation.mixture_scores(assignments, labels, min_share=0.2)["n_components_used"] == 2
    # one component for everything: ARI 0
    assert evaluation.mixture_scores(np.zeros(1_000), labels)["ari"] == pytest.approx(0.0)
