"""Cells per inference pass: how much does packing more cells into one forward pass save?

Run from the repository root::

    python benchmarks/inference_budget.py           # default: small and 85M configurations (~3 min)
    python benchmarks/inference_budget.py --quick   # smoke run, a few seconds

``get_latent_representation(batch_size=B)`` packs whole tissues into forward passes of at most
``B`` cells (a larger tissue goes alone); the default is ``inference_cells_per_batch(D)``. For
generated data (``--cells`` cells × 2,000 genes, equal tissues of each ``--tissue-sizes``), this
script times ``get_latent_representation`` at every budget of ``--budgets`` in one process,
alternating, ``--repeats`` rounds after a warm-up (medians), with random weights, for the small
configuration (D = 128) and the released 85M one (D = 1,024; ``--cells-85m`` cells, as it is
many times slower per cell).

Writes ``benchmarks/results/inference_budget.{json,md}`` (``--quick``: ``inference_budget_quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T
from embedding_speed import CONFIGS, OURS_COMMON


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000, help="cells for the small configuration")
    parser.add_argument("--cells-85m", type=int, default=4_000, help="cells for the 85M configuration")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["small", "85m"])
    parser.add_argument("--tissue-sizes", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    T.add_run_arguments(parser, "2,000 cells, small configuration, 1 repeat", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.configs, args.repeats = 2000, ["small"], 1
    output = args.output or ("inference_budget_quick" if args.quick else "inference_budget")

    import torch

    import cellplm_scvi as cps
    from cellplm_scvi.model._model import inference_cells_per_batch

    T.set_threads(args.threads)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)

    def seconds(model, budget: int) -> float:
        start = time.perf_counter()
        model.get_latent_representation(batch_size=budget)
        return time.perf_counter() - start

    rows = []
    for name in args.configs:
        n_cells = args.cells_85m if name == "85m" else args.cells
        for size in args.tissue_sizes:
            adata = T.synthetic_counts(n_cells, 2000, size, seed=0)
            cps.CellPLM.setup_anndata(adata, batch_key="batch")
            torch.manual_seed(0)
            model = cps.CellPLM(adata, **CONFIGS[name]["ours"], **OURS_COMMON)
            model.is_trained_ = True
            timers = {budget: partial(seconds, model, budget) for budget in args.budgets}
            medians = T.median_ms_side_by_side(timers, args.repeats, swap_order=True)
            width = model.module.embedder.genes.embedding_dim
            rows.append(
                {
                    "config": name,
                    "width": width,
                    "cells": n_cells,
                    "tissue_size": size,
                    "default_budget": inference_cells_per_batch(width),
                    "ms": {str(budget): round(ms, 1) for budget, ms in medians.items()},
                    "cells_per_s": {str(budget): round(n_cells / ms * 1e3) for budget, ms in medians.items()},
                }
            )
            print(rows[-1], flush=True)

    results = {
        **T.results_head("inference_budget", quiet),
        "repeats": args.repeats,
        "budgets": args.budgets,
        "rows": rows,
    }
    table = T.markdown_table(
        f"Embedding time by cells per forward pass, {T.machine_summary(results['machine'])}; "
        f"median of {args.repeats} alternating rounds, ms per `get_latent_representation` call.",
        ["config", "D>", "cells>", "cells per tissue>", "default budget>"]
        + [f"{budget:,} cells ms>" for budget in args.budgets],
        [
            [
                r["config"],
                f"{r['width']:,}",
                f"{r['cells']:,}",
                f"{r['tissue_size']:,}",
                f"{r['default_budget']:,}",
                *(f"{r['ms'][str(budget)]:.0f}" for budget in args.budgets),
            ]
            for r in rows
        ],
    )
    T.write_results(output, results, table)


if __name__ == "__main__":
    main()
