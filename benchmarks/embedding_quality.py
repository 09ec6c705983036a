"""Embedding quality of CellPLM trained from scratch, against PCA and scVI trained in the same run.

Run from the repository root, with ``../shared/data`` beside it::

    python benchmarks/embedding_quality.py                          # every dataset, default epochs
    python benchmarks/embedding_quality.py --quick                  # smoke run, < 1 min on 2 cores
    python benchmarks/embedding_quality.py --datasets pancreas osmfish --curve 25
    python benchmarks/embedding_quality.py --variant nocontext='{"max_cells_per_context": 1}'
    python benchmarks/embedding_quality.py --datasets pbmc3 starmap --scib

Datasets (``--datasets``, default all, run in the order given here, cheapest first; label keys
in brackets):

* ``pbmc68k``: the CLI demo's PBMCs, :func:`cellplm_scvi.datasets.pbmc68k_counts` [bulk_labels];
* ``synthetic``: the CLI demo's tissue, :func:`cellplm_scvi.datasets.synthetic_spatial_tissue`
  with its default parameters [cell_type, niche]; spatial, ``obs.fov`` is CellPLM's ``fov_key``;
* ``pbmc3``: pbmc_3chemistries [cell_type]; ``obs.batch`` (3 chemistries) is the batch;
* ``starmap``: starmap_mouse_mpfc [cell_type, domain]; spatial, ``obs.batch`` (3 sections) is the
  batch of scVI and CellPLM;
* ``osmfish``: osmfish_mouse_sscortex, valid cells only [cell_type, region]; spatial;
* ``pancreas``: pancreas_endocrinogenesis_mouse [cell_type];
* ``kang``: kang_pbmc_ifnb_2k [condition]; 9,015 genes (PCA keeps 2,000 variable genes).

The datasets of ``shared/data`` are read from ``../shared/data`` and skipped when missing; spatial
neighbours of the neighbourhood baseline are searched within each section (starmap: ``batch``,
synthetic: ``fov``).

Methods, all on the same cells of one run:

* ``PCA``: :func:`cellplm_scvi.evaluation.pca_embedding` (normalize_total, log1p, 2,000 variable
  genes if there are more, 50 components);
* ``scVI``: :func:`cellplm_scvi.evaluation.scvi_embedding`, scVI's defaults (its epoch heuristic,
  ``batch_key`` where the data has batches);
* ``PCA + spatial neighbourhood`` (spatial sets): the PCA embedding averaged over each cell's 10
  nearest cells in space, within its section (:func:`cellplm_scvi.evaluation.neighbourhood_embedding`);
* ``cellplm``: ``CellPLM(adata)`` with its defaults, ``train(max_epochs=None)`` (the data-size
  heuristic, as scVI's) unless ``--epochs`` is given, the posterior means as embedding; the setup
  passes ``layer="counts"``, ``spatial_key="spatial"`` on spatial sets and ``batch_key`` /
  ``fov_key`` where the data has them. Each ``--variant NAME=JSON`` adds a CellPLM run built with
  ``CellPLM(adata, **JSON)``; ``--train-kwargs JSON`` goes to every CellPLM ``train(...)``.

Scores (the project's protocol, :mod:`cellplm_scvi.evaluation`): ARI / NMI at the matched Leiden
resolution for each label key, the best ARI over resolutions beside it (it flatters every
method), the silhouette of the labels; for CellPLM with a mixture latent also the ARI of its own
component assignments (:func:`~cellplm_scvi.evaluation.mixture_scores`, components in use = those
holding at least 1 % of the cells); for every embedding the diagnostics of
:func:`~cellplm_scvi.evaluation.latent_health` (participation ratio, share of the top principal
axis, largest |correlation| of a principal axis with the log library size, where the library size
is the row sum of the counts, and active dimensions: variance across cells above 0.01); training
seconds and epochs of scVI and CellPLM.

``--curve K`` scores each CellPLM embedding every K epochs *during* its one training run: a
Lightning callback (:class:`EmbeddingCurve`) embeds all cells at the end of every K-th epoch
(after that epoch's validation), scores the first label key with the protocol and reads the
validation ELBO, so the learning-rate schedule and the KL warm-up are those of a single run. Its
time is not counted in the training seconds.

``--scib`` adds scib-metrics' ``Benchmarker`` (bio conservation, batch correction, total; the
optional ``scib-metrics`` package, ``pip install scib-metrics``) for PCA, scVI and CellPLM on the
datasets with batches (pbmc3, starmap), scored on the first label key.

Writes ``benchmarks/results/embedding_quality[_<output>][_quick].{json,md}``, one table per dataset
(the results so far are written after every dataset; ``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T
import anndata as ad
import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp

QUICK_EPOCHS = 5
QUICK_DATASETS = ["pbmc68k", "synthetic", "starmap"]
DEFAULT_VARIANT = "cellplm"
MIXTURE_LATENTS = ("gmm", "released_gmm")


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset: how to load it, its labels and how CellPLM and scVI see it.

    ``batch_key`` goes to both CellPLM's and scVI's setup, ``fov_key`` and (when ``spatial``)
    ``spatial_key="spatial"`` to CellPLM's; ``section_key`` groups the cells of one tissue section
    for the spatial-neighbourhood baseline (``None``: one section).
    """

    source: str
    load: Callable[[], ad.AnnData]
    label_keys: tuple[str, ...]
    layer: str = "counts"
    batch_key: str | None = None
    fov_key: str | None = None
    spatial: bool = False
    section_key: str | None = None

    def cellplm_setup(self) -> dict:
        """Keyword arguments of ``CellPLM.setup_anndata``."""
        setup = {"layer": self.layer, "batch_key": self.batch_key, "fov_key": self.fov_key}
        if self.spatial:
            setup["spatial_key"] = "spatial"
        return {key: value for key, value in setup.items() if value is not None}


