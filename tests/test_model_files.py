"""Saved model folders are read without running code from them, and damaged ones are named."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_tissues

from cellplm_scvi import CellPLM, cli
from cellplm_scvi.model import ModelFileError, read_model_file

TRAIN = {"max_cells_per_batch": 100, "accelerator": "cpu", "enable_progress_bar": False}


class WritesMarker:
    """Unpickling this object runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model saved to a folder, its data (written to an .h5ad too) and its latents."""
    adata = make_tissues(n_cells=120)
    CellPLM.setup_anndata(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    model = CellPLM(adata, max_cells_per_context=50, **TINY_MODEL)
    model.train(max_epochs=1, **TRAIN)
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save(folder)
    h5ad = folder.parent / "data.h5ad"
    make_tissues(n_cells=120).write_h5ad(h5ad)
    return folder, h5ad, model.get_latent_representation()


@pytest.fixture(scope="module")
def saved_by_0_1_0(tmp_path_factory):
    """A folder as release 0.1.0 wrote it, and its latents.

    0.1.0 saved with the same writer (scvi-tools' ``save``); its decoder added the batch to ``z``
    only, and its init parameters held ``max_cells_per_tissue`` and no ``batch_in_decoder``
    (what its ``model.pt`` holds, read from a folder that 0.1.0 wrote).
    """
    adata = make_tissues(n_cells=120)
    CellPLM.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        fov_key="fov",
        spatial_key="spatial",
        labels_key="cell_type",
    )
    model = CellPLM(adata, max_cells_per_context=50, batch_in_decoder="latent", **TINY_MODEL)
    model.train(max_epochs=2, **TRAIN)
    folder = tmp_path_factory.mktemp("release") / "model"
    model.save(folder)
    content = torch.load(folder / "model.pt", weights_only=False)
    content["attr_dict"]["init_params_"] = {
        "kwargs": {"module_kwargs": dict(TINY_MODEL)},
        "non_kwargs": {"preset": None, "max_cells_per_tissue": 50},
    }
    torch.save(content, folder / "model.pt")
    return folder, model.get_latent_representation()


def test_a_folder_saved_by_release_0_1_0_loads_with_the_same_latents(saved_by_0_1_0):
    folder, latents = saved_by_0_1_0
    with pytest.warns(FutureWarning, match="max_cells_per_context"):
        model = CellPLM.load(folder, adata=make_tissues(n_cells=120))
    np.testing.assert_allclose(model.get_latent_representation(), latents, atol=1e-5)
    assert CellPLM.load_registry(folder)["setup_args"]["labels_key"] == "cell_type"


def test_save_and_load_give_the_same_latents(saved, tmp_path):
    folder, _, latents = saved
    model = CellPLM.load(folder, adata=make_tissues(n_cells=120))
    np.testing.assert_array_equal(model.get_latent_representation(), latents)


def _with_payload(folder: Path, target: Path, marker: Path) -> Path:
    """A copy of a saved model folder whose ``model.pt`` also holds an object that runs code when read."""
    shutil.copytree(folder, target)
    content = torch.load(folder / "model.pt", weights_only=False)
    content["attr_dict"]["history_"] = WritesMarker(marker)
    torch.save(content, target / "model.pt")
    return target


@pytest.mark.parametrize("reader", ["load", "load_registry", "read_model_file"])
def test_a_model_file_that_would_run_code_is_refused_from_python(saved, tmp_path, reader):
    marker = tmp_path / "marker"
    crafted = _with_payload(saved[0], tmp_path / "crafted", marker)
    read = {
        "load": lambda: CellPLM.load(crafted, adata=make_tissues(n_cells=120)),
        "load_registry": lambda: CellPLM.load_registry(crafted),
        "read_model_file": lambda: read_model_file(crafted / "model.pt"),
    }[reader]
    with pytest.raises(ModelFileError, match=r"model.pt was refused: reading it would call builtins.exec"):
        read()
    assert not marker.exists()


def test_a_model_file_that_would_run_code_is_refused_by_the_cli(saved, tmp_path, capsys):
    folder, h5ad, _ = saved
    marker = tmp_path / "marker"
    crafted = _with_payload(folder, tmp_path / "crafted", marker)
    out = tmp_path / "out.h5ad"
    assert cli.main(["embed", str(h5ad), "--model-dir", str(crafted), "--out", str(out)]) == cli.USAGE_ERROR
    assert not marker.exists()
    assert not out.exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("cellplm-scvi: error: ")
    assert "refused" in error[0] and "could run code" in error[0]


def _truncated(content: bytes) -> bytes:
    return content[: len(content) // 2]


@pytest.mark.parametrize(
    "damage",
    [lambda content: b"", lambda content: b"not a model " * 20, _truncated],
    ids=["empty", "text", "truncated"],
)
def test_a_damaged_model_file_is_named_in_python_and_in_the_cli(saved, tmp_path, capsys, damage):
    folder, h5ad, _ = saved
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / "model.pt").write_bytes(damage((folder / "model.pt").read_bytes()))
    message = r"model.pt is damaged or is not a saved CellPLM model .*Re-save the model"
    with pytest.raises(ModelFileError, match=message):
        CellPLM.load(damaged, adata=make_tissues(n_cells=120))
    with pytest.raises(ModelFileError, match=message):
        CellPLM.load_registry(damaged)
    out = tmp_path / "out.h5ad"
    assert cli.main(["embed", str(h5ad), "--model-dir", str(damaged), "--out", str(out)]) == cli.USAGE_ERROR
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "is damaged or is not a saved CellPLM model" in error[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_model_file_without_a_model_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="holds no model_state_dict, attr_dict and registry"):
        CellPLM.load(tmp_path, adata=False)


def test_a_training_checkpoint_that_would_run_code_is_refused_on_resume(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": WritesMarker(marker)}, tmp_path / "last.ckpt")
    adata = make_tissues(n_cells=120)
    CellPLM.setup_anndata(adata, layer="counts", batch_key="sample")
    model = CellPLM(adata, max_cells_per_context=50, **TINY_MODEL)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        model.train(max_epochs=1, ckpt_path=str(tmp_path / "last.ckpt"), **TRAIN)
    assert not marker.exists()


def test_renamed_arguments_of_0_1_0_keep_working_with_a_warning(saved_by_0_1_0):
    with pytest.warns(FutureWarning, match="max_cells_per_tissue is now called max_cells_per_context"):
        model = CellPLM.load(saved_by_0_1_0[0], adata=make_tissues(n_cells=120))
    assert model.max_cells_per_context == 50
    assert model.module.decoder.batch_injection == "latent"  # 0.1.0 models keep z + b
    adata = make_tissues(n_cells=60)
    CellPLM.setup_anndata(adata, layer="counts")
    with pytest.warns(FutureWarning, match="max_cells_per_context"):
        assert CellPLM(adata, max_cells_per_tissue=30, **TINY_MODEL).max_cells_per_context == 30
