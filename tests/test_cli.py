from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellplm_scvi import cli
from cellplm_scvi.datasets import synthetic_spatial_tissue

SETUP_ARGS = ["--layer", "counts", "--fov-key", "fov", "--spatial-key", "spatial"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_error(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cellplm-scvi: error: ")
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    """A small two-FOV tissue written to disk."""
    adata = synthetic_spatial_tissue(
        n_fovs=2, cells_per_fov=60, n_genes=40, n_cell_types=3, n_niches=2, seed=1
    )
    path = tmp_path_factory.mktemp("data") / "tissue.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained_dir(small_h5ad, tmp_path_factory) -> Path:
    """A model trained for two epochs by ``cellplm-scvi train``."""
    model_dir = tmp_path_factory.mktemp("models") / "model"
    rc = cli.main(["train", str(small_h5ad), "--model-dir", str(model_dir), *SETUP_ARGS, "--epochs", "2"])
    assert rc == 0
    return model_dir


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("demo", ["--out", "--epochs", "--seed"]),
        (
            "train",
            [
                "--model-dir",
                "--layer",
                "--batch-key",
                "--fov-key",
                "--spatial-key",
                "--labels-key",
                "--epochs",
                "--preset",
                "--accelerator",
                "--seed",
            ],
        ),
        ("embed", ["--model-dir", "--out", "--obsm-key", "INPUT.h5ad"]),
    ],
)
def test_subcommand_help(capsys, command, expected):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cellplm-scvi {command}")
    for option in expected:
        assert option in out


def test_top_level_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "embed"):
        assert f"    {command}" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: cellplm-scvi" in capsys.readouterr().err