def _shared(name: str) -> Callable[[], ad.AnnData]:
    """Loader of ``../shared/data/<name>/<name>.h5ad``."""

    def load() -> ad.AnnData:
        return ad.read_h5ad(T.DATA / name / f"{name}.h5ad")

    return load


def _osmfish() -> ad.AnnData:
    adata = _shared("osmfish_mouse_sscortex")()
    return adata[adata.obs["valid"].astype(bool).to_numpy()].copy()


def _pbmc68k() -> ad.AnnData:
    from cellplm_scvi import datasets

    return datasets.pbmc68k_counts()


def _synthetic() -> ad.AnnData:
    from cellplm_scvi import datasets

    return datasets.synthetic_spatial_tissue()  # the CLI demo's parameters (the defaults)


# cheapest first, so that the partial results of a long run hold as many datasets as possible
DATASETS: dict[str, Dataset] = {
    "pbmc68k": Dataset("cellplm_scvi.datasets.pbmc68k_counts()", _pbmc68k, ("bulk_labels",)),
    "synthetic": Dataset(
        "cellplm_scvi.datasets.synthetic_spatial_tissue()",
        _synthetic,
        ("cell_type", "niche"),
        fov_key="fov",
        spatial=True,
        section_key="fov",
    ),
    "pbmc3": Dataset(
        "shared/data/pbmc_3chemistries", _shared("pbmc_3chemistries"), ("cell_type",), batch_key="batch"
    ),
    "starmap": Dataset(
        "shared/data/starmap_mouse_mpfc",
        _shared("starmap_mouse_mpfc"),
        ("cell_type", "domain"),
        batch_key="batch",
        spatial=True,
        section_key="batch",
    ),
    "osmfish": Dataset(
        "shared/data/osmfish_mouse_sscortex (valid cells)",
        _osmfish,
        ("cell_type", "region"),
        spatial=True,
    ),
    "pancreas": Dataset(
        "shared/data/pancreas_endocrinogenesis_mouse",
        _shared("pancreas_endocrinogenesis_mouse"),
        ("cell_type",),
    ),
    "kang": Dataset("shared/data/kang_pbmc_ifnb_2k", _shared("kang_pbmc_ifnb_2k"), ("condition",)),
}


