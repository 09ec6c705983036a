"""Write ``saved_model_0.1.0/``: a model folder saved by cellplm-scvi 0.1.0, and its latents.

``tests/test_model_files.py`` checks that folders written by earlier releases still load (with the
safe reader) and give the same embeddings. Run from the repository root with the release checked
out: ``python tests/data/make_saved_model.py``.
"""

import sys
from pathlib import Path

import numpy as np
import scvi
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import TINY_MODEL, make_tissues  # noqa: E402

from cellplm_scvi import CellPLM  # noqa: E402

if __name__ == "__main__":
    scvi.settings.seed = 0
    torch.set_num_threads(1)
    adata = make_tissues(n_cells=120)
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        fov_key="fov",
        spatial_key="spatial",
        labels_key="cell_type",
    )
    model = CellPLM(adata, max_cells_per_tissue=50, **TINY_MODEL)
    model.train(max_epochs=2, max_cells_per_batch=100, accelerator="cpu", enable_progress_bar=False)
    out = HERE / "saved_model_0.1.0"
    model.save(out, overwrite=True)
    np.save(out / "latent.npy", model.get_latent_representation())
