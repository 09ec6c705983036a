"""Scaling of the encoder with tissue size: Flowformer (linear) vs exact softmax attention.

Run from the repository root::

    python benchmarks/scaling.py            # default: 1k … 256k cells (flow), ~6 min on 2 cores
    python benchmarks/scaling.py --quick    # smoke run, < 1 min

One tissue of ``N`` cells goes through :class:`cellplm_scvi.nn.CellEncoder` (``--hidden`` 256,
``--layers`` 4, ``--heads`` 8, eval mode, ``torch.inference_mode()``, float32, input
``randn(N, D)``, one segment), for ``attention="flow"`` and ``"softmax"``. Each (attention, N) runs
in a fresh Python process: a first pass gives the peak resident memory (high-water mark above the
RSS before the pass, input and weights excluded), then timed passes give the time per forward
pass (median) and the memory first touched per pass (minor page faults × page size: freshly
mapped memory, paid page by page). At least ``--repeats`` passes are timed, and more (up to 100)
until ``--min-seconds`` of passes have run, so that the short passes of small tissues are not two
samples of a noisy machine. Sizes whose predicted time (the last measured time scaled by
``(N'/N)^2`` for softmax, ``N'/N`` for flow) exceeds ``--max-seconds`` per pass, or whose
predicted memory exceeds ``--max-memory-gib``, are skipped and recorded as skipped.

Linearity: time per cell at the largest flow size up to 64k over time per cell at 4k (target
<= 1.3; 1.0 is perfectly linear).

Writes ``benchmarks/results/scaling.{json,md}`` (``--quick``: ``scaling_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T


def worker(task: dict) -> dict:
    """Time and measure one encoder pass over one tissue (see the module docstring)."""
    import torch

    from cellplm_scvi.nn import CellEncoder

    torch.manual_seed(0)
    n = task["n_cells"]
    encoder = CellEncoder(task["hidden"], task["layers"], task["heads"], 0.1, task["attention"]).eval()
    x = torch.randn(n, task["hidden"])
    segment_ptr = torch.tensor([0, n])
    times = []
    with torch.inference_mode():
        with T.PeakMemory() as memory:
            start = time.perf_counter()
            out = encoder(x, segment_ptr)
            first = time.perf_counter() - start
        assert out.shape == x.shape and torch.isfinite(out).all()
        del out
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        while len(times) < task["repeats"] or (sum(times) < task["min_seconds"] and len(times) < 100):
            start = time.perf_counter()
            encoder(x, segment_ptr)
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    seconds = T.median(times)
    return {
        "seconds": seconds,
        "all_seconds": [round(t, 4) for t in times],
        "first_pass_seconds": round(first, 4),
        "us_per_cell": 1e6 * seconds / n,
        "peak_mib": round(memory.delta_mib, 1),
        "page_faults_mib_per_pass": round(faults * resource.getpagesize() / 2**20 / len(times), 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol."
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1000, 4000, 16000, 64000, 256000],
        help="tissue sizes (cells)",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per size, at least (median)")
    parser.add_argument(
        "--min-seconds", type=float, default=3.0, help="more passes until this much time has run (default 3)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=45, help="skip sizes predicted to take longer per pass"
    )
    parser.add_argument(
        "--max-memory-gib", type=float, default=12, help="skip sizes predicted to need more memory"
    )
    parser.add_argument("--attention", nargs="+", default=["flow", "softmax"], choices=["flow", "softmax"])
    T.add_run_arguments(parser, "1k and 4k cells, width 64, 2 repeats")
    args = parser.parse_args(argv)
    if args.worker:
        T.report(worker(json.loads(args.worker)))
        return
    T.prepare_run(args)
    if args.quick:
        args.sizes, args.hidden, args.repeats = [1000, 4000], 64, 2
    output = args.output or ("scaling_quick" if args.quick else "scaling")

    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    results = {
        **T.results_head("scaling", quiet),
        "encoder": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "dtype": "float32"},
        "runs": {a: {} for a in args.attention},
        "skipped": {a: {} for a in args.attention},
    }
    last = dict.fromkeys(args.attention)  # (n, seconds, peak_mib) of the last measured size
    for n in sorted(args.sizes):
        for attention in args.attention:
            if last[attention] is not None:
                n0, s0, m0 = last[attention]
                growth = (n / n0) ** 2 if attention == "softmax" else n / n0
                predicted_s = s0 * growth
                predicted_gib = max(m0, 1.0) * (n / n0) / 1024  # memory-efficient attention: linear in N
                if predicted_s > args.max_seconds or predicted_gib > args.max_memory_gib:
                    results["skipped"][attention][str(n)] = {
                        "predicted_seconds": round(predicted_s, 1),
                        "predicted_gib": round(predicted_gib, 2),
                    }
                    print(
                        f"{attention:8s} N={n:7d} skipped (predicted {predicted_s:.0f} s, {predicted_gib:.1f} GiB)",
                        flush=True,
                    )
                    continue
            task = {
                "n_cells": n,
                "attention": attention,
                "hidden": args.hidden,
                "layers": args.layers,
                "heads": args.heads,
                "repeats": args.repeats,
                "min_seconds": args.min_seconds,
            }
            result = T.run_worker(__file__, task)
            results["runs"][attention][str(n)] = result
            last[attention] = (n, result["seconds"], result["peak_mib"])
            print(
                f"{attention:8s} N={n:7d} {result['seconds']:8.3f} s/pass {result['us_per_cell']:8.2f} us/cell "
                f"peak {result['peak_mib']:8.1f} MiB faults {result['page_faults_mib_per_pass']:8.1f} MiB/pass load {result['load_1min_after']}",
                flush=True,
            )

    flow = results["runs"].get("flow", {})
    if "4000" in flow:
        largest = max((int(n) for n in flow if int(n) <= 64000), default=None)
        if largest and largest > 4000:
            ratio = flow[str(largest)]["us_per_cell"] / flow["4000"]["us_per_cell"]
            results["flow_linearity"] = {
                "time_per_cell_ratio": round(ratio, 3),
                "sizes": [largest, 4000],
                "target": 1.3,
                "met": ratio <= 1.3,
            }
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    info = results["machine"]
    rows = [
        f"Encoder scaling (D={args.hidden}, {args.layers} layers, {args.heads} heads, one tissue), "
        f"{T.machine_summary(info)}, load {quiet['load_1min']} at start; median of at least {args.repeats} passes "
        f"and {args.min_seconds:g} s of passes per size.",
        "",
        "| cells | flow s/pass | flow µs/cell | flow peak MiB | flow faults MiB/pass "
        "| softmax s/pass | softmax µs/cell | softmax peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(args.sizes):
        cells = []
        for attention in ("flow", "softmax"):
            run = results["runs"].get(attention, {}).get(str(n))
            empty = ["", "", ""] + ([""] if attention == "flow" else [])
            if run:
                cells += [f"{run['seconds']:.3f}", f"{run['us_per_cell']:.1f}", f"{run['peak_mib']:,.0f}"]
                if attention == "flow":
                    cells.append(f"{run['page_faults_mib_per_pass']:,.0f}")
            elif str(n) in results["skipped"].get(attention, {}):
                skip = results["skipped"][attention][str(n)]
                cells += [f"skipped (~{skip['predicted_seconds']:.0f} s)", *empty[1:]]
            else:
                cells += empty
        rows.append(f"| {n:,} | " + " | ".join(cells) + " |")
    if "flow_linearity" in results:
        lin = results["flow_linearity"]
        rows += [
            "",
            f"Flow time/cell at {lin['sizes'][0]:,} over 4,000 cells: {lin['time_per_cell_ratio']:.2f} "
            f"(target <= 1.3: {'met' if lin['met'] else 'missed'}).",
        ]
    T.write_results(output, results, rows)


if __name__ == "__main__":
    main()
