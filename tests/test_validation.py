"""Bad input stops early with one clear message; every supported input format gives the same result."""

import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from conftest import TINY_MODEL, make_tissues

from cellplm_scvi import CellPLM
from cellplm_scvi.data import tissue_data

SMALL = TINY_MODEL
TRAIN = {"max_cells_per_batch": 100, "accelerator": "cpu", "enable_progress_bar": False}
TOL = {"atol": 1e-5, "rtol": 1e-4}


def train_small(adata, epochs=1, **setup):
    CellPLM.setup_anndata(adata, **setup)
    model = CellPLM(adata, max_cells_per_context=50, **SMALL)
    model.train(max_epochs=epochs, **TRAIN)
    return model


@pytest.mark.parametrize(
    ("mutate", "setup", "error", "message"),
    [
        (lambda a: None, {"layer": "raw"}, KeyError, r"layer='raw' is not in adata.layers"),
        (lambda a: None, {"batch_key": "donor"}, KeyError, r"batch_key='donor' is not a column of adata.obs"),
        (lambda a: None, {"fov_key": "field"}, KeyError, r"fov_key='field' is not a column"),
        (lambda a: None, {"labels_key": "type"}, KeyError, r"labels_key='type' is not a column"),
        (lambda a: None, {"spatial_key": "xy"}, KeyError, r"spatial_key='xy' is not in adata.obsm"),
        (
            lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"][:, :1]),
            {"spatial_key": "spatial"},
            ValueError,
            r"must have shape \(n_obs, 2\)",
        ),
        (
            lambda a: a.obsm.__setitem__("spatial", np.full((a.n_obs, 2), "a")),
            {"spatial_key": "spatial"},
            ValueError,
            "must be numeric",
        ),
        (
            lambda a: a.obsm["spatial"].__setitem__((3, 0), np.nan),
            {"spatial_key": "spatial"},
            ValueError,
            r"NaN or infinite coordinates for 1 cells \(first: 'cell3'\)",
        ),
        (
            lambda a: a.obs.__setitem__("sample", a.obs["sample"].where(np.arange(a.n_obs) != 5)),
            {"batch_key": "sample"},
            ValueError,
            r"batch_key='sample' has 1 missing values",
        ),
        (lambda a: a.layers["counts"].data.__setitem__(0, -1.0), {}, ValueError, "negative values.*layer="),
        (lambda a: a.layers["counts"].data.__setitem__(0, np.inf), {}, ValueError, "NaN or infinite values"),
        (lambda a: a.layers["counts"].data.__setitem__(0, np.nan), {}, ValueError, "NaN or infinite values"),
    ],
)
def test_bad_input_raises_a_clear_error(mutate, setup, error, message):
    adata = make_tissues(n_cells=60)
    mutate(adata)
    with pytest.raises(error, match=message):
        CellPLM.setup_anndata(adata, **{"layer": "counts", **setup})


def test_log_normalised_input_warns_with_the_ways_out():
    adata = make_tissues(n_cells=60)
    adata.X = sp.csr_matrix(np.log1p(adata.layers["counts"].toarray()))
    with pytest.warns(UserWarning, match=r"non-integer values.*raw counts.*layer="):
        CellPLM.setup_anndata(adata)


