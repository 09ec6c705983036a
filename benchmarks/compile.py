"""Does ``torch.compile`` pay here? Training epochs and embedding passes, eager vs compiled.

Run from the repository root, with ``../shared/data`` beside it::

    python benchmarks/compile.py           # ~15 min on 2 cores
    python benchmarks/compile.py --quick   # smoke run, ~3 min (compiling dominates)

Variants, each in a fresh Python process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``
set to a new folder), so that the first epoch or pass includes compiling as on first use:

* ``eager``: no compilation;
* ``encoder``: the transformer encoder compiled in place, ``module.encoder.compile(dynamic=True)``
  (minibatches hold a different number of cells every step: shapes are dynamic);
* ``module`` (training only): the whole module compiled in place, ``module.compile(dynamic=True)``
  (what scvi-tools' ``plan_kwargs={"compile": True}`` does, there without dynamic shapes).

Measures:

* ``training``: ``CellPLM(adata)`` (default architecture) trained on
  ``../shared/data/pancreas_endocrinogenesis_mouse`` for ``--epochs`` epochs; per epoch, the time
  from its first hook to the end of its last training step (as in ``training_speed.py``). Reported:
  the first epoch (compiling included) and the median of epochs 2..E;
* ``embedding``: the module's inference under ``torch.inference_mode()`` over ``--cells``
  generated cells x 2,000 genes in tissues of 2,000 (one tissue per call), at the ``small`` and
  ``85m`` configurations of ``embedding_speed.py``; reported: the first pass (compiling
  included) and the median of ``--passes`` further passes.

Ratios are eager time / compiled time of the same repeat (above 1: compiled is faster); "pays
back after" is the number of warm epochs (passes) whose saving covers the extra time of the first
one. Runs alternate the variants (order reversed every repeat); medians over ``--repeats``.

Writes ``benchmarks/results/compile.{json,md}`` (``--quick``: ``compile_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing as T

VARIANTS = {"training": ("eager", "encoder", "module"), "embedding": ("eager", "encoder")}


def _compile(module, variant: str) -> None:
    """Compile ``module`` (a ``CellPLMModule``) in place as ``variant`` says."""
    if variant == "encoder":
        module.encoder.compile(dynamic=True)
    elif variant == "module":
        module.compile(dynamic=True)


def _graph_counts() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


# ------------------------------------------------------------------ workers (fresh processes)
def worker_training(task: dict) -> dict:
    import anndata as ad
    import scvi
    from training_speed import PANCREAS, _timer_callback

    import cellplm_scvi as cps

    scvi.settings.seed = 0
    adata = ad.read_h5ad(PANCREAS)
    cps.CellPLM.setup_anndata(adata, layer="counts")
    model = cps.CellPLM(adata)
    _compile(model.module, task["variant"])
    timer = _timer_callback()
    model.train(max_epochs=task["epochs"], enable_progress_bar=False, callbacks=[timer])
    seconds = [epoch["train_seconds"] for epoch in timer.epochs]
    return {
        "first_s": seconds[0],
        "warm_s": T.median(seconds[1:]),
        "epoch_seconds": seconds,
        "n_train": timer.n_train,
        **_graph_counts(),
    }


def worker_embedding(task: dict) -> dict:
    import anndata as ad
    import numpy as np
    import torch
    from embedding_speed import CONFIGS, OURS_COMMON

    import cellplm_scvi as cps

    adata = ad.read_h5ad(task["data_path"])
    cps.CellPLM.setup_anndata(adata, batch_key="batch")
    model = cps.CellPLM(adata, **CONFIGS[task["config"]]["ours"], **OURS_COMMON)
    module = model.module.eval()
    loader = model._make_data_loader(
        adata=adata, indices=np.arange(adata.n_obs), max_cells_per_batch=task["cells_per_tissue"]
    )
    inputs = [module._get_inference_input(tensors) for tensors in loader]
    _compile(module, task["variant"])
    seconds = []
    with torch.inference_mode():
        for _ in range(1 + task["passes"]):
            start = time.perf_counter()
            for tensors in inputs:
                module.inference(**tensors)
            seconds.append(time.perf_counter() - start)
    return {
        "first_s": seconds[0],
        "warm_s": T.median(seconds[1:]),
        "pass_seconds": seconds,
        "n_cells": adata.n_obs,
        **_graph_counts(),
    }


# ------------------------------------------------------------------ driver
def pays_back_after(eager: dict, compiled: dict) -> float | None:
    """Warm epochs (passes) whose saving covers the compiled variant's extra first-epoch time."""
    saving = eager["warm_s"] - compiled["warm_s"]
    extra = compiled["first_s"] - eager["first_s"]
    return round(extra / saving, 1) if saving > 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (benchmarks/compile.py) for the protocol.",
    )
    parser.add_argument("--measure", nargs="+", default=["training", "embedding"], choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run (default 6)")
    parser.add_argument("--configs", nargs="+", default=["small", "85m"], choices=["small", "85m"])
    parser.add_argument(
        "--cells", type=int, default=20_000, help="embedding: generated cells (default 20000)"
    )
    parser.add_argument("--cells-per-tissue", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=3, help="embedding: warm passes per run (default 3)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating fresh-process repeats (default 2)"
    )
    T.add_run_arguments(parser, "training 3 epochs, small embedding of 4,000 cells, 1 repeat")
    args = parser.parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        T.report({"training": worker_training, "embedding": worker_embedding}[task["measure"]](task))
        return
    T.set_threads(args.threads)
    if args.quick:
        args.epochs, args.configs, args.cells, args.passes, args.repeats = 3, ["small"], 4000, 2, 1
    output = args.output or ("compile_quick" if args.quick else "compile")

    workdir = Path(tempfile.mkdtemp(prefix="cellplm_compile_"))
    try:
        cases = {}
        if "training" in args.measure:
            cases["training/pancreas"] = {"measure": "training", "epochs": args.epochs}
        if "embedding" in args.measure:
            data_path = workdir / "data.h5ad"
            T.synthetic_counts(args.cells, 2000, args.cells_per_tissue, seed=0).write_h5ad(data_path)
            for name in args.configs:
                cases[f"embedding/{name}"] = {
                    "measure": "embedding",
                    "config": name,
                    "data_path": str(data_path),
                    "cells_per_tissue": args.cells_per_tissue,
                    "passes": args.passes,
                }
        quiet = T.wait_for_quiet(args.max_load, args.max_wait)
        results = {
            **T.results_head("compile", quiet),
            "repeats": args.repeats,
            "runs": {},
            "summary": {},
        }
        for case, spec in cases.items():
            variants = VARIANTS[spec["measure"]]
            runs = {variant: [] for variant in variants}
            for repeat in range(args.repeats):
                for variant in variants[:: 1 if repeat % 2 == 0 else -1]:
                    cache = Path(tempfile.mkdtemp(prefix="inductor_", dir=workdir))
                    result = T.run_worker(
                        __file__,
                        {**spec, "variant": variant},
                        timeout_s=1800,
                        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
                    )
                    shutil.rmtree(cache, ignore_errors=True)
                    runs[variant].append(result)
                    print(
                        f"{case:18s} {variant:8s} first {result['first_s']:7.2f} s  warm {result['warm_s']:7.3f} s  "
                        f"graphs {result['graphs']} breaks {result['graph_breaks']}",
                        flush=True,
                    )
            results["runs"][case] = runs
            summary = {
                variant: {key: round(T.median([r[key] for r in rs]), 3) for key in ("first_s", "warm_s")}
                for variant, rs in runs.items()
            }
            for variant in variants[1:]:
                pairs = zip(runs["eager"], runs[variant], strict=True)
                summary[variant]["warm_speedup_per_repeat"] = [
                    round(e["warm_s"] / c["warm_s"], 2) for e, c in pairs
                ]
                summary[variant]["warm_speedup"] = round(
                    summary["eager"]["warm_s"] / summary[variant]["warm_s"], 2
                )
                summary[variant]["pays_back_after"] = pays_back_after(summary["eager"], summary[variant])
            results["summary"][case] = summary
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for case, summary in results["summary"].items():
        unit = "epoch" if case.startswith("training") else "pass"
        for variant, s in summary.items():
            compiled = variant != "eager"
            rows.append(
                [
                    case,
                    variant,
                    f"{s['first_s']:.2f}",
                    f"{s['warm_s']:.3f}",
                    f"{s['warm_speedup']:.2f}× ({', '.join(f'{r:.2f}' for r in s['warm_speedup_per_repeat'])})"
                    if compiled
                    else "",
                    (f"{s['pays_back_after']} {unit}s" if s["pays_back_after"] is not None else "never")
                    if compiled
                    else "",
                ]
            )
    table = T.markdown_table(
        f"torch.compile, {T.machine_summary(results['machine'])}, load {quiet['load_1min']} at start; "
        f"median of {args.repeats} alternating fresh-process runs, empty inductor cache in each.",
        ["case", "variant", "first s>", "warm s>", "warm speed-up (per repeat)", "pays back after"],
        rows,
    )
    T.write_results(output, results, table)


if __name__ == "__main__":
    main()
