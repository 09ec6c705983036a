"""Embedding quality at an equal wall-clock training budget: CellPLM vs scVI (pancreas), PE on/off (osmFISH).

Run from the repository root, with ../shared/data beside it::

    python benchmarks/embedding_quality.py --dataset pancreas --budget 180
    python benchmarks/embedding_quality.py --dataset osmfish --budget 180

Each model trains with its default settings, stopped by Lightning's ``max_time`` at the budget
(or by its default epoch count, whichever comes first); seconds per epoch are wall time divided by
epochs run. Every embedding is scored with :func:`cellplm_scvi.evaluation.score_embeddings` (the
project's protocol: ARI / NMI at the matched Leiden resolution, the best over resolutions beside
it, the silhouette of the labels); the PCA baseline is :func:`cellplm_scvi.evaluation.pca_embedding`,
and on osmFISH the spatial-neighbourhood baseline (PCA averaged over each cell's 10 nearest cells)
is scored too. Results go to ``benchmarks/results/quality_<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch

import cellplm_scvi as cps
from cellplm_scvi import evaluation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "pancreas": ("pancreas_endocrinogenesis_mouse", ["cell_type"]),
    "osmfish": ("osmfish_mouse_sscortex", ["cell_type", "region"]),
}


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(path: Path, results: dict, table_rows: list[str]) -> None:
    """JSON of everything plus a markdown table beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text("\n".join(table_rows) + "\n")
    print("\n".join(table_rows))


def train_timed(model, budget: float, **train_kwargs) -> dict:
    start = time.perf_counter()
    model.train(accelerator="cpu", max_time={"seconds": budget}, enable_progress_bar=False, **train_kwargs)
    seconds = time.perf_counter() - start
    epochs = len(model.history["elbo_train"])
    return {
        "train_seconds": round(seconds, 1),
        "epochs": epochs,
        "seconds_per_epoch": round(seconds / epochs, 3),
    }


def run_cellplm(adata, budget: float, seed: int, spatial: bool, **model_kwargs) -> tuple[np.ndarray, dict]:
    scvi.settings.seed = seed
    data = adata.copy()
    cps.CellPLM.setup_anndata(data, layer="counts", spatial_key="spatial" if spatial else None)
    model = cps.CellPLM(data, **model_kwargs)
    info = train_timed(model, budget)
    start = time.perf_counter()
    z = model.get_latent_representation()
    info["embed_seconds"] = round(time.perf_counter() - start, 2)
    return z, info


def run_scvi(adata, budget: float, seed: int) -> tuple[np.ndarray, dict]:
    scvi.settings.seed = seed
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, layer="counts")
    model = scvi.model.SCVI(data)
    info = train_timed(model, budget)
    return model.get_latent_representation(), info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="pancreas")
    parser.add_argument("--budget", type=float, default=180.0, help="training wall-clock seconds per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    name, labels = DATASETS[args.dataset]
    adata = ad.read_h5ad(DATA / name / f"{name}.h5ad")
    if "valid" in adata.obs:
        adata = adata[adata.obs["valid"].astype(bool)].copy()
    pca = evaluation.pca_embedding(adata, layer="counts", seed=args.seed)
    runs = {"PCA": (pca, {})}
    if args.dataset == "pancreas":
        runs["CellPLM (default)"] = run_cellplm(adata, args.budget, args.seed, spatial=False)
        runs["scVI (default)"] = run_scvi(adata, args.budget, args.seed)
    else:
        runs["PCA + spatial neighbourhood"] = (evaluation.neighbourhood_embedding(adata, pca), {})
        runs["CellPLM, positional encoding on"] = run_cellplm(adata, args.budget, args.seed, spatial=True)
        runs["CellPLM, positional encoding off"] = run_cellplm(
            adata, args.budget, args.seed, spatial=True, use_positional_encoding=False
        )
    results = {
        "dataset": name,
        "n_cells": adata.n_obs,
        "budget_seconds": args.budget,
        "machine": machine(),
        "runs": {},
    }
    header = (
        "| method | "
        + " | ".join(f"{k} ARI / NMI (matched res.)" for k in labels)
        + " | s / epoch | epochs |"
    )
    rows = [header, "|" + "---|" * (len(labels) + 3)]
    table = evaluation.score_embeddings(
        {method: embedding for method, (embedding, _) in runs.items()}, adata.obs, labels, seed=args.seed
    )
    for method, (_, info) in runs.items():
        scores = {
            row["label_key"]: {
                key: round(value, 4) if isinstance(value, float) else value
                for key, value in row.items()
                if key not in ("method", "label_key")
            }
            for row in table[table["method"] == method].to_dict("records")
        }
        results["runs"][method] = {**info, "scores": scores}
        cells = " | ".join(
            f"{scores[k]['ari_matched']:.3f} / {scores[k]['nmi_matched']:.3f} (r={scores[k]['matched_resolution']})"
            for k in labels
        )
        rows.append(
            f"| {method} | {cells} | {info.get('seconds_per_epoch', '–')} | {info.get('epochs', '–')} |"
        )
    write_results(args.out / f"quality_{args.dataset}.json", results, rows)


if __name__ == "__main__":
    main()