def _available(name: str) -> bool:
    """Whether a dataset can be loaded here (the shared folder may be missing)."""
    source = DATASETS[name].source
    if not source.startswith("shared/data/"):
        return True
    folder = source.removeprefix("shared/data/").split(" ")[0]
    return (T.DATA / folder / f"{folder}.h5ad").is_file()


def _counts(adata: ad.AnnData, layer: str):
    counts = adata.layers[layer] if layer else adata.X
    return sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)


# ------------------------------------------------------------------------------------- callbacks


class EpochCounter(pl.Callback):
    """Counts finished training epochs (the epochs a model actually ran)."""

    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1


class EmbeddingCurve(pl.Callback):
    """Scores a CellPLM embedding every ``every`` epochs while it trains.

    At the end of every ``every``-th training epoch (and of the last one), after that epoch's
    validation, the callback embeds all cells with ``model.get_latent_representation()`` (the
    ``CellPLM`` being trained: its ``module`` is the training plan's), scores the first label key
    with the protocol (matched-resolution ARI / NMI) and keeps the validation ELBO of the epoch.
    The module is put back in training mode afterwards; the time spent is in ``seconds``.

    Parameters
    ----------
    model
        The ``CellPLM`` model being trained.
    every
        Epochs between two evaluations.
    labels
        True labels of the model's cells, shape ``(n_obs,)``.
    seed
        Random state of the Leiden sweep.
    """

    def __init__(self, model, every: int, labels, seed: int):
        self.model, self.every, self.labels, self.seed = model, int(every), np.asarray(labels), seed
        self.points: list[dict] = []
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            return
        from cellplm_scvi import evaluation

        start = time.perf_counter()
        was_trained, was_training = self.model.is_trained_, pl_module.module.training
        # the embedding pass draws random numbers (data loading); restoring the generators keeps
        # the training run identical to one without the curve
        generators = _random_states()
        self.model.is_trained_ = True  # get_latent_representation refuses an untrained model
        try:
            embedding = self.model.get_latent_representation()
        finally:
            self.model.is_trained_ = was_trained
            pl_module.module.train(was_training)
            _restore_random_states(generators)
        cells = ad.AnnData(obsm={"z": embedding})
        score = evaluation.score_sweep(evaluation.leiden_sweep(cells, "z", seed=self.seed), self.labels)
        elbo = trainer.callback_metrics.get("elbo_validation")
        self.points.append(
            {
                "epoch": epoch,
                "ari_matched": _round(score["ari_matched"]),
                "nmi_matched": _round(score["nmi_matched"]),
                "elbo_validation": None if elbo is None else _round(float(elbo)),
                "participation_ratio": _round(
                    evaluation.latent_health(embedding, np.ones(len(embedding)))["participation_ratio"]
                ),
            }
        )
        self.seconds += time.perf_counter() - start


def _random_states() -> dict:
    """The states of Python's, NumPy's and PyTorch's (CPU and CUDA) global random generators."""
    import random

    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore_random_states(states: dict) -> None:
    """Put back the generator states of :func:`_random_states`."""
    import random

    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------------------- methods


def run_scvi(adata: ad.AnnData, spec: Dataset, epochs: int | None, seed: int) -> tuple[np.ndarray, dict]:
    """scVI with its defaults; the embedding and the training record."""
    from cellplm_scvi import evaluation

    counter = EpochCounter()
    start = time.perf_counter()
    z = evaluation.scvi_embedding(
        adata,
        layer=spec.layer,
        batch_key=spec.batch_key,
        max_epochs=epochs,
        seed=seed,
        enable_progress_bar=False,
        callbacks=[counter],
    )
    return z, {"train_seconds": round(time.perf_counter() - start, 1), "epochs": counter.epochs}


