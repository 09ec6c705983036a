"""The ``cellplm-scvi`` command: ``demo``, ``train`` and ``embed``.

Errors a user can cause (a missing file, a missing ``obs``/``obsm``/``layers`` key, a bad number)
print one line, ``cellplm-scvi: error: ...``, to stderr and exit with status 2. Everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PROG = "cellplm-scvi"
USAGE_ERROR = 2
_SCVI_UNS_KEYS = ("_scvi_uuid", "_scvi_manager_uuid")


class CLIError(Exception):
    """An error the user can fix; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors become :class:`CLIError` (one line, no usage dump)."""

    def error(self, message: str):
        raise CLIError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cellplm-scvi`` command line.

    Parameters
    ----------
    argv
        The arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 2 on an error the user can fix (one line on stderr).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            # lightning 2.6 with torch 2.13 repeats this deprecation at every step
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            return args.handler(args)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)


# ----------------------------------------------------------------------------------------- parser


def _build_parser() -> argparse.ArgumentParser:
    """Build the parser with its three subcommands."""
    parser = _Parser(
        prog=PROG,
        description="CellPLM (cells as tokens, tissues as sentences) as an scvi-tools model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.set_defaults(handler=_no_command(parser))
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _add_demo(sub)
    _add_train(sub)
    _add_embed(sub)
    return parser


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="train and evaluate on the two embedded datasets",
        description=(
            "Train CellPLM on 700 PBMCs (scanpy's pbmc68k_reduced, labels 'bulk_labels') and on a "
            "simulated spatial tissue (labels 'cell_type' and 'niche'), embed, cluster with Leiden "
            "at the resolution matched to the number of labels, and write one .h5ad, one UMAP "
            "PNG and one saved model per dataset plus metrics.json to --out."
        ),
    )
    demo.add_argument(
        "--out", type=Path, default=Path("cellplm_demo"), help="output folder (default: %(default)s)"
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="training epochs per dataset (default: the model's, which scales with the data size)",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(handler=_cmd_demo)


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train a model on an .h5ad file and save it",
        description="Register INPUT (raw counts), train CellPLM on it and save the model to --model-dir.",
    )
    train.add_argument("input", type=Path, metavar="INPUT.h5ad", help="AnnData file with raw counts")
    train.add_argument("--model-dir", type=Path, required=True, help="folder to save the trained model to")
    train.add_argument("--layer", help="layer holding the raw counts (default: .X)")
    train.add_argument("--batch-key", help="obs column with the sample / batch of each cell")
    train.add_argument("--fov-key", help="obs column with the field of view of each cell (spatial data)")
    train.add_argument("--spatial-key", help="obsm key with the x, y coordinates of each cell (spatial data)")
    train.add_argument("--labels-key", help="obs column with cell labels, kept in the registry")
    train.add_argument("--epochs", type=_positive_int, help="maximum number of epochs (default: the model's)")
    train.add_argument(
        "--preset", help="architecture preset, e.g. 'cellplm-85m' (default: a small CPU model)"
    )
    train.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)"
    )
    train.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing model in --model-dir")
    train.set_defaults(handler=_cmd_train)


def _add_embed(sub) -> None:
    embed = sub.add_parser(
        "embed",
        help="embed the cells of an .h5ad file with a trained model",
        description=(
            "Load the model in --model-dir with INPUT, write INPUT plus the cell embeddings "
            "(obsm[--obsm-key]) and, for a Gaussian-mixture latent, obs['cellplm_cluster'] to "
            "--out. The input is never overwritten; the output is written atomically."
        ),
    )
    embed.add_argument(
        "input", type=Path, metavar="INPUT.h5ad", help="AnnData file set up like the training data"
    )
    embed.add_argument("--model-dir", type=Path, required=True, help="folder of a model saved by 'train'")
    embed.add_argument("--out", type=Path, required=True, metavar="OUTPUT.h5ad", help="file to write")
    embed.add_argument(
        "--obsm-key", default="X_cellplm", help="obsm key for the embedding (default: %(default)s)"
    )
    embed.add_argument(
        "--precision",
        choices=["32", "bf16-mixed"],
        default="32",
        help="float32, or bfloat16 matrix products (faster on GPUs and recent CPUs) (default: %(default)s)",
    )
    embed.set_defaults(handler=_cmd_embed)


def _no_command(parser: argparse.ArgumentParser):
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return USAGE_ERROR

    return handler


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellplm-scvi")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ train


def _cmd_train(args: argparse.Namespace) -> int:
    """Train on ``args.input`` and save the model to ``args.model_dir``."""
    _check_model_dir_free(args.model_dir, args.overwrite)
    adata = _read_h5ad(args.input)
    setup = {
        "layer": args.layer,
        "batch_key": args.batch_key,
        "fov_key": args.fov_key,
        "spatial_key": args.spatial_key,
        "labels_key": args.labels_key,
    }
    _check_setup_keys(adata, setup, source=str(args.input))
    cps = _import_package()
    _seed(args.seed)
    model = _build_model(cps, adata, setup, preset=args.preset)
    _step(
        f"training ({'default' if args.epochs is None else args.epochs} epochs, accelerator={args.accelerator})"
    )
    start = time.perf_counter()
    _train(model, max_epochs=args.epochs, accelerator=args.accelerator)
    _step(f"trained in {time.perf_counter() - start:.1f} s")
    model.save(str(args.model_dir), overwrite=True)
    _step(f"saved the model to {args.model_dir}")
    return 0


def _train(model, **kwargs) -> None:
    """``model.train(**kwargs)``; an accelerator this machine lacks becomes a :class:`CLIError`."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    accelerator = kwargs.get("accelerator", "auto")
    try:
        model.train(**kwargs)
    except MisconfigurationException as err:
        raise CLIError(f"cannot train with --accelerator {accelerator}: {_message(err)}") from None
    except ValueError as err:
        if "accelerator" not in str(err):
            raise
        raise CLIError(f"cannot train with --accelerator {accelerator}: {_message(err)}") from None


