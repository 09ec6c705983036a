"""The ``flow_attention`` CPU strategy over many tissues: one tissue at a time, or all at once, against the reference.

Run from the repository root::

    python benchmarks/attention_packing.py           # default: 4,000 cells, D = 128 and 1,024 (~5 min)
    python benchmarks/attention_packing.py --quick   # smoke run, a few seconds

On a CPU, :class:`cellplm_scvi.nn.FlowAttention` hands its work to the ``flow_attention``
strategy (:mod:`cellplm_scvi.nn.cpu`), which attends tissue by tissue when the mean tissue size
of a minibatch reaches ``loop_threshold(D)`` and otherwise for all tissues at once (per-tissue
sums gathered to the cells' products). All at once, the last step contracts each tissue's
``d × d`` contexts in a loop over the tissues ("contexts"), or, below a mean of
``SQUARE_BELOW_CELLS_PER_TISSUE`` cells, every tissue's ``n × n`` scores in one padded batch
("squares"). For ``--cells`` cells cut into equal tissues of each size, this script times the
three paths and the reference module (strategies off), in one process, alternating,
``--repeats`` times (medians): inference (forward under ``torch.inference_mode()``) and training
(forward and backward).

Writes ``benchmarks/results/attention_packing.{json,md}`` (``--quick``: ``attention_packing_quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T

PATHS = {  # (loop threshold, square threshold); None: the reference module
    "reference": None,
    "one by one": (0, 0),
    "contexts": (10**9, 0),
    "squares": (10**9, 10**9),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[128, 1024], help="D (heads: D / 32, at most 8)"
    )
    parser.add_argument(
        "--tissue-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512, 1000]
    )
    parser.add_argument("--repeats", type=int, default=3)
    T.add_run_arguments(parser, "1,000 cells, D = 128, 2 sizes, 1 repeat", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.widths, args.tissue_sizes, args.repeats = 1000, [128], [8, 500], 1
    output = args.output or ("attention_packing_quick" if args.quick else "attention_packing")

    import torch

    from cellplm_scvi.nn import FlowAttention, cpu

    loop_threshold, square_below = cpu._attention.loop_threshold, cpu._attention.SQUARE_BELOW_CELLS_PER_TISSUE

    T.set_threads(args.threads)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    torch.manual_seed(0)

    def seconds(attention, thresholds: tuple[int, int] | None, segment_ptr, width: int, train: bool) -> float:
        loop, square = thresholds or (0, 0)
        cpu._attention.loop_threshold = lambda n_hidden: loop
        cpu._attention.SQUARE_BELOW_CELLS_PER_TISSUE = square
        x = torch.randn(int(segment_ptr[-1]), width)
        try:
            with cpu.cpu_strategies(thresholds is not None):
                start = time.perf_counter()
                if train:
                    attention(x.requires_grad_(), segment_ptr).sum().backward()
                else:
                    with torch.inference_mode():
                        attention(x, segment_ptr)
                return time.perf_counter() - start
        finally:
            cpu._attention.loop_threshold = loop_threshold
            cpu._attention.SQUARE_BELOW_CELLS_PER_TISSUE = square_below

    rows = []
    for width in args.widths:
        attention = FlowAttention(width, min(8, width // 32))
        for size in args.tissue_sizes:
            n_tissues = args.cells // size
            segment_ptr = torch.arange(0, n_tissues * size + 1, size)
            for mode in ("inference", "training"):
                timers = {
                    path: partial(seconds, attention, thresholds, segment_ptr, width, mode == "training")
                    for path, thresholds in PATHS.items()
                }
                medians = T.median_ms_side_by_side(timers, args.repeats)
                rows.append(
                    {
                        "width": width,
                        "tissue_size": size,
                        "mode": mode,
                        **{f"{path.replace(' ', '_')}_ms": round(ms, 1) for path, ms in medians.items()},
                        "fastest": min(medians, key=medians.get),
                    }
                )
                print(rows[-1], flush=True)

    default = {width: loop_threshold(width) for width in args.widths}
    results = {
        "benchmark": "attention_packing",
        "machine": T.machine_info(),
        "wait_for_quiet": quiet,
        "cells": args.cells,
        "repeats": args.repeats,
        "loop_threshold": default,
        "square_below_cells_per_tissue": square_below,
        "rows": rows,
    }
    info = results["machine"]
    table = T.markdown_table(
        f"Flow attention packing, {args.cells:,} cells in equal tissues, {T.machine_summary(info)}; "
        f"median of {args.repeats}. Default: one by one from "
        + ", ".join(f"{size} cells per tissue at D = {width:,}" for width, size in default.items())
        + f"; all at once through squares below {square_below} cells per tissue.",
        [
            "D>",
            "cells per tissue>",
            "mode",
            "reference ms>",
            "one by one ms>",
            "contexts ms>",
            "squares ms>",
            "fastest",
        ],
        [
            [
                str(r["width"]),
                f"{r['tissue_size']:,}",
                r["mode"],
                f"{r['reference_ms']:.1f}",
                f"{r['one_by_one_ms']:.1f}",
                f"{r['contexts_ms']:.1f}",
                f"{r['squares_ms']:.1f}",
                r["fastest"],
            ]
            for r in rows
        ],
    )
    T.write_results(output, results, table)


if __name__ == "__main__":
    main()