def run_cellplm(
    adata: ad.AnnData,
    spec: Dataset,
    model_kwargs: dict,
    train_kwargs: dict,
    epochs: int | None,
    curve_every: int | None,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """Train one CellPLM variant from scratch; its embedding and record (mixture, curve, times)."""
    import scvi

    import cellplm_scvi as cps
    from cellplm_scvi import evaluation

    scvi.settings.seed = seed
    data = adata.copy()  # the setup adds registry columns
    cps.CellPLM.setup_anndata(data, **spec.cellplm_setup())
    model = cps.CellPLM(data, **model_kwargs)
    counter = EpochCounter()
    curve = EmbeddingCurve(model, curve_every, data.obs[spec.label_keys[0]], seed) if curve_every else None
    kwargs = {"enable_progress_bar": False, **train_kwargs}
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), counter, *([curve] if curve else [])]
    start = time.perf_counter()
    model.train(max_epochs=epochs, **kwargs)
    train_seconds = time.perf_counter() - start - (curve.seconds if curve else 0.0)
    start = time.perf_counter()
    z = np.asarray(model.get_latent_representation(), dtype=np.float32)
    info = {
        "train_seconds": round(train_seconds, 1),
        "epochs": counter.epochs,
        "embed_seconds": round(time.perf_counter() - start, 2),
        "model_kwargs": model_kwargs,
        "train_kwargs": train_kwargs,
        "latent_kind": str(model.module.latent_kind),
        "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
        "summary": model._model_summary_string,
    }
    if model.module.latent_kind in MIXTURE_LATENTS:
        assignments = np.asarray(model.get_cluster_assignments())
        info["mixture"] = {
            key: _rounded(evaluation.mixture_scores(assignments, data.obs[key])) for key in spec.label_keys
        }
    if curve is not None:
        info["curve"] = _with_history_elbo(curve.points, model)
        info["curve_seconds"] = round(curve.seconds, 1)
    return z, info


def _with_history_elbo(points: list[dict], model) -> list[dict]:
    """Fill in each curve point's validation ELBO from ``model.history`` where the callback had none."""
    history = getattr(model, "history", None) or {}
    elbo = history.get("elbo_validation")
    for point in points:
        if point["elbo_validation"] is None and elbo is not None and (point["epoch"] - 1) in elbo.index:
            point["elbo_validation"] = _round(float(elbo.loc[point["epoch"] - 1].iloc[0]))
    return points


def run_scib(adata: ad.AnnData, spec: Dataset, embeddings: dict[str, np.ndarray]) -> dict:
    """scib-metrics scores of the embeddings on the first label key, by method."""
    import scanpy as sc

    from cellplm_scvi import evaluation

    scratch = ad.AnnData(_counts(adata, spec.layer).astype(np.float32))
    scratch.obs_names = adata.obs_names.astype(str)
    # the Benchmarker's PCA of X (the pre-integration reference) expects log-normalised data
    sc.pp.normalize_total(scratch)
    sc.pp.log1p(scratch)
    scratch.obs["batch"] = adata.obs[spec.batch_key].astype(str).to_numpy()
    scratch.obs["label"] = adata.obs[spec.label_keys[0]].astype(str).to_numpy()
    keys = {}
    for method, embedding in embeddings.items():
        keys[method] = f"emb{len(keys)}"
        scratch.obsm[keys[method]] = np.asarray(embedding, dtype=np.float32)
    table = evaluation.scib_benchmark(scratch, list(keys.values()), batch_key="batch", label_key="label")
    return {
        method: {column: _round(float(table.loc[key, column])) for column in table.columns}
        for method, key in keys.items()
    }


# ------------------------------------------------------------------------------------ one dataset


