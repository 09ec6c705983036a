"""Embedding quality at an equal wall-clock training budget: CellPLM vs scVI (pancreas), PE on/off (osmFISH).

Run from the repository root, with ../shared/data beside it::

    python benchmarks/embedding_quality.py --dataset pancreas --budget 180
    python benchmarks/embedding_quality.py --dataset osmfish --budget 180

Each model trains with its default settings, stopped by Lightning's ``max_time`` at the budget
(or by its default epoch count, whichever comes first); seconds per epoch are wall time divided by
epochs run. Results go to ``benchmarks/results/quality_<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch
from _protocol import leiden_scores, machine, pca_embedding, write_results

import cellplm_scvi as cps

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "pancreas": ("pancreas_endocrinogenesis_mouse", ["cell_type"]),
    "osmfish": ("osmfish_mouse_sscortex", ["cell_type", "region"]),
}


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
    runs = {"PCA": (pca_embedding(adata), {})}
    if args.dataset == "pancreas":
        runs["CellPLM (default)"] = run_cellplm(adata, args.budget, args.seed, spatial=False)
        runs["scVI (default)"] = run_scvi(adata, args.budget, args.seed)
    else:
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
    for method, (embedding, info) in runs.items():
        adata.obsm["X_eval"] = embedding
        scores = leiden_scores(adata, "X_eval", labels, seed=args.seed)
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
