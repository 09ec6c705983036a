"""How close the encoder forward comes to the machine's matrix-multiply speed (85M configuration).

Run from the repository root::

    python benchmarks/hardware_limit.py           # default: 4,000 cells, 5 alternating repeats (~1 min)
    python benchmarks/hardware_limit.py --quick   # smoke run, < 1 min

Measured in one process, alternating, ``--repeats`` times (medians):

* the FLOP/s of one large ``torch.matmul`` (``--matmul-size`` square, float32; ``2 n^3`` FLOPs);
* the FLOP/s of :class:`cellplm_scvi.nn.CellEncoder` at the released configuration (width
  ``D = 1024``, 4 Flowformer layers, ``H = 8`` heads of ``d = D / H = 128``, feed-forward ``2D``) on
  one tissue of ``--cells`` cells, eval mode, ``torch.inference_mode()``;
* the FLOP/s of the original CellPLM's encoder (its ``TransformerEncoder`` of Flowformer layers,
  which issues the same matrix products) at the same configuration on the same cells, when the
  original package is installed (``pip install --no-deps cellplm einops torchmetrics``; skipped
  otherwise or with ``--no-reference``).

FLOPs of the encoder, counted analytically (multiply-add = 2 FLOPs), per layer, for ``N`` cells:

* query, key, value and output projections: ``4 * 2 N D^2``;
* feed-forward ``D -> 2D -> D``: ``2 * 2 N D (2D) = 8 N D^2``;
* Flowformer core per head: ``K^T (C V)`` is ``2 n d^2`` and ``(I Q) (K^T C V)`` another ``2 n d^2``,
  so ``4 N D d`` over all heads;
* element-wise work (sigmoid, flow sums and normalisers, LayerNorm, GELU, biases, residuals;
  about ``40 N D`` FLOPs) is not counted (< 0.3 % of the total at D = 1024).

Total ``L * (16 N D^2 + 4 N D d)``; at N = 4,000, D = 1,024, d = 128, L = 4 that is 2.77e11 FLOPs.
The achieved fraction is encoder FLOP/s over matmul FLOP/s (target >= 0.70), both medians;
the *ceiling* is the encoder cells/s if every FLOP ran at the matmul FLOP/s and nothing else
took time (an upper bound for any float32 implementation of these layers on this machine), and
the ceiling over the original's encoder speed is the largest speed-up over the original that
these layers allow here in float32. Each round (matmul, then the encoders, their order swapped
every round) starts only when no other process is using the CPUs, and the per-round fractions and
ratios are stored too. A profile of one
encoder pass (time per operator kind) is stored with the result to show where the rest goes.

Writes ``benchmarks/results/hardware_limit.{json,md}`` (``--quick``: ``hardware_limit_quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T


def encoder_flops(n: int, d_model: int, n_layers: int, n_heads: int) -> float:
    """Analytic FLOPs of one CellEncoder forward (see the module docstring)."""
    head = d_model // n_heads
    return n_layers * (16 * n * d_model**2 + 4 * n * d_model * head)


def reference_encoder(d_model: int, n_layers: int, n_heads: int):
    """The original CellPLM's Flowformer encoder at this configuration, or None if not installed."""
    try:
        from CellPLM.encoder.transformer import TransformerEncoder
    except ImportError:
        return None
    return TransformerEncoder(d_model, n_heads, n_layers, 0.2, "gelu", model_type="flowformer").eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for the FLOP count."
    )
    parser.add_argument("--cells", type=int, default=4000, help="cells in the tissue (default 4000)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-reference", action="store_true", help="do not time the original CellPLM's encoder"
    )
    T.add_run_arguments(parser, "1,000 cells, matmul 2048, 2 repeats", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.matmul_size, args.repeats = 1000, 2048, 2
    output = args.output or ("hardware_limit_quick" if args.quick else "hardware_limit")

    import torch
    from torch.profiler import profile

    from cellplm_scvi.nn import CellEncoder

    T.prepare_run(args)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    torch.manual_seed(0)
    encoder = CellEncoder(args.hidden, args.layers, args.heads, 0.2, "flow").eval()
    reference = None if args.no_reference else reference_encoder(args.hidden, args.layers, args.heads)
    x = torch.randn(args.cells, args.hidden)
    segment_ptr = torch.tensor([0, args.cells])
    a = torch.randn(args.matmul_size, args.matmul_size)
    b = torch.randn(args.matmul_size, args.matmul_size)
    flops_encoder = encoder_flops(args.cells, args.hidden, args.layers, args.heads)
    flops_matmul = 2.0 * args.matmul_size**3

    calls = {"matmul": lambda: torch.matmul(a, b), "ours": lambda: encoder(x, segment_ptr)}
    if reference is not None:
        calls["reference"] = lambda: reference({"h": x})
    seconds = {name: [] for name in calls}

    def one_round(order: list[str]) -> dict[str, float]:
        timed = {}
        for name in order:
            start = time.perf_counter()
            calls[name]()
            timed[name] = time.perf_counter() - start
        return timed

    with torch.inference_mode():
        one_round(list(calls))  # warm-up
        gates = []
        for repeat in range(args.repeats):
            encoders = [name for name in calls if name != "matmul"]
            order = ["matmul", *(encoders[::-1] if repeat % 2 else encoders)]
            for _attempt in range(T.IDLE_GATE["attempts"]):  # measure the round again if disturbed
                gate = T.wait_for_idle_cpus(T.IDLE_GATE["max_busy"], T.IDLE_GATE["timeout_s"])
                with T.OthersCpu() as others:
                    timed = one_round(order)
                gate["others_cpu_share_during"] = round(others.share, 3)
                if others.share <= T.IDLE_GATE["max_others_during"]:
                    break
            gates.append(gate)
            for name, value in timed.items():
                seconds[name].append(value)
        with profile() as prof:
            encoder(x, segment_ptr)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in events)
    breakdown = {
        e.key: {
            "share": round(e.self_cpu_time_total / total_us, 4),
            "ms": round(e.self_cpu_time_total / 1e3, 2),
            "calls": e.count,
        }
        for e in events[:12]
    }
    matmul_gflops = flops_matmul / T.median(seconds["matmul"]) / 1e9
    ceiling_cells_per_s = matmul_gflops * 1e9 / (flops_encoder / args.cells)

    def encoder_summary(name: str) -> dict:
        gflops = flops_encoder / T.median(seconds[name]) / 1e9
        per_round = [
            m / e * flops_encoder / flops_matmul
            for m, e in zip(seconds["matmul"], seconds[name], strict=True)
        ]
        return {
            "seconds": [round(s, 4) for s in seconds[name]],
            "gflops_per_s": round(gflops, 1),
            "cells_per_s": round(args.cells / T.median(seconds[name]), 1),
            "fraction_of_matmul": round(gflops / matmul_gflops, 3),
            "fraction_per_round": [round(f, 3) for f in per_round],
        }

    ours = encoder_summary("ours")
    fraction = ours["fraction_of_matmul"]
    results = {
        **T.results_head("hardware_limit", quiet),
        "config": {
            "cells": args.cells,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "feed_forward": 2 * args.hidden,
            "dtype": "float32",
        },
        "encoder_flops": flops_encoder,
        "matmul": {
            "size": args.matmul_size,
            "flops": flops_matmul,
            "seconds": [round(s, 4) for s in seconds["matmul"]],
            "gflops_per_s": round(matmul_gflops, 1),
        },
        "ceiling_cells_per_s": round(ceiling_cells_per_s, 1),
        "encoder": ours,
        "fraction_of_matmul": fraction,
        "idle_gates": gates,
        "target": 0.70,
        "met": fraction >= 0.70,
        "profile_self_cpu": breakdown,
    }
    info = results["machine"]
    rows = [
        f"Hardware limit (encoder D={args.hidden}, {args.layers} flow layers, {args.heads} heads, "
        f"{args.cells:,} cells, float32), {T.machine_summary(info)}, load {quiet['load_1min']} at start; "
        f"median of {args.repeats}. Matmul ({args.matmul_size}², float32): {matmul_gflops:.1f} GFLOP/s.",
        "",
        "| encoder | GFLOP/s | cells/s | fraction of matmul (rounds) | speed over the original's |",
        "|---|---:|---:|---|---:|",
    ]

    def row(label: str, summary: dict) -> str:
        over = ""
        if reference is not None:
            over = f"{summary['cells_per_s'] / results['reference_encoder']['cells_per_s']:.2f}×"
        rounds = summary.get("fraction_per_round")
        spread = f" ({min(rounds):.2f}–{max(rounds):.2f})" if rounds else ""
        return (
            f"| {label} | {summary['gflops_per_s']:.1f} | {summary['cells_per_s']:,.0f} | "
            f"{summary['fraction_of_matmul']:.2f}{spread} | {over} |"
        )

    if reference is not None:
        results["reference_encoder"] = encoder_summary("reference")
        per_round = [r / o for o, r in zip(seconds["ours"], seconds["reference"], strict=True)]
        results["ours_over_reference_per_round"] = [round(v, 3) for v in per_round]
        results["ceiling_over_reference"] = round(
            ceiling_cells_per_s / results["reference_encoder"]["cells_per_s"], 3
        )
    ceiling = {"gflops_per_s": matmul_gflops, "cells_per_s": ceiling_cells_per_s, "fraction_of_matmul": 1.0}
    rows.append(row(f"ours (target ≥ 0.70 of matmul: {'met' if fraction >= 0.70 else 'missed'})", ours))
    if reference is not None:
        rows.append(row("original CellPLM", results["reference_encoder"]))
    rows += [
        row("ceiling: every FLOP at the matmul rate", ceiling),
        "",
        "Top operators of one pass of ours (self CPU time): "
        + ", ".join(f"{k} {v['share']:.0%}" for k, v in list(breakdown.items())[:6])
        + ".",
    ]
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    T.write_results(output, results, rows)


if __name__ == "__main__":
    main()
