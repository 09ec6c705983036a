"""Reading the original CellPLM checkpoints (``{prefix}.config.json`` + ``{prefix}.best.ckpt``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cellplm_scvi.nn import SEPARATE_PROJECTIONS, fuse_projections

logger = logging.getLogger(__name__)

#: Released state-dict entries that the released forward pass never uses.
UNUSED_KEYS = ("embedder.norm0.weight", "embedder.norm0.bias", "embedder.pe_enc.pe_enc.weight")


@dataclass
class CellPLMCheckpoint:
    """A released checkpoint: its configuration, weights and latent layout.

    Attributes
    ----------
    config
        The ``config.json`` contents (``gene_list`` included).
    state_dict
        ``model_state_dict`` of the ``.best.ckpt`` file, on the CPU.
    layout
        ``"released_gmm"`` (``20230926``, mixture latent) or ``"normal"`` (``20231027``, plain Gaussian).
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    layout: str = field(init=False)

    def __post_init__(self):
        keys = self.state_dict.keys()
        if any(k.startswith("latent.layers.1.inference.") for k in keys):
            self.layout = "released_gmm"
        elif "latent.layers.1.hid_2mu.weight" in keys:
            self.layout = "normal"
        else:
            raise ValueError(
                "The checkpoint's latent layer is neither the Gaussian-mixture (20230926) nor the plain "
                "Gaussian (20231027) layout; no 'latent.layers.1.*' weights of either kind were found."
            )

    @property
    def gene_list(self) -> list[str]:
        """The checkpoint's ordered gene IDs."""
        return list(self.config["gene_list"])


def _paths(checkpoint: str | Path | tuple) -> tuple[Path, Path]:
    if isinstance(checkpoint, tuple | list):
        config_path, weights_path = (Path(p) for p in checkpoint)
    else:
        prefix = str(checkpoint)
        for suffix in (".config.json", ".best.ckpt"):
            prefix = prefix.removesuffix(suffix)
        config_path, weights_path = Path(prefix + ".config.json"), Path(prefix + ".best.ckpt")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist. Pass the checkpoint prefix (e.g. 'ckpt/20231027_85M', next to "
                "'20231027_85M.config.json' and '20231027_85M.best.ckpt') or the two file paths."
            )
    return config_path, weights_path


def read_checkpoint(checkpoint: str | Path | tuple) -> CellPLMCheckpoint:
    """Read a released checkpoint onto the CPU, whatever device saved it.

    Parameters
    ----------
    checkpoint
        The prefix (``.../20231027_85M``) or ``(config_path, weights_path)``.

    Returns
    -------
    The checkpoint.
    """
    config_path, weights_path = _paths(checkpoint)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); is the file complete?") from error
    if "gene_list" not in config:
        raise ValueError(f"{config_path} has no 'gene_list'; it is not a CellPLM checkpoint configuration.")
    try:
        saved = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Could not read {weights_path} ({type(error).__name__}: {error}); the file may be truncated "
            "or not a PyTorch checkpoint. Download it again."
        ) from error
    if not isinstance(saved, dict) or "model_state_dict" not in saved:
        raise ValueError(f"{weights_path} holds no 'model_state_dict'; it is not a CellPLM checkpoint.")
    return CellPLMCheckpoint(config, saved["model_state_dict"])


def module_kwargs(checkpoint: CellPLMCheckpoint, gene_rows: list[int], use_positional_encoding: bool) -> dict:
    """:class:`~cellplm_scvi.module.CellPLMModule` arguments that rebuild the released architecture."""
    config = checkpoint.config
    if config.get("enc_mod", "flowformer") != "flowformer":
        raise ValueError(
            f"Only Flowformer checkpoints are supported; this one has enc_mod={config['enc_mod']!r}."
        )
    if config.get("dec_mod", "nbmlp") != "nbmlp" or config.get("cat_pe", False):
        raise ValueError("Only the released layout (dec_mod='nbmlp', cat_pe=False) is supported.")
    return {
        "n_hidden": config["enc_hid"],
        "n_layers": config["enc_layers"],
        "n_heads": config.get("enc_head", 8),
        "n_latent": config["post_latent_dim"],
        "n_components": config.get("num_clusters", 16),
        "latent": checkpoint.layout,
        "attention": "flow",
        "n_decoder_hidden": config["dec_hid"],
        "n_decoder_layers": config["dec_layers"] - 1,
        "dropout": config.get("model_dropout", 0.1),
        "mask_cell_rate": config.get("mask_node_rate", 0.75),
        "mask_gene_rate": config.get("mask_feature_rate", 0.25),
        "use_positional_encoding": use_positional_encoding,
        "released_layout": {
            "n_gene_table": len(config["gene_list"]),
            "gene_rows": [int(r) for r in gene_rows],
            "n_datasets": config.get("dataset_num", 0),
        },
    }


