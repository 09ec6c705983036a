"""Flow attention over many tissues: one tissue at a time, or all at once?

Run from the repository root::

    python benchmarks/attention_packing.py           # default: 4,000 cells, D = 128 and 1,024 (~2 min)
    python benchmarks/attention_packing.py --quick   # smoke run, a few seconds

:class:`cellplm_scvi.nn.FlowAttention` attends tissue by tissue when the mean tissue size of a
minibatch reaches ``loop_above_cells_per_tissue`` (``loop_threshold(D)``) and otherwise for all
tissues at once (per-tissue sums gathered to every cell). For ``--cells`` cells cut into equal tissues of each size, this
script times both paths, in one process, alternating, ``--repeats`` times (medians): inference
(forward under ``torch.inference_mode()``) and training (forward and backward).

Writes ``benchmarks/results/attention_packing.{json,md}`` (``--quick``: ``attention_packing_quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing as T

PATHS = {"one by one": 0, "all at once": 10**9}  # values of loop_above_cells_per_tissue


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[128, 1024], help="D (heads: D / 32, at most 8)"
    )
    parser.add_argument("--tissue-sizes", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    T.add_run_arguments(parser, "1,000 cells, D = 128, 2 sizes, 1 repeat", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.widths, args.tissue_sizes, args.repeats = 1000, [128], [16, 500], 1
    output = args.output or ("attention_packing_quick" if args.quick else "attention_packing")

    import torch

    from cellplm_scvi.nn import FlowAttention
    from cellplm_scvi.nn._attention import loop_threshold

    T.set_threads(args.threads)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    torch.manual_seed(0)

    def seconds(attention, loop_above: int, segment_ptr, width: int, train: bool) -> float:
        attention.loop_above_cells_per_tissue = loop_above
        x = torch.randn(int(segment_ptr[-1]), width)
        start = time.perf_counter()
        if train:
            attention(x.requires_grad_(), segment_ptr).sum().backward()
        else:
            with torch.inference_mode():
                attention(x, segment_ptr)
        return time.perf_counter() - start

    rows = []
    for width in args.widths:
        attention = FlowAttention(width, min(8, width // 32))
        for size in args.tissue_sizes:
            n_tissues = args.cells // size
            segment_ptr = torch.arange(0, n_tissues * size + 1, size)
            for mode in ("inference", "training"):
                timers = {
                    path: partial(seconds, attention, above, segment_ptr, width, mode == "training")
                    for path, above in PATHS.items()
                }
                medians = T.median_ms_side_by_side(timers, args.repeats)
                one, alll = medians["one by one"], medians["all at once"]
                rows.append(
                    {
                        "width": width,
                        "tissue_size": size,
                        "mode": mode,
                        "one_by_one_ms": round(one, 1),
                        "all_at_once_ms": round(alll, 1),
                        "faster": "one by one" if one < alll else "all at once",
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
        "loop_above_cells_per_tissue": default,
        "rows": rows,
    }
    info = results["machine"]
    table = T.markdown_table(
        f"Flow attention packing, {args.cells:,} cells in equal tissues, {T.machine_summary(info)}; "
        f"median of {args.repeats}. Default: one by one from "
        + ", ".join(f"{size} cells per tissue at D = {width:,}" for width, size in default.items())
        + ".",
        ["D>", "cells per tissue>", "mode", "one by one ms>", "all at once ms>", "faster"],
        [
            [
                str(r["width"]),
                f"{r['tissue_size']:,}",
                r["mode"],
                f"{r['one_by_one_ms']:.1f}",
                f"{r['all_at_once_ms']:.1f}",
                r["faster"],
            ]
            for r in rows
        ],
    )
    T.write_results(output, results, table)


if __name__ == "__main__":
    main()
