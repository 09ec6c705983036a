"""Training speed and peak memory: CellPLM (our default) vs scVI (its default).

Run from the repository root, with ``../shared/data`` beside it::

    python benchmarks/training_speed.py           # pancreas + 100,000 generated cells (~9 min, 2 cores)
    python benchmarks/training_speed.py --datasets many_genes --skip-memory-bound   # 10,000 genes (~4 min)
    python benchmarks/training_speed.py --quick   # smoke run, < 1 min

Systems, each with its defaults except ``max_epochs``:

* ours: ``CellPLM.setup_anndata(adata, layer=..., batch_key=...)``; ``CellPLM(adata)``;
  ``model.train(max_epochs=E)`` — default architecture (width 128, 2 flow layers, GMM latent),
  cell budget ``max_cells_per_batch=4000``, ``drop_cell_rate=0.3``, validation every epoch;
* scVI: ``scvi.model.SCVI.setup_anndata(...)``; ``SCVI(adata)``; ``model.train(max_epochs=E)``
  (minibatches of 128 cells, no per-epoch validation by default).

Data: ``../shared/data/pancreas_endocrinogenesis_mouse`` (3,696 cells x 2,000 genes, layer
``counts``, no batch key), and generated negative-binomial counts (``--cells`` cells x 2,000 genes,
~90 % zeros, batches of ``--cells-per-batch`` cells registered as ``batch_key`` for both); with
``--datasets many_genes``, the same generator at ``--many-genes-cells`` cells x ``--many-genes``
genes (default 20,000 x 10,000: the decoder and the reconstruction loss then dominate a step).

How cells/s is counted, per epoch, from Lightning callbacks:

* ``train_seconds``: from the epoch's first hook (``on_train_epoch_start``) to the end of its last
  training step (``on_train_batch_end``): loading + forward + backward + optimiser steps, but not
  the validation loop, the dataloader rebuild between epochs or logging;
* ``epoch_seconds``: wall time from one epoch's start to the next (everything included);
* cells *served* = the training-split cells (``n_train``), each served once per epoch;
* cells *in the forward* = the sum of the minibatch sizes. For ours this is ~70 % of the served
  cells, because each step leaves 30 % of every tissue out (context dropout); for scVI it equals
  the served cells.
* served cells/s = ``n_train / train_seconds``, forward cells/s = ``sum(minibatch sizes) /
  train_seconds``; also ``n_train / epoch_seconds``. The first epoch is a warm-up and is not
  used: per run the median over epochs 2..E is taken, then the median over runs.

Runs alternate ours / scVI in fresh Python processes, ``--repeats`` times. Peak memory is the
resident high-water mark during ``train()`` above the RSS just before it (data and model loaded).
Memory bound: peak memory of one training epoch on the first 20,000 generated cells vs on all
``--cells`` with the same budget (and a 2,000-cell budget at 20,000 cells), to show the step
memory is set by ``max_cells_per_batch`` and not by the dataset size; each run twice, with
glibc's default allocator settings and with large blocks always mmapped
(``MALLOC_MMAP_THRESHOLD_``), so that the high-water mark counts live memory, not heap
fragmentation.

Writes ``benchmarks/results/training_speed.{json,md}`` (``--quick``: ``training_speed_quick``).
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

import _harness as T

PANCREAS = T.DATA / "pancreas_endocrinogenesis_mouse" / "pancreas_endocrinogenesis_mouse.h5ad"


# ------------------------------------------------------------------ worker (fresh process)
def _timer_callback():
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        """Per-epoch training-loop time, epoch wall time and cells per step."""

        def __init__(self):
            self.epochs: list[dict] = []
            self.n_train = None

        def on_train_start(self, trainer, pl_module):
            self.n_train = getattr(trainer.datamodule, "n_train", None)

        def on_train_epoch_start(self, trainer, pl_module):
            now = time.perf_counter()
            if self.epochs:
                self.epochs[-1]["epoch_seconds"] = now - self.epochs[-1]["_start"]
            self.epochs.append({"_start": now, "cells_forward": 0, "steps": 0})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            epoch = self.epochs[-1]
            first = next(iter(batch.values()))
            epoch["cells_forward"] += int(first.shape[0])
            epoch["steps"] += 1
            epoch["train_seconds"] = time.perf_counter() - epoch["_start"]

        def on_train_end(self, trainer, pl_module):
            self.epochs[-1]["epoch_seconds"] = time.perf_counter() - self.epochs[-1]["_start"]

    return EpochTimer()


def worker(task: dict) -> dict:
    """Train one system on one dataset and return its cells/s per epoch and peak memory.

    ``task`` holds ``system`` (``"ours"`` or ``"scvi"``), ``data_path``, ``layer``,
    ``batch_key``, ``epochs``, and optionally ``model_kwargs`` and ``train_kwargs`` (ours).
    """
    import anndata as ad
    import scvi
    import torch

    import cellplm_scvi as cps

    scvi.settings.seed = 0
    path = task["data_path"]
    adata = ad.read_h5ad(path)
    layer, batch_key = task["layer"], task["batch_key"]
    timer = _timer_callback()
    if task["system"] == "ours":
        cps.CellPLM.setup_anndata(adata, layer=layer, batch_key=batch_key)
        model = cps.CellPLM(adata, **task.get("model_kwargs", {}))
    else:
        scvi.model.SCVI.setup_anndata(adata, layer=layer, batch_key=batch_key)
        model = scvi.model.SCVI(adata)
    with T.PeakMemory() as memory:
        start = time.perf_counter()
        model.train(
            max_epochs=task["epochs"],
            enable_progress_bar=False,
            callbacks=[timer],
            **task.get("train_kwargs", {}),
        )
        total = time.perf_counter() - start
    epochs = [{k: v for k, v in e.items() if not k.startswith("_")} for e in timer.epochs]
    n_train = timer.n_train
    for e in epochs:
        e["served_cells_per_s"] = n_train / e["train_seconds"]
        e["forward_cells_per_s"] = e["cells_forward"] / e["train_seconds"]
        e["served_cells_per_epoch_s"] = n_train / e["epoch_seconds"]
    measured = epochs[1:] or epochs
    return {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "n_train": n_train,
        "epochs": epochs,
        "train_call_seconds": total,
        "served_cells_per_s": T.median([e["served_cells_per_s"] for e in measured]),
        "forward_cells_per_s": T.median([e["forward_cells_per_s"] for e in measured]),
        "served_cells_per_epoch_s": T.median([e["served_cells_per_epoch_s"] for e in measured]),
        "peak_mib": round(memory.delta_mib, 1),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------ memory bound
def memory_bound(spec: dict, n_cells: int, n_small: int = 20_000) -> dict:
    """Training peak memory for one epoch at ``n_small`` cells and at ``n_cells``, per allocator setting.

    The ``n_small`` cells (the first ones) are written to a file of their own, so that no worker
    frees a larger matrix before it measures (freed memory kept by the allocator would be reused
    without raising the resident set, and make the smaller run look leaner).
    """
    import anndata as ad

    full_path = Path(spec["data_path"])
    small_path = full_path.with_name(f"synthetic_{n_small}.h5ad")
    ad.read_h5ad(full_path)[:n_small].copy().write_h5ad(small_path)
    small = {**spec, "data_path": str(small_path), "epochs": 1}
    full = {**spec, "epochs": 1}
    runs = {
        f"ours_{n_small // 1000}k_budget4000": {**small, "system": "ours"},
        f"ours_{n_cells // 1000}k_budget4000": {**full, "system": "ours"},
        f"ours_{n_small // 1000}k_budget2000": {
            **small,
            "system": "ours",
            "model_kwargs": {"max_cells_per_context": 2000},
            "train_kwargs": {"max_cells_per_batch": 2000},
        },
        f"scvi_{n_small // 1000}k": {**small, "system": "scvi"},
        f"scvi_{n_cells // 1000}k": {**full, "system": "scvi"},
    }
    bound = {}
    for allocator, env in T.ALLOCATORS.items():
        for label, task in runs.items():
            result = T.run_worker(__file__, task, timeout_s=1800, env=env)
            bound.setdefault(label, {"n_cells": result["n_cells"]})[allocator] = result["peak_mib"]
            print(f"memory bound {label} ({allocator}): peak {result['peak_mib']:.1f} MiB", flush=True)
    return bound


# ------------------------------------------------------------------ driver
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for how cells/s is counted."
    )
    parser.add_argument("--cells", type=int, default=100_000, help="generated cells (default 100000)")
    parser.add_argument(
        "--cells-per-batch", type=int, default=2500, help="cells per generated batch/tissue (default 2500)"
    )
    parser.add_argument("--pancreas-epochs", type=int, default=8)
    parser.add_argument("--synthetic-epochs", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating fresh-process repeats (default 2)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["pancreas", "synthetic"],
        choices=["pancreas", "synthetic", "many_genes"],
    )
    parser.add_argument(
        "--many-genes-cells", type=int, default=20_000, help="many_genes: cells (default 20000)"
    )
    parser.add_argument("--many-genes", type=int, default=10_000, help="many_genes: genes (default 10000)")
    parser.add_argument("--many-genes-epochs", type=int, default=3)
    parser.add_argument("--skip-memory-bound", action="store_true", help="skip the memory-bound runs")
    T.add_run_arguments(parser, "pancreas and 5,000 generated cells, 2 epochs, 1 repeat")
    args = parser.parse_args(argv)
    if args.worker:
        T.report(worker(json.loads(args.worker)))
        return
    T.prepare_run(args)
    if args.quick:
        args.cells, args.pancreas_epochs, args.synthetic_epochs, args.repeats = 5000, 2, 2, 1
        args.skip_memory_bound = True
    output = args.output or ("training_speed_quick" if args.quick else "training_speed")

    workdir = Path(tempfile.mkdtemp(prefix="cellplm_training_speed_"))
    try:
        datasets = {}
        if "pancreas" in args.datasets:
            datasets["pancreas"] = {
                "data_path": str(PANCREAS),
                "layer": "counts",
                "batch_key": None,
                "epochs": args.pancreas_epochs,
            }
        generated = {
            "synthetic": (args.cells, 2000, args.synthetic_epochs),
            "many_genes": (args.many_genes_cells, args.many_genes, args.many_genes_epochs),
        }
        for name, (n_cells, n_genes, epochs) in generated.items():
            if name not in args.datasets:
                continue
            print(f"generating {n_cells:,} cells x {n_genes:,} genes ...", flush=True)
            path = workdir / f"{name}.h5ad"
            T.synthetic_counts(n_cells, n_genes, args.cells_per_batch, seed=0).write_h5ad(path)
            datasets[name] = {"data_path": str(path), "layer": None, "batch_key": "batch", "epochs": epochs}
        quiet = T.wait_for_quiet(args.max_load, args.max_wait)
        results = {
            **T.results_head("training_speed", quiet),
            "repeats": args.repeats,
            "runs": {},
            "summary": {},
        }
        for name, spec in datasets.items():

            def progress(system, result, name=name):
                print(
                    f"{name:9s} {system:5s} n_train {result['n_train']:6d} served {result['served_cells_per_s']:8.0f}/s "
                    f"forward {result['forward_cells_per_s']:8.0f}/s epoch-wall {result['served_cells_per_epoch_s']:8.0f}/s "
                    f"peak {result['peak_mib']:7.1f} MiB load {result['load_1min_after']}",
                    flush=True,
                )

            runs = T.alternating_runs(
                __file__,
                {system: {**spec, "system": system} for system in ("ours", "scvi")},
                args.repeats,
                timeout_s=1800,
                on_result=progress,
            )
            results["runs"][name] = runs
            summary = {}
            for system, rs in runs.items():
                summary[system] = {
                    key: round(T.median([r[key] for r in rs]), 1)
                    for key in (
                        "served_cells_per_s",
                        "forward_cells_per_s",
                        "served_cells_per_epoch_s",
                        "peak_mib",
                    )
                }
                summary[system]["n_train"] = rs[0]["n_train"]
            summary["n_genes"] = runs["ours"][0]["n_genes"]
            summary["served_ratio_ours_over_scvi"] = round(
                summary["ours"]["served_cells_per_s"] / summary["scvi"]["served_cells_per_s"], 2
            )
            summary["forward_ratio_ours_over_scvi"] = round(
                summary["ours"]["forward_cells_per_s"] / summary["scvi"]["forward_cells_per_s"], 2
            )
            summary["epoch_wall_ratio_ours_over_scvi"] = round(
                summary["ours"]["served_cells_per_epoch_s"] / summary["scvi"]["served_cells_per_epoch_s"], 2
            )
            summary["served_ratio_per_repeat"] = [
                round(r, 2) for r in T.ratios(runs["ours"], runs["scvi"], "served_cells_per_s")["per_repeat"]
            ]
            results["summary"][name] = summary

        if "synthetic" in datasets and not args.skip_memory_bound:
            results["memory_bound"] = memory_bound(datasets["synthetic"], args.cells)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = results["machine"]
    rows = [
        f"Training speed, {T.machine_summary(info)}, scvi-tools {info.get('scvi_tools')}, load {quiet['load_1min']} at start; "
        f"median over epochs 2..E and {args.repeats} alternating runs.",
        "",
        "| data | genes | n_train | system | served cells/s | cells in forward/s | served cells/s (epoch wall) | peak MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, s in results["summary"].items():
        for system in ("ours", "scvi"):
            r = s[system]
            rows.append(
                f"| {name} | {s['n_genes']:,} | {r['n_train']:,} | {system} | {r['served_cells_per_s']:,.0f} | "
                f"{r['forward_cells_per_s']:,.0f} | {r['served_cells_per_epoch_s']:,.0f} | {r['peak_mib']:,.0f} |"
            )
        rows.append(
            f"| {name} | | | ours/scVI | {s['served_ratio_ours_over_scvi']:.2f}x | "
            f"{s['forward_ratio_ours_over_scvi']:.2f}x | {s['epoch_wall_ratio_ours_over_scvi']:.2f}x | |"
        )
    if "memory_bound" in results:
        rows += [
            "",
            "Peak memory of one training epoch (MiB above the RSS before `train()`):",
            "",
            "| training run | cells | " + " | ".join(T.ALLOCATORS) + " |",
            "|---|---:|" + "---:|" * len(T.ALLOCATORS),
        ]
        for label, r in results["memory_bound"].items():
            peaks = " | ".join(f"{r[a]:,.0f}" for a in T.ALLOCATORS)
            rows.append(f"| {label} | {r['n_cells']:,} | {peaks} |")
    T.write_results(output, results, rows)


if __name__ == "__main__":
    main()
