"""The latent does not collapse: after a short training, many dimensions carry cells apart and the mixture is used."""

import numpy as np
import scvi

from cellplm_scvi import CellPLM
from cellplm_scvi.datasets import synthetic_spatial_tissue


def test_latent_stays_active_and_mixture_components_are_used_after_short_training():
    scvi.settings.seed = 0
    adata = synthetic_spatial_tissue(n_fovs=4, cells_per_fov=500)
    CellPLM.setup_anndata(adata, layer="counts", fov_key="fov", spatial_key="spatial")
    model = CellPLM(adata, max_cells_per_context=250)  # 8 contexts: 7 optimizer steps per epoch
    model.train(max_epochs=30, max_cells_per_batch=250, accelerator="cpu", enable_progress_bar=False)
    z = model.get_latent_representation()
    eigenvalues = np.linalg.eigvalsh(np.cov((z - z.mean(0)).T))
    participation_ratio = eigenvalues.sum() ** 2 / (eigenvalues**2).sum()
    active = int((z.var(0) > 0.01).sum())  # posterior means that vary across cells
    assignments = np.asarray(model.get_cluster_assignments())
    used = int((np.bincount(assignments, minlength=16) >= 0.01 * adata.n_obs).sum())
    # seen here: 32 active of 32, participation ratio 3.6, 4 components; collapsed runs had 0, -, 1
    assert active >= 16, active
    assert participation_ratio >= 2.0, participation_ratio
    assert used >= 3, used