@pytest.mark.parametrize("dense", [False, True])
def test_count_check_reads_every_stored_value(dense):
    from cellplm_scvi._constants import VALUES_PER_PASS
    from cellplm_scvi.model._validation import check_counts

    counts = sp.random(600, 300, density=0.9, random_state=0, format="csr", dtype=np.float32)
    counts.data = np.ceil(10 * counts.data)
    assert counts.nnz > 2 * VALUES_PER_PASS  # several passes; the bad value sits in the last one
    matrix = (lambda m: m.toarray()) if dense else (lambda m: m)
    assert check_counts(matrix(counts), "X", chunk=250)
    for bad, message in ((-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")):
        broken = counts.copy()
        broken.data[-1] = bad
        with pytest.raises(ValueError, match=message):
            check_counts(matrix(broken), "X", chunk=250)
    broken = counts.copy()
    broken.data[-1] = 2.5
    assert not check_counts(matrix(broken), "X", chunk=250)


def test_views_and_duplicated_genes_are_refused_duplicated_cells_warned():
    adata = make_tissues(n_cells=60)
    with pytest.raises(ValueError, match=r"view of another AnnData.*adata.copy\(\)"):
        CellPLM.setup_anndata(adata[:30], layer="counts")
    adata.var_names = ["g0"] * 2 + list(adata.var_names[2:])
    with pytest.raises(ValueError, match=r"1 gene names occur more than once.*var_names_make_unique"):
        CellPLM.setup_anndata(adata, layer="counts")
    adata = make_tissues(n_cells=60)
    adata.obs_names = ["c"] * 60
    with pytest.warns(UserWarning, match="Cell names .* are not unique"):
        CellPLM.setup_anndata(adata, layer="counts")


def test_degenerate_data_trains_to_finite_embeddings():
    adata = make_tissues(n_cells=150)
    counts = adata.layers["counts"].toarray()
    counts[:, 0] = 0  # a gene that is zero everywhere
    counts[7] = 0  # a cell with no counts
    counts[adata.obs["sample"].to_numpy() == "s1"] = 0  # a whole batch without counts
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.obs["sample"] = adata.obs["sample"].astype(str)
    adata.obs.loc[adata.obs_names[0], "sample"] = "alone"  # a tissue of one cell
    model = train_small(
        adata, epochs=2, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial"
    )
    assert np.isfinite(model.get_latent_representation()).all()
    single = make_tissues(n_cells=60)[:, :1].copy()
    assert np.isfinite(train_small(single, layer="counts").get_latent_representation()).all()


def test_tissue_far_larger_than_the_context_is_tiled():
    adata = make_tissues(n_cells=600, n_samples=1, n_fovs=1)
    model = train_small(adata, layer="counts", spatial_key="spatial")
    index = tissue_data(model.adata_manager, 50).index
    assert index.n_units == 12 and index.unit_sizes.max() <= 50


def test_every_matrix_format_gives_the_same_latents(tmp_path):
    adata = make_tissues(n_cells=120)
    adata.X = adata.layers["counts"].copy()
    del adata.layers["counts"]
    scvi.settings.seed = 0
    model = train_small(adata, batch_key="sample", fov_key="fov", spatial_key="spatial")
    reference = model.get_latent_representation()
    dense = adata.X.toarray()
    formats = {
        "dense float32": dense.astype(np.float32),
        "dense int64": dense.astype(np.int64),
        "dense float64": dense.astype(np.float64),
        "csc": sp.csc_matrix(dense),
        "csr float64": sp.csr_matrix(dense.astype(np.float64)),
    }
    for name, matrix in formats.items():
        other = adata.copy()
        other.X = matrix
        np.testing.assert_allclose(model.get_latent_representation(other), reference, **TOL, err_msg=name)
    adata.write_h5ad(tmp_path / "data.h5ad")
    backed = ad.read_h5ad(tmp_path / "data.h5ad", backed="r")
    np.testing.assert_allclose(model.get_latent_representation(backed), reference, **TOL, err_msg="backed")


def test_other_genes_or_categories_after_training_are_refused(tmp_path):
    adata = make_tissues(n_cells=90)
    model = train_small(adata, layer="counts", batch_key="sample")
    fewer = adata[:, :30].copy()
    with pytest.raises(ValueError, match="[Nn]umber of vars|var_names|genes"):
        model.get_latent_representation(fewer)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"10 of the model's 40 genes are not in the data \(e.g. \['gene30'"):
        CellPLM.load(tmp_path / "m", adata=fewer)
    renamed = adata.copy()
    renamed.obs["sample"] = pd.Categorical(np.where(renamed.obs["sample"] == "s0", "new", "s1"))
    with pytest.raises(ValueError, match="new"):
        model.get_latent_representation(renamed)


def test_latents_do_not_depend_on_workers_or_budget():
    adata = make_tissues(n_cells=120)
    model = train_small(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    z = model.get_latent_representation()
    np.testing.assert_allclose(model.get_latent_representation(batch_size=50), z, **TOL)
    scvi.settings.dl_num_workers = 1
    try:
        np.testing.assert_allclose(model.get_latent_representation(), z, **TOL)
    finally:
        scvi.settings.dl_num_workers = 0


SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, scvi, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import make_tissues
    from cellplm_scvi import CellPLM
    scvi.settings.seed = 3
    adata = make_tissues(n_cells=120)
    CellPLM.setup_anndata(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    model = CellPLM(adata, max_cells_per_context=50, n_hidden=16, n_layers=1, n_heads=2, n_latent=4, n_components=3,
                    n_decoder_hidden=16)
    model.train(max_epochs=2, max_cells_per_batch=100, accelerator="cpu", enable_progress_bar=False)
    np.save(sys.argv[1], model.get_latent_representation())
    """
)


@pytest.mark.slow
def test_same_seed_same_latents_across_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    outputs = []
    for i in range(2):
        out = tmp_path / f"z{i}.npy"
        subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
        outputs.append(np.load(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])


# ---------------------------------------------------------------- inputs that were once misread


@pytest.fixture(scope="module")
def trained():
    """A model trained on coordinates stored as an array, with its data and latents."""
    scvi.settings.seed = 0
    adata = make_tissues(n_cells=120)
    model = train_small(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    return model, adata, model.get_latent_representation()


def test_genes_in_another_order_are_refused_with_the_fix(trained, tmp_path):
    model, adata, latents = trained
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    message = r"the model's 40 genes in another order .*adata = adata\[:, model_genes\].copy\(\)"
    with pytest.raises(ValueError, match=message):
        model.get_latent_representation(shuffled)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        CellPLM.load(tmp_path / "m", adata=shuffled)
    model_genes = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    np.testing.assert_allclose(
        model.get_latent_representation(shuffled[:, model_genes].copy()), latents, **TOL
    )


def test_extra_genes_are_refused_by_name(trained):
    model, adata, _ = trained
    extra = ad.concat(
        [adata, ad.AnnData(sp.csr_matrix((adata.n_obs, 2)), obs=adata.obs)], axis=1, merge="first"
    )
    extra.var_names = [*adata.var_names, "novel1", "novel2"]
    extra.layers["counts"] = extra.X.copy()
    with pytest.raises(
        ValueError, match=r"2 genes that the model was not trained on \(e.g. \['novel1', 'novel2'\]\)"
    ):
        model.get_latent_representation(extra)


def test_cli_embeds_genes_in_another_order_in_the_model_order(trained, tmp_path, capsys):
    from cellplm_scvi import cli

    model, adata, latents = trained
    model.save(tmp_path / "m")
    shuffled = make_tissues(n_cells=120)
    shuffled = shuffled[:, np.random.default_rng(1).permutation(shuffled.n_vars)].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    out = tmp_path / "out.h5ad"
    assert (
        cli.main(
            ["embed", str(tmp_path / "shuffled.h5ad"), "--model-dir", str(tmp_path / "m"), "--out", str(out)]
        )
        == 0
    )
    assert "in another order; embedding them in the model's order" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    assert list(written.var_names) == list(shuffled.var_names)  # the input's genes are kept as they were
    np.testing.assert_allclose(written.obsm["X_cellplm"], latents, **TOL)


def _latent_call(method):
    return {
        "get_latent_representation": lambda m, i: m.get_latent_representation(indices=i),
        "get_cluster_probabilities": lambda m, i: m.get_cluster_probabilities(indices=i),
        "get_normalized_expression": lambda m, i: m.get_normalized_expression(indices=i),
        "posterior_predictive_sample": lambda m, i: m.posterior_predictive_sample(indices=i),
        "get_elbo": lambda m, i: m.get_elbo(indices=i),
    }[method]


@pytest.mark.parametrize(
    "method",
    [
        "get_latent_representation",
        "get_cluster_probabilities",
        "get_normalized_expression",
        "posterior_predictive_sample",
        "get_elbo",
    ],
)
@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (np.ones(50, dtype=bool), r"boolean mask of indices needs one value per cell \(120\); got 50"),
        ([0.5, 1.7], r"integer positions or a boolean mask; got dtype float64"),
        ([[0, 1]], r"one-dimensional; got shape \(1, 2\)"),
        ([0, 120], r"must lie in \[0, 120\)"),
    ],
    ids=["short mask", "floats", "2-D", "out of range"],
)
def test_indices_numpy_would_refuse_are_refused(trained, method, indices, message):
    with pytest.raises(IndexError, match=message):
        _latent_call(method)(trained[0], indices)


def test_indices_as_a_full_mask_or_empty_are_read_as_numpy_would(trained):
    model, adata, latents = trained
    mask = np.arange(adata.n_obs) % 3 == 0
    np.testing.assert_allclose(model.get_latent_representation(indices=mask), latents[mask], **TOL)
    assert model.get_latent_representation(indices=[]).shape == (0, latents.shape[1])


def _with_duplicate_entries(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The same counts, each stored entry split in two entries of the same cell and gene."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    half = np.floor(matrix.data / 2)
    order = np.argsort(np.concatenate([rows, rows]), kind="stable")
    columns = np.concatenate([matrix.indices, matrix.indices])[order]
    values = np.concatenate([matrix.data - half, half])[order]
    indptr = np.concatenate([[0], np.cumsum(2 * np.diff(matrix.indptr))])
    return sp.csr_matrix((values, columns, indptr), shape=matrix.shape)


def test_duplicate_sparse_entries_add_up_and_the_matrix_is_left_alone(tmp_path):
    adata = make_tissues(n_cells=120)
    adata.X = adata.layers.pop("counts")
    model = train_small(adata, batch_key="sample", fov_key="fov", spatial_key="spatial")
    latents = model.get_latent_representation()
    duplicated = _with_duplicate_entries(adata.X)
    assert not duplicated.has_canonical_format
    np.testing.assert_array_equal(duplicated.toarray(), adata.X.toarray())
    other = adata.copy()
    other.X = duplicated
    stored = duplicated.data.copy(), duplicated.indices.copy()
    np.testing.assert_allclose(model.get_latent_representation(other), latents, **TOL)
    assert np.array_equal(other.X.data, stored[0]) and np.array_equal(other.X.indices, stored[1])
    other.write_h5ad(tmp_path / "duplicated.h5ad")
    backed = ad.read_h5ad(tmp_path / "duplicated.h5ad", backed="r")
    np.testing.assert_allclose(model.get_latent_representation(backed), latents, **TOL)


@pytest.mark.parametrize("trained_on", ["array", "DataFrame"])
def test_coordinates_as_an_array_or_a_dataframe_are_the_same(trained_on):
    def as_frame(adata, columns=("x", "y")):
        adata.obsm["spatial"] = pd.DataFrame(
            adata.obsm["spatial"], index=adata.obs_names, columns=list(columns)
        )
        return adata

    adata = make_tissues(n_cells=120)
    if trained_on == "DataFrame":
        as_frame(adata)
    model = train_small(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    latents = model.get_latent_representation()
    as_array = make_tissues(n_cells=120)
    for other in (as_array, as_frame(make_tissues(n_cells=120)), as_frame(make_tissues(n_cells=120), "uv")):
        np.testing.assert_allclose(model.get_latent_representation(other), latents, **TOL)


def test_an_anndata_without_cells_is_refused_up_front(trained):
    empty = make_tissues(n_cells=60)[:0].copy()
    with pytest.raises(ValueError, match="adata has 0 cells"):
        CellPLM.setup_anndata(empty, layer="counts", batch_key="sample")
    with pytest.raises(ValueError, match="adata has 0 cells"):
        trained[0].get_latent_representation(empty)
