from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from cellplm_scvi import datasets


@pytest.fixture(scope="module")
def pbmc():
    return datasets.pbmc68k_counts()


@pytest.fixture(scope="module")
def tissue():
    return datasets.synthetic_spatial_tissue()


def _assert_integer_csr(adata):
    assert sparse.isspmatrix_csr(adata.X)
    assert adata.X.dtype == np.float32
    assert sparse.isspmatrix_csr(adata.layers["counts"])
    assert (adata.X != adata.layers["counts"]).nnz == 0
    assert adata.X.data is not adata.layers["counts"].data
    values = adata.X.data
    np.testing.assert_array_equal(values, np.rint(values))
    assert values.min() >= 1  # explicit zeros eliminated


# ---------------------------------------------------------------------------------------------- pbmc68k


def test_pbmc_shapes_and_annotations(pbmc):
    reduced = sc.datasets.pbmc68k_reduced()
    assert pbmc.shape == (700, 765)
    assert list(pbmc.var_names) == list(reduced.raw.var_names)
    assert list(pbmc.obs_names) == list(reduced.obs_names)
    assert pbmc.obs["bulk_labels"].dtype == "category"
    assert pbmc.obs["bulk_labels"].nunique() == 10
    assert pbmc.obs["louvain"].nunique() == 11
    assert pbmc.obs["sample"].nunique() == 1
    assert (pbmc.obs["bulk_labels"] == "Dendritic").sum() == 240
    _assert_integer_csr(pbmc)


def test_pbmc_counts_are_integers_before_rounding():
    # raw.X is stored with 3 decimals, so the error of expm1(raw.X) * n_counts / 1e4 grows with the
    # count: measured max |c - round(c)| / round(c) = 7.6e-4 and max absolute error 0.082 (at a
    # count of 259). No value is anywhere near a half-integer, so rounding is unambiguous.
    reduced = sc.datasets.pbmc68k_reduced()
    before = datasets._pbmc_counts_before_rounding(reduced)
    rounded = np.rint(before)
    nonzero = rounded > 0
    relative = np.abs(before - rounded)[nonzero] / rounded[nonzero]
    assert relative.max() < 1e-3
    assert np.abs(before - rounded).max() < 0.1
    assert np.all(before[~nonzero] == 0)
    # the smallest non-zero value of every cell is a count of one
    smallest = np.array([row[row > 0].min() for row in rounded])
    np.testing.assert_array_equal(smallest, 1.0)


def test_pbmc_row_sums_against_n_counts(pbmc):
    # n_counts is the library size over all genes of the experiment; raw keeps 765 of them.
    # Measured: the 765-gene row sums are 10.9 % to 27.9 % of n_counts.
    row_sums = np.asarray(pbmc.X.sum(1)).ravel()
    ratio = row_sums / pbmc.obs["n_counts"].to_numpy()
    assert np.all(ratio > 0.10)
    assert np.all(ratio < 0.30)
    assert np.corrcoef(row_sums, pbmc.obs["n_counts"])[0, 1] > 0.7  # measured 0.764
    assert pbmc.X.max() == 259