def _check_model_dir_free(model_dir: Path, overwrite: bool) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise CLIError(f"--model-dir {model_dir} exists and is not a folder")
    if model_dir.is_dir() and any(model_dir.iterdir()) and not overwrite:
        raise CLIError(f"--model-dir {model_dir} is not empty; pass --overwrite to replace it")


def _build_model(cps, adata, setup: dict, preset: str | None):
    """Register ``adata`` and build the model; setup problems become :class:`CLIError`."""
    _step("registering the data: " + ", ".join(f"{k}={v}" for k, v in setup.items() if v is not None))
    try:
        cps.CellPLM.setup_anndata(adata, **setup)
        model = cps.CellPLM(adata, preset=preset)
    except (KeyError, ValueError) as err:
        raise CLIError(_message(err)) from None
    _step(f"model: preset={preset}, {_n_parameters(model):,} parameters")
    return model


# ------------------------------------------------------------------------------------------ embed


def _cmd_embed(args: argparse.Namespace) -> int:
    """Embed ``args.input`` with the model in ``args.model_dir`` and write ``args.out``."""
    _refuse_same_file(args.input, args.out)
    if not args.out.parent.is_dir():
        raise CLIError(f"the folder of --out {args.out} does not exist")
    if not args.obsm_key:
        raise CLIError("--obsm-key must not be empty")
    adata = _read_h5ad(args.input)
    cps = _import_package()
    registry = _read_registry(cps, args.model_dir)
    setup = {key: registry.get("setup_args", {}).get(key) for key in _SETUP_KEYS}
    _check_setup_keys(adata, setup, source=str(args.input))
    data = _in_model_gene_order(adata, registry["field_registries"]["X"]["state_registry"]["column_names"])
    _step(f"loading the model from {args.model_dir}")
    try:
        model = cps.CellPLM.load(str(args.model_dir), adata=data)
    except (KeyError, ValueError) as err:
        raise CLIError(
            f"cannot use {args.input} with the model in {args.model_dir}: {_message(err)}"
        ) from None
    _step("embedding")
    start = time.perf_counter()
    adata.obsm[args.obsm_key] = np.asarray(
        model.get_latent_representation(precision=args.precision), dtype=np.float32
    )
    _step(f"embedded {adata.n_obs} cells in {time.perf_counter() - start:.1f} s")
    if model.module.latent_kind == "gmm":
        clusters = np.asarray(model.get_cluster_assignments())
        adata.obs["cellplm_cluster"] = _as_categorical(clusters)
        _step(f"Gaussian-mixture clusters: {adata.obs['cellplm_cluster'].nunique()} non-empty")
    _write_h5ad_atomic(adata, args.out)
    _step(f"wrote {args.out}")
    return 0


_SETUP_KEYS = ("layer", "batch_key", "fov_key", "spatial_key", "labels_key")


def _refuse_same_file(input_path: Path, output_path: Path) -> None:
    same = input_path.resolve() == output_path.resolve()
    if not same and input_path.exists() and output_path.exists():
        same = os.path.samefile(input_path, output_path)
    if same:
        raise CLIError(
            f"--out {output_path} is the input file; choose another output (the input is never overwritten)"
        )


def _read_registry(cps, model_dir: Path) -> dict:
    if not (model_dir / "model.pt").is_file():
        raise CLIError(f"--model-dir {model_dir} holds no saved model (no model.pt)")
    try:
        return cps.CellPLM.load_registry(str(model_dir))
    except cps.model.ModelFileError as err:
        raise CLIError(_message(err)) from None