def run_dataset(name: str, args: argparse.Namespace, variants: dict[str, dict]) -> dict:
    """Every method on one dataset: embeddings, scores, diagnostics and training records."""
    from cellplm_scvi import evaluation

    spec = DATASETS[name]
    print(f"[{name}] loading", flush=True)
    adata = spec.load()
    library = np.asarray(_counts(adata, spec.layer).sum(axis=1)).ravel()
    embeddings: dict[str, np.ndarray] = {}
    records: dict[str, dict] = {}

    start = time.perf_counter()
    embeddings["PCA"] = evaluation.pca_embedding(adata, layer=spec.layer, seed=args.seed)
    records["PCA"] = {"kind": "baseline", "seconds": round(time.perf_counter() - start, 1)}
    if spec.spatial:
        embeddings["PCA + spatial neighbourhood"] = evaluation.neighbourhood_embedding(
            adata, embeddings["PCA"], groupby=spec.section_key
        )
        records["PCA + spatial neighbourhood"] = {"kind": "baseline", "section_key": spec.section_key}
    print(f"[{name}] scVI", flush=True)
    embeddings["scVI"], info = run_scvi(adata, spec, args.scvi_epochs, args.seed)
    records["scVI"] = {"kind": "scvi", "batch_key": spec.batch_key, **info}
    print(f"[{name}] scVI: {info['epochs']} epochs in {info['train_seconds']} s", flush=True)
    for variant, model_kwargs in variants.items():
        print(f"[{name}] CellPLM {variant} {model_kwargs}", flush=True)
        records[variant] = {"kind": "cellplm", "setup": spec.cellplm_setup(), "model_kwargs": model_kwargs}
        try:
            embeddings[variant], info = run_cellplm(
                adata, spec, model_kwargs, args.train_kwargs, args.epochs, args.curve, args.seed
            )
        except Exception as err:  # noqa: BLE001 (a failing variant must not lose the other methods)
            traceback.print_exc()
            records[variant]["error"] = _without_paths(f"{type(err).__name__}: {err}")
            continue
        records[variant].update(info)
        print(f"[{name}] {variant}: {info['epochs']} epochs in {info['train_seconds']} s", flush=True)

    print(f"[{name}] scoring", flush=True)
    table = evaluation.score_embeddings(embeddings, adata.obs, list(spec.label_keys), seed=args.seed)
    for method, embedding in embeddings.items():
        rows = table[table["method"] == method].to_dict("records")
        records[method]["scores"] = {
            row["label_key"]: _rounded({k: v for k, v in row.items() if k not in ("method", "label_key")})
            for row in rows
        }
        records[method]["latent_health"] = _rounded(evaluation.latent_health(embedding, library))
    result = {
        "source": spec.source,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "label_keys": list(spec.label_keys),
        "n_labels": {key: int(adata.obs[key].nunique()) for key in spec.label_keys},
        "batch_key": spec.batch_key,
        "n_batches": int(adata.obs[spec.batch_key].nunique()) if spec.batch_key else 1,
        "spatial": spec.spatial,
        "methods": records,
    }
    if args.scib and spec.batch_key:
        print(f"[{name}] scib-metrics", flush=True)
        chosen = {m: e for m, e in embeddings.items() if records[m]["kind"] != "baseline" or m == "PCA"}
        result["scib"] = run_scib(adata, spec, chosen)
    return result


# ----------------------------------------------------------------------------------------- output


def _round(value: float) -> float:
    return round(float(value), 4)


