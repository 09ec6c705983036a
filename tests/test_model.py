import anndata as ad
import lightning.pytorch as pl
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from conftest import TINY_MODEL, make_tissues

from cellplm_scvi import CellPLM
from cellplm_scvi._constants import BATCH_KEYS

SMALL = {**TINY_MODEL, "n_latent": 6, "n_components": 4}
TOL = {"atol": 1e-5, "rtol": 1e-4}


def setup(adata, spatial=True):
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        fov_key="fov",
        spatial_key="spatial" if spatial else None,
        labels_key="cell_type",
    )


def fit(adata, epochs=2, seed=0, **kwargs):
    scvi.settings.seed = seed
    model = CellPLM(
        adata, max_cells_per_context=kwargs.pop("max_cells_per_context", 30), **{**SMALL, **kwargs}
    )
    model.train(max_epochs=epochs, max_cells_per_batch=90, accelerator="cpu", enable_progress_bar=False)
    return model


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    torch.set_num_threads(1)
    adata = make_tissues()
    setup(adata)
    return fit(adata), adata


def test_shapes_dtypes_and_history(trained):
    model, adata = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 6) and z.dtype == np.float32 and np.isfinite(z).all()
    assert {"elbo_train", "elbo_validation", "reconstruction_loss_validation", "kl_weight"} <= set(
        model.history
    )
    assert len(model.history["elbo_validation"]) == 2
    probs = model.get_cluster_probabilities()
    assert probs.shape == (adata.n_obs, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    clusters = model.get_cluster_assignments()
    assert len(clusters) == adata.n_obs and set(clusters.categories) == {0, 1, 2, 3}
    np.testing.assert_array_equal(np.asarray(clusters), probs.argmax(1))
    assert "CellPLM model" in model.summary_string and "latent=gmm" in model.summary_string


def test_split_is_by_tissue(trained):
    model, adata = trained
    tissue = adata.obs["sample"].astype(str) + "/" + adata.obs["fov"].astype(str)
    assert (
        set(tissue.iloc[model.train_indices]).isdisjoint(tissue.iloc[model.validation_indices])
        or model.max_cells_per_context < tissue.value_counts().max()
    )
    assert len(model.train_indices) + len(model.validation_indices) == adata.n_obs


def test_every_training_cell_once_per_epoch(trained):
    model, adata = trained
    splitter = CellPLM._data_splitter_cls(
        model.adata_manager, max_cells_per_batch=90, max_cells_per_context=30
    )
    loader = splitter.train_dataloader()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        seen = np.concatenate([b[BATCH_KEYS.OBS_INDEX].numpy() for b in batches])
        np.testing.assert_array_equal(np.sort(seen), np.sort(splitter.train_idx))
        assert all(len(b[BATCH_KEYS.OBS_INDEX]) <= 90 for b in batches)


def test_latents_repeatable_and_independent_of_batch_size_and_indices(trained):
    model, adata = trained
    full = model.get_latent_representation()
    np.testing.assert_array_equal(full, model.get_latent_representation())
    np.testing.assert_allclose(full, model.get_latent_representation(batch_size=30), **TOL)
    idx = np.array([200, 3, 57, 3, 120])
    np.testing.assert_allclose(model.get_latent_representation(indices=idx), full[idx], **TOL)


def test_embedding_never_reads_the_measured_genes(monkeypatch):
    from cellplm_scvi.data import _token_sets, measured_genes, tissue_data

    reads = []

    def counted(*args, **kwargs):
        reads.append(1)
        return measured_genes(*args, **kwargs)

    monkeypatch.setattr(_token_sets, "measured_genes", counted)
    adata = make_tissues(n_cells=120)
    setup(adata)
    model = CellPLM(adata, max_cells_per_context=30, **SMALL)
    batches = list(model._context_batches(adata, np.arange(adata.n_obs), None))
    assert batches and all(BATCH_KEYS.MEASURED not in b and BATCH_KEYS.MEASURED_ROW not in b for b in batches)
    model.is_trained_ = True
    model.get_latent_representation()
    assert not reads  # embedding needs no measured-gene table
    model.train(max_epochs=1, max_cells_per_batch=90, accelerator="cpu", enable_progress_bar=False)
    assert reads  # training reads it
    data = tissue_data(model.adata_manager, 30)
    codes = np.asarray(adata.obs["_scvi_batch"])
    np.testing.assert_array_equal(data.measured, measured_genes(adata.layers["counts"], codes, data.n_batch))


class RecordModuleMode(pl.Callback):
    """Whether the module was in training mode at each training step."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.module.training)


def test_training_again_after_embedding_runs_in_training_mode():
    adata = make_tissues()
    setup(adata)
    model = fit(adata, epochs=1)
    model.get_latent_representation()
    assert not model.module.training  # scvi-tools leaves it in evaluation mode
    recorder = RecordModuleMode()
    model.train(
        max_epochs=1,
        max_cells_per_batch=90,
        accelerator="cpu",
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    assert recorder.modes and all(recorder.modes)


def test_bf16_latents_close_to_float32(trained):
    model, _ = trained
    full = model.get_latent_representation()
    half = model.get_latent_representation(precision="bf16-mixed")
    assert half.dtype == np.float32 and half.shape == full.shape
    relative = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    assert 0 < np.median(relative) < 0.05  # bfloat16 was used, and stayed close
    with pytest.raises(ValueError, match="precision must be"):
        model.get_latent_representation(precision="16")


def test_row_permutation_permutes_latents(trained):
    model, adata = trained
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    permuted = adata[perm].copy()
    np.testing.assert_allclose(
        model.get_latent_representation(permuted), model.get_latent_representation()[perm], **TOL
    )


def test_tissue_alone_or_packed_and_other_tissues_changed(trained):
    model, adata = trained
    full = model.get_latent_representation()
    tissue = (adata.obs["sample"].astype(str) + "/" + adata.obs["fov"].astype(str)).to_numpy()
    a = tissue == tissue[0]
    alone = adata[a].copy()
    np.testing.assert_allclose(model.get_latent_representation(alone), full[a], **TOL)
    changed = adata.copy()
    other = np.flatnonzero(~a)
    changed.layers["counts"][other] = changed.layers["counts"][other] * 3
    z = model.get_latent_representation(changed)
    np.testing.assert_allclose(z[a], full[a], **TOL)
    assert not np.allclose(z[~a], full[~a], atol=1e-3)


def test_positional_encoding_sees_relative_positions_only(trained):
    model, adata = trained
    full = model.get_latent_representation()
    shifted = adata.copy()
    shifted.obsm["spatial"] = adata.obsm["spatial"] * 2.0 + 1000.0  # same positions within each tissue
    np.testing.assert_allclose(model.get_latent_representation(shifted), full, **TOL)
    squeezed = adata.copy()
    squeezed.obsm["spatial"] = adata.obsm["spatial"] ** 2
    assert not np.allclose(model.get_latent_representation(squeezed), full, atol=1e-4)


def test_without_coordinates_positions_do_not_matter():
    adata = make_tissues()
    setup(adata, spatial=False)
    model = fit(adata, epochs=1)
    assert CellPLM.setup_anndata is not None and "spatial" not in model.adata_manager.data_registry
    z = model.get_latent_representation()
    moved = adata.copy()
    moved.obsm["spatial"] = -adata.obsm["spatial"]
    np.testing.assert_allclose(model.get_latent_representation(moved), z, **TOL)


def test_same_seed_same_weights_and_latents():
    adata = make_tissues(n_cells=120)
    setup(adata)
    a, b = fit(adata, epochs=2, seed=5), fit(adata, epochs=2, seed=5)
    for (name, pa), pb in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    c = fit(adata, epochs=2, seed=6)
    assert not np.allclose(a.get_latent_representation(), c.get_latent_representation())


def test_save_load_roundtrip(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "m", overwrite=True, save_anndata=False)
    loaded = CellPLM.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert loaded.max_cells_per_context == 30
    without = CellPLM.load(tmp_path / "m", adata=False)
    fresh = adata.copy()
    np.testing.assert_allclose(
        without.get_latent_representation(fresh), model.get_latent_representation(), **TOL
    )
    model.view_anndata_setup()


def test_normalized_expression_and_de(trained):
    model, adata = trained
    ne = model.get_normalized_expression(library_size=1e4)
    assert isinstance(ne, pd.DataFrame) and ne.shape == adata.shape
    assert list(ne.index) == list(adata.obs_names) and list(ne.columns) == list(adata.var_names)
    np.testing.assert_allclose(ne.sum(1), 1e4, rtol=1e-4)
    part = model.get_normalized_expression(indices=[5, 1], gene_list=["gene3", "gene0"], library_size=1e4)
    np.testing.assert_allclose(part.to_numpy(), ne.iloc[[5, 1]][["gene3", "gene0"]].to_numpy(), rtol=1e-4)
    as_s0 = model.get_normalized_expression(transform_batch="s0", return_numpy=True)
    as_s1 = model.get_normalized_expression(transform_batch="s1", return_numpy=True)
    assert not np.allclose(as_s0, as_s1)
    lib = model.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(lib.sum(1), np.asarray(adata.layers["counts"].sum(1)).ravel(), rtol=1e-4)
    samples = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert samples.shape == (3, *adata.shape)
    de = model.differential_expression(groupby="cell_type", mode="change")
    assert {"proba_de", "bayes_factor", "lfc_mean", "scale1", "scale2", "comparison"} <= set(de.columns)
    assert set(de["comparison"]) == {"t0 vs Rest", "t1 vs Rest", "t2 vs Rest"}
    pp = model.posterior_predictive_sample(indices=[0, 1], n_samples=2)
    assert pp.shape == (2, adata.n_vars, 2) and np.all(pp == np.round(pp)) and (pp >= 0).all()
    assert np.isfinite(float(model.get_elbo()))


def test_bad_train_and_query_arguments(trained):
    model, adata = trained
    with pytest.raises(ValueError, match="a whole tissue unit must fit one minibatch"):
        model.train(max_epochs=1, max_cells_per_batch=10)
    fresh = make_tissues(n_cells=30)
    setup(fresh)
    other = CellPLM(fresh, latent="normal", **{k: v for k, v in SMALL.items() if k != "n_components"})
    with pytest.raises(ValueError, match="Cluster probabilities need a mixture latent"):
        other.get_cluster_assignments()
    with pytest.raises(IndexError, match="indices must lie in"):
        model.get_latent_representation(indices=[adata.n_obs])
    with pytest.raises(ValueError, match="Unknown preset"):
        CellPLM(fresh, preset="huge")
    with pytest.raises(ValueError, match="max_cells_per_context must be a positive"):
        CellPLM(fresh, max_cells_per_context=0)


def test_preset_reproduces_the_released_sizes():
    adata = make_tissues(n_cells=20)
    setup(adata)
    model = CellPLM(adata, preset="cellplm-85m")
    m = model.module
    assert m.embedder.genes.embedding_dim == 1024 and len(m.encoder.layers) == 4 and m.n_latent == 512
    assert m.encoder.layers[0].attention.n_heads == 8 and m.latent.component_means.shape == (16, 512)
    assert m.decoder.head.in_features == 1024


def test_mudata_setup_trains_and_embeds():
    adata = make_tissues(n_cells=120)
    mdata = md.MuData({"rna": adata, "other": ad.AnnData(np.ones((adata.n_obs, 2)), obs=adata.obs[[]])})
    CellPLM.setup_mudata(
        mdata,
        rna_layer="counts",
        batch_key="sample",
        fov_key="fov",
        spatial_key="spatial",
        modalities={"rna_layer": "rna", "batch_key": "rna", "fov_key": "rna", "spatial_key": "rna"},
    )
    model = fit(mdata, epochs=1)
    z = model.get_latent_representation()
    assert z.shape == (120, 6) and np.isfinite(z).all()
    with pytest.raises(ValueError, match="modalities="):
        CellPLM.setup_mudata(mdata, rna_layer="counts")


def test_early_stopping_and_load_without_data(tmp_path):
    adata = make_tissues(n_cells=120)
    setup(adata)
    model = CellPLM(adata, max_cells_per_context=30, **SMALL)
    model.train(
        max_epochs=60,
        max_cells_per_batch=60,
        accelerator="cpu",
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta=1e3,
        enable_progress_bar=False,
    )
    assert len(model.history["elbo_train"]) == 3  # the huge min_delta stops it after patience + 1 epochs
    model.save(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m")
    assert loaded.adata is None and loaded.is_trained
    np.testing.assert_allclose(
        loaded.get_latent_representation(adata.copy()), model.get_latent_representation(), **TOL
    )