def _in_model_gene_order(adata, model_genes):
    """``adata``, or a copy with its genes in the model's order when it holds the same genes in another."""
    genes = adata.var_names
    if list(genes) == list(model_genes) or genes.has_duplicates or set(genes) != set(model_genes):
        return adata  # the model's order already, or a mismatch that loading reports
    _step("the input holds the model's genes in another order; embedding them in the model's order")
    return adata[:, list(model_genes)].copy()


def _write_h5ad_atomic(adata, path: Path) -> None:
    """Write ``adata`` to a temporary file next to ``path``, then rename it onto ``path``.

    A reader never sees a half-written file, and a failed write leaves ``path`` as it was.
    """
    for key in _SCVI_UNS_KEYS:
        adata.uns.pop(key, None)
    tmp = path.with_name(f"{path.stem}.tmp-{secrets.token_hex(4)}.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    """Train, embed, cluster and score on the two embedded datasets; write everything to ``args.out``."""
    import matplotlib

    matplotlib.use("Agg")
    from cellplm_scvi import datasets

    cps = _import_package()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ("pbmc68k", datasets.pbmc68k_counts, {"layer": "counts"}, ["bulk_labels"]),
        (
            "spatial_tissue",
            datasets.synthetic_spatial_tissue,
            {"layer": "counts", "fov_key": "fov", "spatial_key": "spatial"},
            ["cell_type", "niche"],
        ),
    ]
    start = time.perf_counter()
    report = {"epochs": args.epochs, "seed": args.seed, "package_version": _version(), "datasets": {}}
    tables = {}
    for name, load, setup, label_keys in jobs:
        _step(f"[{name}] loading the data")
        adata = load()
        report["datasets"][name], tables[name] = _demo_one(cps, name, adata, setup, label_keys, args)
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    metrics_path = args.out / "metrics.json"
    metrics_path.write_text(json.dumps(report, indent=2) + "\n")
    _step(f"wrote {metrics_path} ({report['total_seconds']:.0f} s in all)")
    _print_summary(tables)
    return 0


def _demo_one(cps, name: str, adata, setup: dict, label_keys: list[str], args: argparse.Namespace):
    """Train, embed, cluster, score, plot and save for one dataset.

    Returns its metrics (a JSON-ready dict) and the score table of
    :func:`~cellplm_scvi.evaluation.score_embeddings`.
    """
    from scvi.model.base._training_mixin import get_max_epochs_heuristic

    _seed(args.seed)
    model = _build_model(cps, adata, setup, preset=None)
    epochs = args.epochs or get_max_epochs_heuristic(adata.n_obs)  # what train(max_epochs=None) picks
    _step(f"[{name}] training {adata.n_obs} cells x {adata.n_vars} genes for {epochs} epochs")
    start = time.perf_counter()
    model.train(max_epochs=epochs)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    adata.obsm["X_cellplm"] = np.asarray(model.get_latent_representation(), dtype=np.float32)
    embed_seconds = time.perf_counter() - start
    _step(f"[{name}] trained in {train_seconds:.1f} s, embedded in {embed_seconds:.2f} s; clustering")

    from cellplm_scvi import evaluation

    embeddings = {"cellplm": adata.obsm["X_cellplm"], "pca": _pca_baseline(adata, setup, args.seed)}
    scores = evaluation.score_embeddings(embeddings, adata.obs, label_keys, seed=args.seed)
    primary = label_keys[0]
    sweep = evaluation.leiden_sweep(adata, "X_cellplm", seed=args.seed)
    matched = evaluation.matched_resolution(sweep, adata.obs[primary].nunique())
    adata.obs["cellplm_cluster"] = _as_categorical(sweep[matched])
    metrics = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "epochs": int(epochs),
        "train_seconds": round(train_seconds, 2),
        "embed_seconds": round(embed_seconds, 2),
        "latent_kind": str(model.module.latent_kind),
        "labels": _scores_by_label(scores, "cellplm"),
        "cellplm_cluster_matched_to": primary,
        "baseline_pca": _scores_by_label(scores, "pca"),
    }
    if model.module.latent_kind == "gmm":
        metrics["gmm_clusters"] = _score_assignments(model.get_cluster_assignments(), adata.obs, label_keys)

    import scanpy as sc

    sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_cellplm", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    _plot_umap(adata, [*label_keys, "cellplm_cluster"], args.out / f"{name}_umap.png")
    _write_h5ad_atomic(adata, args.out / f"{name}.h5ad")
    model.save(str(args.out / f"{name}_model"), overwrite=True)
    _step(f"[{name}] wrote {name}.h5ad, {name}_umap.png and {name}_model/")
    return metrics, scores


def _pca_baseline(adata, setup: dict, seed: int) -> np.ndarray:
    """The protocol's PCA baseline of the demo data's raw counts, ``(n_obs, n_pcs)``."""
    from cellplm_scvi import evaluation

    return evaluation.pca_embedding(adata, layer=setup.get("layer"), seed=seed)


def _scores_by_label(scores, method: str) -> dict:
    """``{label_key: scores}`` of one method of an :func:`~cellplm_scvi.evaluation.score_embeddings` table."""
    rows = scores[scores["method"] == method]
    return {
        row.label_key: {
            "n_labels": int(row.n_labels),
            "resolution": float(row.matched_resolution),
            "n_clusters": int(row.n_clusters_matched),
            "ari": round(float(row.ari_matched), 4),
            "nmi": round(float(row.nmi_matched), 4),
            "ari_best_over_resolutions": round(float(row.ari_best_over_resolutions), 4),
            "nmi_best_over_resolutions": round(float(row.nmi_best_over_resolutions), 4),
            "silhouette": round(float(row.silhouette), 4),
        }
        for row in rows.itertuples()
    }


def _score_assignments(assignments, obs, label_keys: list[str]) -> dict:
    """ARI/NMI of fixed cluster assignments (the Gaussian-mixture components) against each label key."""
    from cellplm_scvi import evaluation

    assignments = np.asarray(assignments)
    scores = {"n_clusters": int(np.unique(assignments).size)}
    for key in label_keys:
        pair = evaluation.clustering_scores(obs[key], assignments)
        scores[key] = {name: round(value, 4) for name, value in pair.items()}
    return scores


def _plot_umap(adata, colors: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig = sc.pl.umap(adata, color=colors, show=False, return_fig=True, ncols=len(colors), wspace=0.4)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


_SUMMARY_COLUMNS = {
    "method": "method",
    "label_key": "labels",
    "n_labels": "n labels",
    "matched_resolution": "resolution",
    "n_clusters_matched": "n clusters",
    "ari_matched": "ARI",
    "nmi_matched": "NMI",
    "ari_best_over_resolutions": "ARI (best res.)",
    "nmi_best_over_resolutions": "NMI (best res.)",
    "silhouette": "silhouette",
}


def _print_summary(tables: dict) -> None:
    """Print the score tables; ARI and NMI are at the matched resolution unless labelled otherwise."""
    import pandas as pd

    table = pd.concat(tables, names=["dataset", None]).reset_index(level=0)
    table = table.rename(columns=_SUMMARY_COLUMNS)
    print("ARI / NMI at the resolution matched to the number of labels, and the best over resolutions:")
    print(
        table.to_string(index=False, float_format="{:.3f}".format, formatters={"resolution": "{:.1f}".format})
    )


# ---------------------------------------------------------------------------------------- helpers


def _read_h5ad(path: Path):
    """Read an ``.h5ad`` file; a missing or unreadable file is a :class:`CLIError`."""
    import anndata as ad

    if not path.is_file():
        raise CLIError(f"input file {path} does not exist")
    _step(f"reading {path}")
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise CLIError(f"cannot read {path} as an .h5ad file: {_message(err)}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise CLIError(f"{path} has no cells or no genes ({adata.n_obs} x {adata.n_vars})")
    _step(f"{adata.n_obs} cells x {adata.n_vars} genes")
    return adata


def _check_setup_keys(adata, setup: dict, source: str) -> None:
    """Check the keys named in ``setup`` with the model's own checks, before a model is built.

    A failed check becomes a :class:`CLIError` that names ``source``.
    """
    from cellplm_scvi.model import check_layer, check_obs_key, check_spatial

    try:
        check_layer(adata, setup.get("layer"))
        for name in ("batch_key", "fov_key", "labels_key"):
            check_obs_key(adata, setup.get(name), name)
        check_spatial(adata, setup.get("spatial_key"))
    except (KeyError, ValueError) as err:
        raise CLIError(f"{source}: {_message(err)}") from None


def _as_categorical(codes):
    import pandas as pd

    codes = np.asarray(codes).astype(np.int64)
    categories = [str(c) for c in np.unique(codes)]
    return pd.Categorical([str(c) for c in codes], categories=categories)


def _message(err: BaseException) -> str:
    """The text of an exception on one line (``KeyError`` quotes its message; undo that)."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return " ".join(text.split())


def _import_package():
    import cellplm_scvi

    return cellplm_scvi


def _seed(seed: int) -> None:
    import scvi

    scvi.settings.seed = seed


def _n_parameters(model) -> int:
    return sum(p.numel() for p in model.module.parameters())


def _step(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