# --------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["demo", "--epochs", "abc"], ["argument --epochs: expected an integer, got 'abc'"]),
        (["demo", "--epochs", "0"], ["expected a positive integer, got '0'"]),
        (["demo", "--seed", "-1"], ["expected a non-negative integer"]),
        (["train", "x.h5ad"], ["the following arguments are required: --model-dir"]),
        (["embed", "x.h5ad", "--model-dir", "m"], ["required: --out"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, fragments):
    assert cli.main(argv) == 2
    _assert_one_line_error(capsys, *fragments)


def test_missing_input_file(capsys, tmp_path):
    rc = cli.main(["train", str(tmp_path / "absent.h5ad"), "--model-dir", str(tmp_path / "m")])
    assert rc == 2
    _assert_one_line_error(capsys, "absent.h5ad does not exist")
    assert not (tmp_path / "m").exists()


def test_unreadable_input_file(capsys, tmp_path):
    bogus = tmp_path / "bogus.h5ad"
    bogus.write_text("not an h5ad file\n")
    assert cli.main(["train", str(bogus), "--model-dir", str(tmp_path / "m")]) == 2
    _assert_one_line_error(capsys, "cannot read", "bogus.h5ad")


@pytest.mark.parametrize(
    ("option", "value", "fragments"),
    [
        (
            "--fov-key",
            "slide",
            [
                "tissue.h5ad: fov_key='slide' is not a column of adata.obs",
                "['fov', 'sample', 'cell_type', 'niche']",
            ],
        ),
        ("--batch-key", "donor", ["batch_key='donor' is not a column of adata.obs"]),
        ("--labels-key", "celltype", ["labels_key='celltype' is not a column of adata.obs"]),
        (
            "--spatial-key",
            "X_spatial",
            ["spatial_key='X_spatial' is not in adata.obsm", "available: ['spatial']"],
        ),
        ("--layer", "raw_counts", ["layer='raw_counts' is not in adata.layers", "available: ['counts']"]),
    ],
)
def test_train_missing_key(capsys, tmp_path, small_h5ad, option, value, fragments):
    model_dir = tmp_path / "model"
    assert cli.main(["train", str(small_h5ad), "--model-dir", str(model_dir), option, value]) == 2
    _assert_one_line_error(capsys, *fragments)
    assert not model_dir.exists()


def test_train_label_column_with_missing_values(capsys, tmp_path, small_h5ad):
    adata = ad.read_h5ad(small_h5ad)
    adata.obs["annotation"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[0, adata.obs.columns.get_loc("annotation")] = None
    path = tmp_path / "partly_annotated.h5ad"
    adata.write_h5ad(path)
    model_dir = tmp_path / "model"
    assert cli.main(["train", str(path), "--model-dir", str(model_dir), "--labels-key", "annotation"]) == 2
    _assert_one_line_error(capsys, "partly_annotated.h5ad: labels_key='annotation' has 1 missing values")
    assert not model_dir.exists()


def test_train_unknown_preset(capsys, tmp_path, small_h5ad):
    argv = ["train", str(small_h5ad), "--model-dir", str(tmp_path / "m"), "--preset", "cellplm-1t"]
    assert cli.main(argv) == 2
    _assert_one_line_error(capsys, "Unknown preset 'cellplm-1t'", "cellplm-85m")


@pytest.mark.parametrize(
    ("accelerator", "fragment"),
    [("bogus", "invalid accelerator name"), ("gpu", "No supported gpu backend found")],
)
def test_train_unavailable_accelerator(capsys, tmp_path, small_h5ad, accelerator, fragment):
    import torch

    if accelerator == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model_dir = tmp_path / "m"
    argv = ["train", str(small_h5ad), "--model-dir", str(model_dir), "--accelerator", accelerator]
    assert cli.main(argv) == 2
    _assert_one_line_error(capsys, f"cannot train with --accelerator {accelerator}", fragment)
    assert not model_dir.exists()


def test_train_refuses_non_empty_model_dir(capsys, tmp_path, small_h5ad):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "keep.txt").write_text("precious")
    assert cli.main(["train", str(small_h5ad), "--model-dir", str(model_dir)]) == 2
    _assert_one_line_error(capsys, "is not empty", "--overwrite")
    assert (model_dir / "keep.txt").read_text() == "precious"


def test_embed_refuses_to_overwrite_its_input(capsys, tmp_path, small_h5ad, trained_dir):
    before = _digest(small_h5ad)
    spellings = [small_h5ad, small_h5ad.parent / "." / ".." / small_h5ad.parent.name / small_h5ad.name]
    for output in spellings:
        rc = cli.main(["embed", "--model-dir", str(trained_dir), str(small_h5ad), "--out", str(output)])
        assert rc == 2
        _assert_one_line_error(capsys, "is the input file", "never overwritten")
    assert _digest(small_h5ad) == before


def test_embed_refuses_a_hard_link_to_its_input(capsys, tmp_path, small_h5ad, trained_dir):
    link = tmp_path / "link.h5ad"
    link.hardlink_to(small_h5ad)
    before = _digest(small_h5ad)
    assert cli.main(["embed", "--model-dir", str(trained_dir), str(small_h5ad), "--out", str(link)]) == 2
    _assert_one_line_error(capsys, "is the input file")
    assert _digest(small_h5ad) == before


def test_embed_without_a_saved_model(capsys, tmp_path, small_h5ad):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert (
        cli.main(["embed", "--model-dir", str(empty), str(small_h5ad), "--out", str(tmp_path / "o.h5ad")])
        == 2
    )
    _assert_one_line_error(capsys, "holds no saved model")
    assert not (tmp_path / "o.h5ad").exists()


def test_embed_input_missing_a_registered_key(capsys, tmp_path, small_h5ad, trained_dir):
    adata = ad.read_h5ad(small_h5ad)
    del adata.obs["fov"]
    stripped = tmp_path / "no_fov.h5ad"
    adata.write_h5ad(stripped)
    out = tmp_path / "out.h5ad"
    assert cli.main(["embed", "--model-dir", str(trained_dir), str(stripped), "--out", str(out)]) == 2
    _assert_one_line_error(capsys, "no_fov.h5ad: fov_key='fov' is not a column of adata.obs")
    assert not out.exists()


# ------------------------------------------------------------------------------------ round trip


def test_train_writes_a_loadable_model(capsys, trained_dir, small_h5ad):
    import cellplm_scvi as cps

    assert (trained_dir / "model.pt").is_file()
    registry = cps.CellPLM.load_registry(str(trained_dir))
    assert registry["setup_args"]["fov_key"] == "fov"
    assert registry["setup_args"]["spatial_key"] == "spatial"
    assert registry["setup_args"]["layer"] == "counts"
    model = cps.CellPLM.load(str(trained_dir), adata=ad.read_h5ad(small_h5ad))
    assert model.is_trained
    assert len(model.history["train_loss"]) == 2  # --epochs 2


def test_embed_round_trip(capsys, tmp_path, small_h5ad, trained_dir):
    import cellplm_scvi as cps

    before = _digest(small_h5ad)
    out = tmp_path / "embedded.h5ad"
    rc = cli.main(
        ["embed", "--model-dir", str(trained_dir), str(small_h5ad), "--out", str(out), "--obsm-key", "X_c"]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "cellplm-scvi: embedded 120 cells" in stdout
    assert f"cellplm-scvi: wrote {out}" in stdout

    assert _digest(small_h5ad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded.h5ad"]  # no temporary file left

    original = ad.read_h5ad(small_h5ad)
    result = ad.read_h5ad(out)
    assert list(result.obs_names) == list(original.obs_names)
    assert (result.layers["counts"] != original.layers["counts"]).nnz == 0
    assert "_scvi_uuid" not in result.uns

    model = cps.CellPLM.load(str(trained_dir), adata=original)
    embedding = result.obsm["X_c"]
    assert embedding.shape == (120, model.module.n_latent)
    assert np.isfinite(embedding).all()
    assert embedding.std(0).max() > 0  # not a constant
    np.testing.assert_allclose(embedding, model.get_latent_representation(), rtol=1e-4, atol=1e-5)

    if model.module.latent_kind == "gmm":
        clusters = result.obs["cellplm_cluster"]
        assert clusters.dtype == "category"
        expected = np.asarray(model.get_cluster_assignments()).astype(int)
        np.testing.assert_array_equal(clusters.astype(int).to_numpy(), expected)
    else:
        assert "cellplm_cluster" not in result.obs


def test_embed_in_bfloat16(tmp_path, small_h5ad, trained_dir):
    import cellplm_scvi as cps

    out = tmp_path / "embedded.h5ad"
    args = ["embed", "--model-dir", str(trained_dir), str(small_h5ad), "--out", str(out)]
    assert cli.main([*args, "--precision", "bf16-mixed"]) == 0
    embedding = ad.read_h5ad(out).obsm["X_cellplm"]
    exact = cps.CellPLM.load(str(trained_dir), adata=ad.read_h5ad(small_h5ad)).get_latent_representation()
    relative = np.linalg.norm(embedding - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert 0 < np.median(relative) < 0.05


def test_embed_replaces_an_existing_output_atomically(capsys, tmp_path, small_h5ad, trained_dir):
    out = tmp_path / "out.h5ad"
    out.write_text("old content")
    argv = ["embed", "--model-dir", str(trained_dir), str(small_h5ad), "--out", str(out)]
    assert cli.main(argv) == 0
    assert "X_cellplm" in ad.read_h5ad(out).obsm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


def test_failed_write_leaves_the_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "result.h5ad"
    target.write_text("previous result")
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))

    def broken_write(path, *args, **kwargs):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(adata, "write_h5ad", broken_write)
    with pytest.raises(OSError, match="disk full"):
        cli._write_h5ad_atomic(adata, target)
    assert target.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.h5ad"]


# ------------------------------------------------------------------------------------------ demo


@pytest.mark.slow
def test_demo_end_to_end(capsys, tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--epochs", "2", "--seed", "0"]) == 0
    stdout = capsys.readouterr().out
    assert "ARI" in stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    expected = {"pbmc68k": (700, ["bulk_labels"]), "spatial_tissue": (2000, ["cell_type", "niche"])}
    assert set(metrics["datasets"]) == set(expected)
    for name, (n_cells, label_keys) in expected.items():
        entry = metrics["datasets"][name]
        assert entry["n_cells"] == n_cells
        assert entry["train_seconds"] > 0 and entry["embed_seconds"] > 0
        assert set(entry["labels"]) == set(label_keys)
        for key in label_keys:
            for source in (entry["labels"][key], entry["baseline_pca"][key]):
                assert -0.5 <= source["ari"] <= 1 and 0 <= source["nmi"] <= 1
                assert source["resolution"] in [round(0.1 * i, 1) for i in range(1, 16)]
                assert source["ari_best_over_resolutions"] >= source["ari"]
                assert -1 <= source["silhouette"] <= 1
        # the PCA baseline recovers the simulated / annotated cell types reasonably
        assert entry["baseline_pca"][label_keys[0]]["ari"] > 0.3

        adata = ad.read_h5ad(out / f"{name}.h5ad")
        assert adata.n_obs == n_cells
        assert adata.obsm["X_cellplm"].shape[0] == n_cells
        assert np.isfinite(adata.obsm["X_cellplm"]).all()
        assert adata.obs["cellplm_cluster"].nunique() == entry["labels"][label_keys[0]]["n_clusters"]
        assert adata.obsm["X_umap"].shape == (n_cells, 2)
        png = (out / f"{name}_umap.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert (out / f"{name}_model" / "model.pt").is_file()
