"""Training on the real datasets of ../shared/data (skipped where they are absent)."""

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
from conftest import shared_dataset

from cellplm_scvi import CellPLM

pytestmark = pytest.mark.slow
SMALL = {
    "n_hidden": 32,
    "n_layers": 1,
    "n_heads": 4,
    "n_latent": 10,
    "n_components": 8,
    "n_decoder_hidden": 64,
}


def _snapshot(adata):
    return {
        "X": adata.X.copy(),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
    }


def _assert_same_matrix(a, b):
    if sp.issparse(a):
        assert sp.issparse(b) and a.format == b.format and (a != b).nnz == 0 and a.dtype == b.dtype
    else:
        np.testing.assert_array_equal(a, b)


def test_validation_elbo_decreases_on_pancreas_and_user_data_is_untouched():
    adata = shared_dataset("pancreas_endocrinogenesis_mouse")
    before = _snapshot(adata)
    scvi.settings.seed = 0
    CellPLM.setup_anndata(adata, layer="counts")
    model = CellPLM(adata, max_cells_per_context=1000, **SMALL)
    model.train(max_epochs=6, max_cells_per_batch=1000, accelerator="cpu", enable_progress_bar=False)
    elbo = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    assert len(elbo) == 6
    assert elbo[-1] < 0.9 * elbo[0], elbo
    assert np.all(np.diff(elbo[:3]) < 0), elbo
    z = model.get_latent_representation()
    model.get_normalized_expression(indices=np.arange(50))
    assert np.isfinite(z).all()

    after = _snapshot(adata)
    _assert_same_matrix(before["X"], after["X"])
    for key in before["layers"]:
        _assert_same_matrix(before["layers"][key], after["layers"][key])
    registry_columns = [c for c in after["obs"].columns if c.startswith("_scvi")]
    assert after["obs"].drop(columns=registry_columns).equals(before["obs"])
    assert after["var"].equals(before["var"])
    assert before["obsm"].keys() == after["obsm"].keys()
    for key in before["obsm"]:
        np.testing.assert_array_equal(before["obsm"][key], after["obsm"][key])


def test_spatial_training_on_osmfish_with_and_without_positions():
    adata = shared_dataset("osmfish_mouse_sscortex")
    adata = adata[adata.obs["valid"].astype(bool)].copy()
    scvi.settings.seed = 0
    CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial")
    latents = {}
    for use_pe in (True, False):
        model = CellPLM(adata, use_positional_encoding=use_pe, max_cells_per_context=1500, **SMALL)
        model.train(max_epochs=2, max_cells_per_batch=1500, accelerator="cpu", enable_progress_bar=False)
        latents[use_pe] = model.get_latent_representation()
        assert model.history["elbo_validation"].shape[0] == 2
    assert all(np.isfinite(z).all() for z in latents.values())
    assert not np.allclose(latents[True], latents[False])
