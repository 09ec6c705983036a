from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> ad.AnnData:
    """A real dataset from ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"{path.name} is not available (../shared/data missing)")
    return ad.read_h5ad(path)


#: A model small enough that a few epochs take well under a second.
TINY_MODEL = {
    "n_hidden": 16,
    "n_layers": 1,
    "n_heads": 2,
    "n_latent": 4,
    "n_components": 3,
    "n_decoder_hidden": 16,
}


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    torch.set_num_threads(1)
    yield


def make_tissues(
    n_cells: int = 240,
    n_genes: int = 40,
    n_samples: int = 2,
    n_fovs: int = 3,
    seed: int = 0,
    spatial: bool = True,
) -> ad.AnnData:
    """Small multi-sample, multi-FOV count data with coordinates and a cell-type signal."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    programs = rng.gamma(0.5, 2.0, size=(3, n_genes))
    mean = programs[types] * rng.lognormal(0, 0.3, size=(n_cells, 1))
    counts = rng.poisson(mean).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["sample"] = [f"s{i % n_samples}" for i in range(n_cells)]
    adata.obs["fov"] = [f"f{(i // n_samples) % n_fovs}" for i in range(n_cells)]
    adata.obs["cell_type"] = [f"t{t}" for t in types]
    if spatial:
        adata.obsm["spatial"] = rng.uniform(0, 500, size=(n_cells, 2))
    adata.layers["counts"] = adata.X.copy()
    return adata


@pytest.fixture
def tissues() -> ad.AnnData:
    return make_tissues()