def test_pbmc_log_normalisation_round_trips(pbmc):
    # normalize_total(1e4) + log1p of the recovered counts, using the original library sizes,
    # reproduces raw.X to its 3 stored decimals.
    reduced = sc.datasets.pbmc68k_reduced()
    counts = pbmc.X.toarray().astype(np.float64)
    lognorm = np.log1p(counts / pbmc.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(lognorm, reduced.raw.X.toarray(), atol=6e-4)


# ----------------------------------------------------------------------------------- synthetic tissue


def test_tissue_shapes_and_keys(tissue):
    assert tissue.shape == (2000, 200)
    for key in ("fov", "sample", "cell_type", "niche"):
        assert tissue.obs[key].dtype == "category", key
    assert list(tissue.obs["fov"].cat.categories) == ["fov0", "fov1", "fov2", "fov3"]
    assert tissue.obs["fov"].value_counts().tolist() == [500] * 4
    assert tissue.obs["cell_type"].cat.categories.size == 6
    assert tissue.obs["niche"].cat.categories.size == 3
    assert tissue.obsm["spatial"].shape == (2000, 2)
    assert tissue.obsm["spatial"].dtype == np.float64
    assert tissue.obs_names.is_unique
    assert tissue.uns["synthetic_tissue"]["niche_type_composition"].shape == (3, 6)
    _assert_integer_csr(tissue)


def test_tissue_is_deterministic_by_seed(tissue):
    again = datasets.synthetic_spatial_tissue(seed=0)
    other = datasets.synthetic_spatial_tissue(seed=1)
    assert (tissue.X != again.X).nnz == 0
    np.testing.assert_array_equal(tissue.obsm["spatial"], again.obsm["spatial"])
    assert tissue.obs.equals(again.obs)
    assert (tissue.X != other.X).nnz > 0
    assert not np.allclose(tissue.obsm["spatial"], other.obsm["spatial"])


def test_tissue_sparsity_and_library_sizes(tissue):
    zero_fraction = 1 - tissue.X.nnz / np.prod(tissue.shape)
    assert 0.6 < zero_fraction < 0.85  # measured 0.708 with the defaults
    library = np.asarray(tissue.X.sum(1)).ravel()
    assert 70 < np.median(library) < 140
    assert np.percentile(library, 95) / np.percentile(library, 5) > 3  # library sizes vary


def test_tissue_fovs_are_separate_squares_with_several_niches(tissue):
    boxes = []
    for fov in tissue.obs["fov"].cat.categories:
        in_fov = (tissue.obs["fov"] == fov).to_numpy()
        xy = tissue.obsm["spatial"][in_fov]
        extent = xy.max(0) - xy.min(0)
        assert np.all(extent > 900) and np.all(extent <= 1000)
        boxes.append((xy.min(0), xy.max(0)))
        niche_sizes = tissue.obs.loc[in_fov, "niche"].value_counts()
        assert (niche_sizes >= 25).sum() >= 2, niche_sizes
    for i, (lo_a, hi_a) in enumerate(boxes):
        for lo_b, hi_b in boxes[i + 1 :]:
            overlap = np.all(np.minimum(hi_a, hi_b) > np.maximum(lo_a, lo_b))
            assert not overlap


def test_tissue_niches_are_spatially_contiguous(tissue):
    # a cell's 10 nearest spatial neighbours mostly share its niche (Voronoi regions)
    from sklearn.neighbors import NearestNeighbors

    agree = []
    for fov in tissue.obs["fov"].cat.categories:
        in_fov = (tissue.obs["fov"] == fov).to_numpy()
        xy = tissue.obsm["spatial"][in_fov]
        niche = tissue.obs["niche"].cat.codes.to_numpy()[in_fov]
        idx = NearestNeighbors(n_neighbors=11).fit(xy).kneighbors(xy, return_distance=False)[:, 1:]
        agree.append((niche[idx] == niche[:, None]).mean())
    assert np.mean(agree) > 0.8


def test_tissue_programs_mark_types_and_niches(tissue):
    counts = tissue.X.toarray()
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    program = tissue.var["program"].astype(str).to_numpy()
    for column, prefix in (("cell_type", "type"), ("niche", "niche")):
        labels = tissue.obs[column].astype(str).to_numpy()
        for label in np.unique(labels):
            genes = program == label
            assert genes.sum() >= 2, label
            inside = lognorm[labels == label][:, genes].mean()
            outside = lognorm[labels != label][:, genes].mean()
            assert inside > outside + 0.3, (label, inside, outside)
        assert label.startswith(prefix)


def test_tissue_niche_composition_differs(tissue):
    table = tissue.obs.groupby(["niche", "cell_type"], observed=False).size().unstack().to_numpy()
    fractions = table / table.sum(1, keepdims=True)
    # total variation distance between every pair of niche compositions
    for i in range(fractions.shape[0]):
        for j in range(i + 1, fractions.shape[0]):
            assert 0.5 * np.abs(fractions[i] - fractions[j]).sum() > 0.2


def test_tissue_custom_sizes():
    small = datasets.synthetic_spatial_tissue(
        n_fovs=2, cells_per_fov=50, n_genes=40, n_cell_types=3, n_niches=2, seed=3
    )
    assert small.shape == (100, 40)
    assert small.obs["cell_type"].cat.categories.tolist() == ["type0", "type1", "type2"]
    assert small.obs["niche"].cat.categories.tolist() == ["niche0", "niche1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_genes": 10}, "n_genes=10 is too small"),
        ({"n_niches": 1}, "n_niches >= 2"),
        ({"cells_per_fov": 0}, "cells_per_fov >= 1"),
    ],
)
def test_tissue_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        datasets.synthetic_spatial_tissue(**kwargs)