def _rounded(values: dict) -> dict:
    return {
        key: _round(value) if isinstance(value, float | np.floating) else value
        for key, value in values.items()
    }


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def dataset_table(name: str, result: dict) -> list[str]:
    """Markdown lines of one dataset: the main table, then the curve and the scib table if any."""
    keys = result["label_keys"]
    labels = ", ".join(f"{k} ({result['n_labels'][k]})" for k in keys)
    caption = (
        f"### {name}: {result['n_cells']:,} cells × {result['n_genes']:,} genes, labels {labels}"
        + (f", {result['n_batches']} batches (`{result['batch_key']}`)" if result["batch_key"] else "")
        + (", spatial" if result["spatial"] else "")
    )
    columns = ["method"]
    for key in keys:
        columns += [f"{key} ARI / NMI", f"{key} ARI best res.>", f"{key} silhouette>", f"{key} mixture ARI>"]
    columns += [
        "components used>",
        "participation ratio>",
        "top-axis share>",
        "max abs r (log lib)>",
        "active / dims>",
        "train s>",
        "epochs>",
    ]
    rows = []
    for method, record in result["methods"].items():
        if "error" in record:
            rows.append(
                [f"{method}: failed ({record['error'][:120].replace('|', '/')})"] + [""] * (len(columns) - 1)
            )
            continue
        cells = [method]
        for key in keys:
            score = record["scores"][key]
            mixture = record.get("mixture", {}).get(key)
            cells += [
                f"{score['ari_matched']:.3f} / {score['nmi_matched']:.3f}",
                _fmt(score["ari_best_over_resolutions"]),
                _fmt(score["silhouette"]),
                _fmt(mixture["ari"]) if mixture else "–",
            ]
        mixture = next(iter(record.get("mixture", {}).values()), None)
        health = record["latent_health"]
        cells += [
            str(mixture["n_components_used"]) if mixture else "–",
            _fmt(health["participation_ratio"], 2),
            _fmt(health["top_axis_share"]),
            _fmt(health["max_abs_corr_log_library"]),
            f"{health['n_active_dims']} / {health['n_dims']}",
            _fmt(record.get("train_seconds"), 1) if "train_seconds" in record else "–",
            str(record.get("epochs", "–")),
        ]
        rows.append(cells)
    lines = T.markdown_table(caption, columns, rows)
    curves = {m: r["curve"] for m, r in result["methods"].items() if r.get("curve")}
    if curves:
        curve_rows = [
            [
                method,
                str(p["epoch"]),
                _fmt(p["ari_matched"]),
                _fmt(p["nmi_matched"]),
                _fmt(p["elbo_validation"], 1),
                _fmt(p["participation_ratio"], 2),
            ]
            for method, points in curves.items()
            for p in points
        ]
        lines += [
            "",
            *T.markdown_table(
                f"Training curve ({keys[0]}, matched resolution; one training run, scored every few epochs):",
                ["method", "epoch>", "ARI>", "NMI>", "validation ELBO>", "participation ratio>"],
                curve_rows,
            ),
        ]
    if result.get("scib"):
        scib_rows = [
            [
                method,
                _fmt(s.get("Bio conservation")),
                _fmt(s.get("Batch correction")),
                _fmt(s.get("Total")),
            ]
            for method, s in result["scib"].items()
        ]
        lines += [
            "",
            *T.markdown_table(
                f"scib-metrics ({keys[0]}, batch `{result['batch_key']}`; not min-max scaled):",
                ["method", "bio conservation>", "batch correction>", "total>"],
                scib_rows,
            ),
        ]
    return lines


def markdown(results: dict) -> list[str]:
    """The whole Markdown file."""
    lines = [
        "## Embedding quality (CellPLM from scratch vs PCA and scVI, same cells, same run)",
        "",
        "ARI / NMI at the Leiden resolution matched to the number of labels (the figure to report);",
        "'best res.' is the best ARI over resolutions 0.1-1.5 (flatters every method). Mixture ARI: the",
        "CellPLM mixture's own component assignments; components used hold >= 1 % of the cells.",
        "Participation ratio, top-axis share and max |r| with log library size (row sums of the counts,",
        "over the first 10 principal axes) describe the embedding's geometry; active dims have",
        "variance > 0.01 across cells. Train seconds exclude curve evaluations.",
        "",
        f"Machine: {T.machine_summary(results['machine'])}; code {results['code']['revision']}"
        + (" with uncommitted changes in src/" if results["code"]["src_modified"] else "")
        + f"; CellPLM epochs: {results['settings']['epochs'] or 'data-size default'}, scVI epochs: "
        + f"{results['settings']['scvi_epochs'] or 'data-size default'}.",
    ]
    if not results["complete"]:
        lines += ["", "**Partial results: the run has not finished.**"]
    for name, result in results["datasets"].items():
        lines.append("")
        if "error" in result:
            lines.append(f"### {name}: failed ({result['error'].splitlines()[-1]})")
        elif "skipped" in result:
            lines.append(f"### {name}: skipped ({result['skipped']})")
        else:
            lines += dataset_table(name, result)
    return lines


def _without_paths(text: str) -> str:
    """``text`` with this machine's folders above the repository left out (results carry no paths)."""
    return text.replace(str(T.REPOSITORY.parent) + os.sep, "")