def _key_map(checkpoint: CellPLMCheckpoint, n_layers: int, n_decoder_layers: int) -> dict[str, str]:
    """Released name → our name, for every weight the released forward pass uses."""
    names = {
        "embedder.feat_enc.emb": "embedder.genes.weight",
        "embedder.pe_enc.missing_pe": "positional_encoding.missing",
        "pre_latent_norm.norm.weight": "pre_latent_norm.weight",
        "pre_latent_norm.norm.bias": "pre_latent_norm.bias",
        "decoder.out_layer.dec_disp": "log_dispersion",
    }
    for p in ("weight", "bias"):
        names |= {
            f"embedder.extra_linear.0.{p}": f"projection.0.{p}",
            f"embedder.extra_linear.3.{p}": f"projection.3.{p}",
            f"decoder.out_layer.dec_1.{p}": f"decoder.head.0.{p}",
            f"decoder.out_layer.dec_mean.0.{p}": f"decoder.head.2.{p}",
        }
        for i in range(n_layers):
            released, ours = f"encoder.layers.{i}", f"encoder.layers.{i}"
            for a in (*SEPARATE_PROJECTIONS, "out"):
                names[f"{released}.self_attn.{a}_projection.{p}"] = f"{ours}.attention.{a}.{p}"
            for j in (0, 3):
                names[f"{released}._ff_block.{j}.{p}"] = f"{ours}.feed_forward.{j}.{p}"
            for norm in ("norm1", "norm2"):
                names[f"{released}.{norm}.{p}"] = f"{ours}.{norm}.{p}"
        for i in range(n_decoder_layers):
            names[f"decoder.layers.{i}.0.{p}"] = f"decoder.blocks.{i}.0.{p}"
            names[f"decoder.layers.{i}.3.{p}"] = f"decoder.blocks.{i}.3.{p}"
            names[f"decoder.covariate_layers.{i}.batch.2.{p}"] = f"decoder.batch_covariates.{i}.2.{p}"
            names[f"decoder.covariate_layers.{i}.dataset.2.{p}"] = f"decoder.dataset_covariates.{i}.2.{p}"
        if checkpoint.layout == "normal":
            names[f"latent.layers.1.hid_2mu.{p}"] = f"latent.mean.{p}"
            names[f"latent.layers.1.hid_2sigma.{p}"] = f"latent.logvar.{p}"
        else:
            base = "latent.layers.1.inference"
            names |= {
                f"{base}.inference_qyx.0.logits.{p}": f"latent.cluster.{p}",
                f"{base}.inference_qzyx.0.{p}": f"latent.inner.{p}",
                f"{base}.inference_qzyx.2.mu.{p}": f"latent.mean.{p}",
                f"{base}.inference_qzyx.2.var.{p}": f"latent.var.{p}",
                f"{base}.y_mu.{p}": f"latent.prior_mean.{p}",
                f"{base}.y_var.{p}": f"latent.prior_var.{p}",
            }
    for i in range(n_decoder_layers):
        names[f"decoder.layers.{i}.1.weight"] = f"decoder.blocks.{i}.1.weight"
        names[f"decoder.covariate_layers.{i}.batch.1.weight"] = f"decoder.batch_covariates.{i}.1.weight"
        names[f"decoder.covariate_layers.{i}.dataset.1.weight"] = f"decoder.dataset_covariates.{i}.1.weight"
        names[f"decoder.covariate_layers.{i}.dataset.0.weight"] = f"decoder.dataset_covariates.{i}.0.weight"
    return names


@dataclass
class LoadReport:
    """What a checkpoint load did: every key is accounted for."""

    loaded: list[str]
    ignored: list[str]
    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        return (
            f"{len(self.loaded)} tensors loaded, {len(self.ignored)} ignored (unused by the released forward "
            f"pass: {self.ignored}), missing: {self.missing or 'none'}, unexpected: {self.unexpected or 'none'}"
        )


def load_released_weights(
    module: torch.nn.Module,
    checkpoint: CellPLMCheckpoint,
    batch_rows: list[int | None],
    dataset_row: int | None = None,
) -> LoadReport:
    """Copy a released state dict into a module built with :func:`module_kwargs`.

    The released batch table has one row per pre-training batch; our table has one row per batch
    of the data. Batch ``b`` gets the released row ``batch_rows[b]``, or, where that is ``None``,
    the **mean** of all released rows (the released code silently uses their *sum* when it gets
    no batch id). The dataset covariate uses row ``dataset_row``, or the mean row.

    Returns
    -------
    The report; nothing is loaded partially without being listed there.
    """
    config = checkpoint.config
    n_decoder_layers = config["dec_layers"] - 1
    key_map = _key_map(checkpoint, config["enc_layers"], n_decoder_layers)
    ours = module.state_dict()
    # released query / key / value maps go to the blocks of our fused ``qkv`` (see fuse_projections)
    targets = set(ours) | {
        name.replace(".qkv.", f".{part}.")
        for name in ours
        if ".attention.qkv." in name
        for part in SEPARATE_PROJECTIONS
    }
    new_state, loaded, ignored, unexpected = {}, [], [], []
    for key, value in checkpoint.state_dict.items():
        if key in UNUSED_KEYS or (
            key == "embedder.pe_enc.missing_pe" and "positional_encoding.missing" not in ours
        ):
            ignored.append(key)
        elif key.startswith("decoder.covariate_layers.") and ".batch.0." in key:
            layer = int(key.split(".")[2])
            mean = value.mean(0)
            table = torch.stack([value[r] if r is not None else mean for r in batch_rows])
            new_state[f"decoder.batch_covariates.{layer}.0.weight"] = table
            loaded.append(key)
        elif key in key_map and key_map[key] in targets:
            new_state[key_map[key]] = value
            loaded.append(key)
        else:
            unexpected.append(key)
    for i in range(config["enc_layers"]):
        fuse_projections(new_state, f"encoder.layers.{i}.attention.")
    missing = [k for k in ours if k not in new_state and k != "decoder.dataset_row"]
    for key, value in new_state.items():
        if ours[key].shape != value.shape:
            raise ValueError(
                f"Shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}."
            )
    if "decoder.dataset_row" in ours:
        new_state["decoder.dataset_row"] = torch.tensor(-1 if dataset_row is None else int(dataset_row))
    module.load_state_dict(new_state, strict=False)
    return LoadReport(loaded, ignored, missing, unexpected)
