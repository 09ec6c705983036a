"""GroupNorm of per-cell rows: ``torch.nn.GroupNorm`` against ``cellplm_scvi.nn.GroupNorm``.

Run from the repository root::

    python benchmarks/group_norm.py           # default: 2,000 rows, C = 128 and 1,024 (~1 min)
    python benchmarks/group_norm.py --quick   # smoke run, a few seconds

The token projection and the decoder normalise ``(N, C)`` rows in 4 groups of channels. For each
width, this script times torch's GroupNorm and ours (a layer norm per group, then the affine map)
in one process, alternating, ``--repeats`` rounds of ``--calls`` calls each (medians): inference
(forward under ``torch.inference_mode()``) and training (forward and backward). It also records
the largest difference between the two outputs.

Writes ``benchmarks/results/group_norm.{json,md}`` (``--quick``: ``group_norm_quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing as T


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=15)
    T.add_run_arguments(parser, "200 rows, C = 128, 3 rounds of 5 calls", workers=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.widths, args.calls, args.repeats = 200, [128], 5, 3
    output = args.output or ("group_norm_quick" if args.quick else "group_norm")

    import torch

    from cellplm_scvi.nn import GroupNorm

    T.set_threads(args.threads)
    quiet = T.wait_for_quiet(args.max_load, args.max_wait)
    torch.manual_seed(0)

    def seconds(norm, x: torch.Tensor, train: bool) -> float:
        x = x.detach().clone()  # a fresh leaf for every timed round
        start = time.perf_counter()
        for _ in range(args.calls):
            if train:
                norm(x.requires_grad_()).sum().backward()
            else:
                with torch.inference_mode():
                    norm(x)
        return (time.perf_counter() - start) / args.calls

    rows = []
    for width in args.widths:
        ours = GroupNorm(args.groups, width)
        with torch.no_grad():
            ours.weight.normal_(), ours.bias.normal_()
        norms = {"torch": torch.nn.GroupNorm(args.groups, width), "ours": ours}
        norms["torch"].load_state_dict(ours.state_dict())
        x = torch.randn(args.rows, width)
        with torch.inference_mode():
            difference = (norms["torch"](x) - ours(x)).abs().max().item()
        for mode in ("inference", "training"):
            timers = {name: partial(seconds, norm, x, mode == "training") for name, norm in norms.items()}
            medians = T.median_ms_side_by_side(timers, args.repeats, swap_order=True)
            torch_ms, ours_ms = medians["torch"], medians["ours"]
            rows.append(
                {
                    "width": width,
                    "mode": mode,
                    "torch_ms": round(torch_ms, 3),
                    "ours_ms": round(ours_ms, 3),
                    "speedup": round(torch_ms / ours_ms, 2),
                    "max_abs_difference": difference,
                }
            )
            print(rows[-1], flush=True)

    results = {
        "benchmark": "group_norm",
        "machine": T.machine_info(),
        "wait_for_quiet": quiet,
        "rows": args.rows,
        "groups": args.groups,
        "calls": args.calls,
        "repeats": args.repeats,
        "results": rows,
    }
    table = T.markdown_table(
        f"GroupNorm of {args.rows:,} rows in {args.groups} groups, {T.machine_summary(results['machine'])}; "
        f"median of {args.repeats} rounds of {args.calls} calls.",
        ["C>", "mode", "torch.nn.GroupNorm ms>", "ours ms>", "ours faster by>", "largest output difference>"],
        [
            [
                f"{r['width']:,}",
                r["mode"],
                f"{r['torch_ms']:.3f}",
                f"{r['ours_ms']:.3f}",
                f"{r['speedup']:.2f}×",
                f"{r['max_abs_difference']:.1e}",
            ]
            for r in rows
        ],
    )
    T.write_results(output, results, table)


if __name__ == "__main__":
    main()
