"""Loading the original CellPLM checkpoints, with numerical parity to the reference implementation."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from cellplm_scvi import CellPLM, CellPLMModule
from cellplm_scvi.pretrained import CellPLMCheckpoint, load_released_weights, module_kwargs, read_checkpoint

GENES = [f"ENSG{i:011d}" for i in range(3, 3 + 60)]
TINY = {
    "enc_mod": "flowformer",
    "enc_hid": 32,
    "enc_layers": 2,
    "enc_head": 4,
    "post_latent_dim": 8,
    "dec_mod": "nbmlp",
    "dec_hid": 32,
    "dec_layers": 2,
    "out_dim": len(GENES),
    "batch_num": 6,
    "dataset_num": 3,
    "model_dropout": 0.2,
    "norm": "groupnorm",
    "num_clusters": 4,
    "cat_pe": False,
    "lamda": 5.0,
    "w_li": 5.0,
    "w_en": 5.0,
    "mask_node_rate": 0.75,
    "mask_feature_rate": 0.25,
    "drop_node_rate": 0.3,
    "dae": True,
}


def reference_model(layout: str, config: dict = TINY):
    """The reference OmicsFormer at a tiny configuration, with random weights."""
    cellformer = pytest.importorskip("CellPLM.model.cellformer", reason="reference CellPLM is not installed")
    torch.manual_seed(0)
    model = cellformer.OmicsFormer(**{**config, "latent_mod": layout, "gene_list": GENES})
    with torch.no_grad():  # move every weight off its default so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_checkpoint(model, folder: Path, prefix: str, config: dict = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}.config.json").write_text(json.dumps({**config, "gene_list": GENES}))
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, folder / f"{prefix}.best.ckpt")
    return folder / prefix


def query_data(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = list(rng.permutation(GENES)[:40]) + ["ENSG99999999999", "NOT_A_GENE"]
    counts = rng.poisson(1.5, size=(70, len(genes))).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(70)]
    adata.obs["sample"] = np.where(np.arange(70) < 30, "s0", "s1")
    return adata


def reference_outputs(ref, adata: ad.AnnData, layout: str, batch_ids: dict, dataset_id: int) -> dict:
    """Latents and NB means of the reference for each tissue (= sample) run alone."""
    from CellPLM.utils.data import XDict  # noqa: F401  (only to fail early if the package is broken)

    kept = [g for g in adata.var_names if g in GENES]
    sub = adata[:, kept]
    z_all, mean_all = np.zeros((adata.n_obs, TINY["post_latent_dim"])), np.zeros((adata.n_obs, len(kept)))
    with torch.no_grad():
        for sample in ("s0", "s1"):
            cells = np.flatnonzero(adata.obs["sample"].to_numpy() == sample)
            x = torch.tensor(sub.X[cells].toarray())
            x_dict = {"x_seq": x.to_sparse(), "coord": torch.zeros(len(cells), 2)}
            x_dict["h"] = ref.embedder(x_dict, kept)
            x_dict["h"] = ref.encoder(x_dict)["hidden"]
            h = ref.pre_latent_norm(x_dict)
            if layout == "vae":
                x_dict["h"] = h
                z, _ = ref.latent(x_dict)
            else:
                inference = ref.latent.layers[1].inference
                logits = inference.inference_qyx[0].logits(h)
                y = F.one_hot(logits.argmax(-1), TINY["num_clusters"]).float()
                z, _, _ = inference.qzxy(h, y)
            x_dict["h"] = z
            x_dict["batch"] = torch.full((len(cells),), batch_ids[sample])
            x_dict["dataset"] = torch.full((len(cells),), dataset_id)
            mean = ref.decoder(x_dict)["mean"][:, x_dict["input_gene_mask"]]
            mean = mean * x.sum(1, keepdim=True) / mean.sum(1, keepdim=True)
            z_all[cells], mean_all[cells] = z.numpy(), mean.numpy()
    return {"z": z_all, "mean": mean_all, "kept": kept}


@pytest.mark.parametrize(("layout", "ours"), [("vae", "normal"), ("gmvae", "released_gmm")])
def test_parity_with_the_reference(tmp_path, layout, ours):
    ref = reference_model(layout)
    prefix = save_checkpoint(ref, tmp_path, f"tiny_{layout}")
    adata = query_data()
    batch_ids, dataset_id = {"s0": 2, "s1": 5}, 1
    with pytest.warns(UserWarning, match="2 of 42 genes are not in the checkpoint's gene list"):
        model = CellPLM.from_cellplm_checkpoint(
            adata,
            prefix,
            batch_key="sample",
            pretrained_batch_ids=batch_ids,
            pretrained_dataset_id=dataset_id,
        )
    assert model.module.latent_kind == ours
    assert list(model.adata.var_names) == [g for g in adata.var_names if g in GENES]
    expected = reference_outputs(ref, adata, layout, batch_ids, dataset_id)
    z = model.get_latent_representation()
    assert np.abs(z - expected["z"]).max() < 1e-5
    mean = model.get_normalized_expression(library_size="latent", return_numpy=True)
    assert np.abs(mean - expected["mean"]).max() < 1e-5 * max(1.0, np.abs(expected["mean"]).max())
    np.testing.assert_array_equal(z, model.get_latent_representation())  # deterministic, no Gumbel noise
    assert "missing: none, unexpected: none" in model.checkpoint_report_


def test_fine_tuning_continues_from_the_weights_and_saves(tmp_path):
    ref = reference_model("vae")
    prefix = save_checkpoint(ref, tmp_path, "tiny")
    adata = query_data()
    model = CellPLM.from_cellplm_checkpoint(
        adata, (f"{prefix}.config.json", f"{prefix}.best.ckpt"), batch_key="sample"
    )
    table = model.module.decoder.batch_covariates[0][0].weight.detach().clone()
    released_rows = ref.state_dict()["decoder.covariate_layers.0.batch.0.weight"]
    torch.testing.assert_close(
        table, released_rows.mean(0).expand(2, -1)
    )  # new batches start at the mean row
    before = model.get_latent_representation()
    model.train(max_epochs=2, max_cells_per_batch=4000, accelerator="cpu", enable_progress_bar=False)
    after = model.get_latent_representation()
    assert 0 < np.abs(after - before).max() < 10 * np.abs(before).max()
    model.save(tmp_path / "tuned")
    loaded = CellPLM.load(tmp_path / "tuned", adata=model.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), after)


def test_released_85m_state_dict_loads_without_missing_or_unexpected_keys():
    config_path = (
        Path(__file__).resolve().parents[1].parent
        / "shared"
        / "reference"
        / "cellplm_20230926_85M.config.json"
    )
    if not config_path.exists():
        pytest.skip("the released configuration is not available")
    config = json.loads(config_path.read_text())
    cellformer = pytest.importorskip("CellPLM.model.cellformer", reason="reference CellPLM is not installed")
    ref = cellformer.OmicsFormer(**config)
    checkpoint = CellPLMCheckpoint(config, ref.state_dict())
    assert checkpoint.layout == "released_gmm"
    rows = list(range(0, 19374, 97))
    module = CellPLMModule(len(rows), 3, **module_kwargs(checkpoint, rows, use_positional_encoding=False))
    report = load_released_weights(module, checkpoint, [None, 7, None])
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == {
        "embedder.norm0.weight",
        "embedder.norm0.bias",
        "embedder.pe_enc.pe_enc.weight",
        "embedder.pe_enc.missing_pe",
    }
    assert len(report.loaded) + len(report.ignored) == len(ref.state_dict())
    torch.testing.assert_close(
        module.decoder.batch_covariates[0][0].weight[1],
        ref.state_dict()["decoder.covariate_layers.0.batch.0.weight"][7],
    )


def test_gene_alignment_errors(tmp_path):
    ref = reference_model("vae")
    prefix = save_checkpoint(ref, tmp_path, "tiny")
    symbols = query_data()
    symbols.var_names = [f"GENE{i}" for i in range(symbols.n_vars)]
    with pytest.raises(ValueError, match="None of the 42 genes in adata.var_names .* human Ensembl"):
        CellPLM.from_cellplm_checkpoint(symbols, prefix)
    with_ids = query_data()
    with_ids.var["ensembl"] = [f"{g}.7" for g in with_ids.var_names]  # versioned IDs
    with_ids.var_names = [f"GENE{i}" for i in range(with_ids.n_vars)]
    with pytest.warns(UserWarning, match="2 of 42 genes"):
        model = CellPLM.from_cellplm_checkpoint(with_ids, prefix, gene_id_key="ensembl")
    assert model.adata.n_vars == 40
    with pytest.raises(KeyError, match="gene_id_key='nope'"):
        CellPLM.from_cellplm_checkpoint(with_ids, prefix, gene_id_key="nope")


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")
    (tmp_path / "bad.config.json").write_text(json.dumps({"gene_list": GENES}))
    (tmp_path / "bad.best.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="may be truncated"):
        read_checkpoint(tmp_path / "bad")
    torch.save({"weights": {}}, tmp_path / "bad.best.ckpt")
    with pytest.raises(ValueError, match="no 'model_state_dict'"):
        read_checkpoint(tmp_path / "bad")
    torch.save({"model_state_dict": {"encoder.x": torch.zeros(1)}}, tmp_path / "bad.best.ckpt")
    with pytest.raises(ValueError, match="neither the Gaussian-mixture"):
        read_checkpoint(tmp_path / "bad")


def test_unexpected_tensor_is_reported(tmp_path):
    ref = reference_model("vae")
    state = ref.state_dict()
    state["decoder.extra.weight"] = torch.zeros(3)
    (tmp_path / "odd.config.json").write_text(json.dumps({**TINY, "gene_list": GENES}))
    torch.save({"model_state_dict": state}, tmp_path / "odd.best.ckpt")
    adata = query_data()
    with pytest.raises(ValueError, match=r"unexpected: \['decoder.extra.weight'\]"):
        CellPLM.from_cellplm_checkpoint(adata, tmp_path / "odd")
    with pytest.warns(UserWarning, match="Partial checkpoint load"):
        CellPLM.from_cellplm_checkpoint(adata, tmp_path / "odd", strict=False)