def code_revision() -> dict:
    """The commit of the working tree and whether ``src/`` differs from it (read-only git calls)."""

    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *command], cwd=T.REPOSITORY, capture_output=True, text=True)

    revision = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--", "src")
    # the hash of the uncommitted changes tells two runs of the same commit apart
    diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=T.REPOSITORY, capture_output=True)
    return {
        "revision": revision.stdout.strip() or "unknown",
        "src_modified": bool(status.stdout.strip()),
        "src_status": status.stdout.strip().splitlines(),
        "src_diff_sha1": hashlib.sha1(diff.stdout).hexdigest() if diff.stdout else None,
    }


# ------------------------------------------------------------------------------------------- main


def _variant(text: str) -> tuple[str, dict]:
    name, sep, payload = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant needs NAME=JSON, got {text!r}")
    kwargs = _json_dict(payload)
    return name, kwargs


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=list(DATASETS), default=None, help="datasets (default: all)"
    )
    parser.add_argument(
        "--epochs", type=_positive, default=None, help="CellPLM epochs (default: the data-size heuristic)"
    )
    parser.add_argument(
        "--scvi-epochs", type=_positive, default=None, help="scVI epochs (default: scVI's heuristic)"
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="add a CellPLM run built with CellPLM(adata, **JSON) (repeatable)",
    )
    parser.add_argument(
        "--train-kwargs", type=_json_dict, default={}, metavar="JSON", help="keyword arguments of train()"
    )
    parser.add_argument("--curve", type=_positive, default=None, metavar="K", help="score every K epochs")
    parser.add_argument("--scib", action="store_true", help="scib-metrics on the datasets with batches")
    parser.add_argument("--seed", type=int, default=0)
    T.add_run_arguments(
        parser, f"{', '.join(QUICK_DATASETS)}, {QUICK_EPOCHS} epochs for scVI and CellPLM", workers=False
    )
    # quality, not speed: by default no wait for a quiet machine (the load is recorded)
    parser.set_defaults(max_wait=0)
    args = parser.parse_args(argv)
    T.prepare_run(args)
    if args.quick:
        args.epochs = args.epochs or QUICK_EPOCHS
        args.scvi_epochs = args.scvi_epochs or QUICK_EPOCHS
    names = args.datasets or (QUICK_DATASETS if args.quick else list(DATASETS))
    variants = {DEFAULT_VARIANT: {}, **dict(args.variant)}
    if args.scib:
        try:
            import scib_metrics  # noqa: F401
        except ImportError:
            parser.error("--scib needs the optional scib-metrics package: pip install scib-metrics")
    output = (
        "embedding_quality" + (f"_{args.output}" if args.output else "") + ("_quick" if args.quick else "")
    )

    # import the whole package now, so that a long run measures the code as it was at its start
    # (recorded in results["code"]) even if the source tree changes while it runs
    import cellplm_scvi
    import cellplm_scvi.nn.cpu  # noqa: F401

    quiet = T.wait_for_quiet(args.max_load, args.max_wait, poll_s=10)
    results = {
        **T.results_head("embedding_quality", quiet),
        "code": code_revision(),
        "settings": {
            "datasets": names,
            "epochs": args.epochs,
            "scvi_epochs": args.scvi_epochs,
            "variants": variants,
            "train_kwargs": args.train_kwargs,
            "curve_every": args.curve,
            "scib": args.scib,
            "seed": args.seed,
        },
        "complete": False,
        "datasets": {},
    }
    start = time.perf_counter()
    for name in names:
        if not _available(name):
            results["datasets"][name] = {"skipped": f"{DATASETS[name].source} is not here"}
            continue
        dataset_start = time.perf_counter()
        try:
            results["datasets"][name] = run_dataset(name, args, variants)
        except Exception as err:  # noqa: BLE001 (one failing dataset must not lose the others' results)
            traceback.print_exc()
            results["datasets"][name] = {"error": _without_paths(f"{type(err).__name__}: {err}")}
        results["datasets"][name]["seconds"] = round(time.perf_counter() - dataset_start, 1)
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        T.write_results(output, results, markdown(results))
    results["complete"] = True
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    T.write_results(output, results, markdown(results))


if __name__ == "__main__":
    main()
