"""The ``gene_bag`` CPU strategy: sparse bag or dense product, by density, width and mode, against the reference.

Run from the repository root::

    python benchmarks/embedder_paths.py           # default: 2,000 cells x 2,000 genes (~1 min)
    python benchmarks/embedder_paths.py --quick   # smoke run, a few seconds

:class:`cellplm_scvi.nn.GeneBagEmbedder` computes ``log1p(counts) @ E``; on a CPU its
``gene_bag`` strategy (:mod:`cellplm_scvi.nn.cpu`) takes either an ``EmbeddingBag`` over the
stored entries, read in cache-sized column blocks without gradients ("bag"), or a dense matrix
product ("dense"), by a density threshold. For random counts at each density and width ``D``,
this script times both and the reference module (strategies off), in one process,
alternating, ``--repeats`` times (medians):

* ``inference``: forward under ``torch.inference_mode()``;
* ``training``: forward and backward of a scalar loss (the gradient reaches the gene table).

The strategy's crossover densities (``cpu._embedder.dense_threshold``) come from these numbers.
Writes ``benchmarks/results/embedder_paths.{json,md}`` (``--quick``: ``embedder_paths_quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.33, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    T.add_run_arguments(parser, "500 cells, 2 densities, 2 repeats", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.densities, args.repeats = 500, [0.02, 0.2], 2
    output = args.output or ("embedder_paths_quick" if args.quick else "embedder_paths")

    import torch

    from cellplm_scvi.nn import GeneBagEmbedder, cpu

    T.set_threads(args.threads)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    generator = torch.Generator().manual_seed(0)

    default_threshold = cpu._embedder.dense_threshold

    def seconds(embedder, csr, train: bool, path: str) -> float:
        forced = {"bag": 2.0, "dense": -1.0}.get(path)
        cpu._embedder.dense_threshold = default_threshold if forced is None else (lambda d, t: forced)
        try:
            with cpu.cpu_strategies(path != "reference"):
                start = time.perf_counter()
                if train:
                    embedder(*csr).square().sum().backward()
                else:
                    with torch.inference_mode():
                        embedder(*csr)
                return time.perf_counter() - start
        finally:
            cpu._embedder.dense_threshold = default_threshold

    rows = []
    for width in args.widths:
        for density in args.densities:
            shape = (args.cells, args.genes)
            stored = torch.rand(shape, generator=generator) < density
            counts = (stored * torch.randint(1, 10, shape, generator=generator)).float().to_sparse_csr()
            csr = (counts.crow_indices(), counts.col_indices(), counts.values())
            embedder = GeneBagEmbedder(args.genes, width)
            for mode in ("inference", "training"):
                timers = {
                    path: partial(seconds, embedder, csr, mode == "training", path)
                    for path in ("reference", "bag", "dense")
                }
                medians = T.median_ms_side_by_side(timers, args.repeats)
                bag_ms, dense_ms = medians["bag"], medians["dense"]
                rows.append(
                    {
                        "width": width,
                        "density": density,
                        "mode": mode,
                        "reference_ms": round(medians["reference"], 2),
                        "bag_ms": round(bag_ms, 2),
                        "dense_ms": round(dense_ms, 2),
                        "faster": "bag" if bag_ms < dense_ms else "dense",
                        "chosen_by_default": _default_choice(width, density, mode),
                    }
                )
                print(rows[-1], flush=True)

    results = {
        "benchmark": "embedder_paths",
        "machine": T.machine_info(),
        "wait_for_quiet": quiet,
        "cells": args.cells,
        "genes": args.genes,
        "repeats": args.repeats,
        "rows": rows,
    }
    info = results["machine"]
    table = T.markdown_table(
        f"Embedder paths, {args.cells:,} cells x {args.genes:,} genes, {T.machine_summary(info)}; "
        f"median of {args.repeats}.",
        ["D>", "density>", "mode", "reference ms>", "bag ms>", "dense ms>", "faster", "default choice"],
        [
            [
                str(r["width"]),
                f"{r['density']:.0%}",
                r["mode"],
                f"{r['reference_ms']:.1f}",
                f"{r['bag_ms']:.1f}",
                f"{r['dense_ms']:.1f}",
                r["faster"],
                r["chosen_by_default"],
            ]
            for r in rows
        ],
    )
    T.write_results(output, results, table)


def _default_choice(width: int, density: float, mode: str) -> str:
    """The path the ``gene_bag`` strategy takes at this width, density and mode."""
    from cellplm_scvi.nn import cpu

    return "dense" if density > cpu._embedder.dense_threshold(width, mode == "training") else "bag"


if __name__ == "__main__":
    main()
