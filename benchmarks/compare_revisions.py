"""Speed of two source trees of cellplm-scvi side by side: a baseline revision and the working tree.

Run from the repository root, with a baseline checked out beside it::

    git worktree add ../cellplm_baseline <commit>
    python benchmarks/compare_revisions.py --baseline ../cellplm_baseline            # ~15 min, 2 cores
    python benchmarks/compare_revisions.py --baseline ../cellplm_baseline --quick    # ~5 min
    git worktree remove ../cellplm_baseline

Figures compared, each measured as the script that reports it measures ours:

* ``embed_small`` and ``embed_85m``: embedding end to end, AnnData in -> embeddings in ``obsm``
  (``embedding_speed.worker_end_to_end``: setup, build with random weights, float32
  ``get_latent_representation()``, after imports and reading the data), on ``--cells``
  generated cells x 2,000 genes in tissues of ``--cells-per-tissue``; cells/s counts the total;
* ``train_pancreas``: training on the pancreas data (``training_speed.worker``: ``CellPLM(adata)``
  with its defaults, ``--pancreas-epochs`` epochs); served cells/s, median over epochs 2..E.

Every measurement runs in a fresh process of this tree's benchmark code with
``PYTHONPATH=<tree>/src``, so that ``import cellplm_scvi`` resolves to that tree; the worker checks
where it resolved and reports the file. Baseline and new alternate, the order swapped every
repeat, ``--repeats`` times; the medians and the per-repeat ratios new / baseline are reported.
The check (``--min-ratio``, default 0.95): every figure's ratio of medians new / baseline is at
least that; ``--check`` makes the exit status 1 when one is not.

Writes ``benchmarks/results/compare_revisions.{json,md}`` (``--quick``: ``compare_revisions_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as T

FIGURES = {
    # name: (worker kind, embedding configuration, speed field, label)
    "embed_small": ("embedding", "small", "cells_per_s", "embedding end to end, small, cells/s"),
    "embed_85m": ("embedding", "85m", "cells_per_s", "embedding end to end, 85M, cells/s"),
    "train_pancreas": ("training", None, "served_cells_per_s", "training, pancreas, served cells/s"),
}
SYSTEMS = ("baseline", "new")


# ------------------------------------------------------------------ worker (fresh process)
def worker(task: dict) -> dict:
    """Run one measurement with the ``cellplm_scvi`` of ``task["tree"]``.

    Raises
    ------
    RuntimeError
        When ``import cellplm_scvi`` does not resolve into ``<tree>/src``.
    """
    import cellplm_scvi

    resolved = Path(cellplm_scvi.__file__).resolve()
    print(f"cellplm_scvi from {resolved}", flush=True)
    if not resolved.is_relative_to(Path(task["tree"]).resolve() / "src"):
        raise RuntimeError(f"cellplm_scvi resolved to {resolved}, not into {task['tree']}/src")
    if task["kind"] == "embedding":
        from embedding_speed import worker_end_to_end

        result = worker_end_to_end(task)
    else:
        from training_speed import worker as training_worker

        result = training_worker(task)
        result.pop("epochs")  # per-epoch details: the summary fields are what is compared
    # the file relative to its tree: results files hold no machine paths
    return {**result, "cellplm_scvi_file": str(resolved.relative_to(Path(task["tree"]).resolve()))}


# ------------------------------------------------------------------ driver
def describe_tree(tree: Path) -> dict:
    """Return the tree's name, its commit and whether its ``src`` has uncommitted changes.

    The name is ``"this repository"`` or the folder's name (results files hold no machine paths).
    """
    info = {"name": "this repository" if tree == T.REPOSITORY else tree.name}

    def git(*args):
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    info["commit"] = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--", "src")
    info["src_changed_since_commit"] = bool(status) if status is not None else None
    return info


def tree_label(info: dict) -> str:
    """Return ``"<commit>"``, with ``" + changes"`` when ``src`` differs from it."""
    label = info["commit"] or info["name"]
    return label + (" + changes" if info["src_changed_since_commit"] else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (benchmarks/compare_revisions.py) for the protocol.",
    )
    parser.add_argument("--baseline", type=Path, help="source tree of the baseline (holds src/cellplm_scvi)")
    parser.add_argument(
        "--new", type=Path, default=T.REPOSITORY, help="source tree of the new version (default: this one)"
    )
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument(
        "--cells", type=int, default=20_000, help="embedding: generated cells (default 20000)"
    )
    parser.add_argument(
        "--cells-per-tissue", type=int, default=2000, help="embedding: cells per tissue (default 2000)"
    )
    parser.add_argument("--pancreas-epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (default 5)")
    parser.add_argument(
        "--min-ratio", type=float, default=0.95, help="least acceptable ratio new / baseline (default 0.95)"
    )
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a ratio is below it")
    T.add_run_arguments(parser, "4,000 cells, 3 training epochs, 2 repeats")
    args = parser.parse_args(argv)
    if args.worker:
        T.report(worker(json.loads(args.worker)))
        return 0
    if args.baseline is None:
        parser.error("--baseline is required")
    trees = {"baseline": args.baseline.resolve(), "new": args.new.resolve()}
    for name, tree in trees.items():
        if not (tree / "src" / "cellplm_scvi" / "__init__.py").is_file():
            parser.error(f"--{name} {tree}: no src/cellplm_scvi/__init__.py")
    T.prepare_run(args)
    if args.quick:
        args.cells, args.pancreas_epochs, args.repeats = 4000, 3, 2
    output = args.output or ("compare_revisions_quick" if args.quick else "compare_revisions")
    envs = {
        name: {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))}
        for name, tree in trees.items()
    }

    workdir = Path(tempfile.mkdtemp(prefix="cellplm_compare_revisions_"))
    try:
        if any(FIGURES[f][0] == "embedding" for f in args.figures):
            from embedding_speed import write_data

            print(f"generating {args.cells:,} cells ...", flush=True)
            _, data_path, data_info = write_data(workdir, args.cells, 2000, args.cells_per_tissue)
        quiet = T.wait_for_quiet(args.max_load, args.max_wait)
        results = {
            **T.results_head("compare_revisions", quiet),
            "trees": {name: describe_tree(tree) for name, tree in trees.items()},
            "repeats": args.repeats,
            "min_ratio": args.min_ratio,
            "runs": {},
            "summary": {},
        }
        if any(FIGURES[f][0] == "embedding" for f in args.figures):
            results["embedding_data"] = data_info
        for figure in args.figures:
            kind, config, key, _label = FIGURES[figure]
            if kind == "embedding":
                task = {
                    "measure": "end_to_end",
                    "system": "ours",
                    "config": config,
                    "data_path": str(data_path),
                    "workdir": str(workdir),
                    "ours_precision": "32",
                }
            else:
                from training_speed import PANCREAS

                task = {
                    "system": "ours",
                    "data_path": str(PANCREAS),
                    "layer": "counts",
                    "batch_key": None,
                    "epochs": args.pancreas_epochs,
                }

            def progress(system, result, figure=figure, key=key):
                print(
                    f"{figure:15s} {system:8s} {result[key]:9.0f}/s  peak {result['peak_mib']:7.1f} MiB  "
                    f"load {result['load_1min_after']}  cellplm_scvi from "
                    f"{trees[system] / result['cellplm_scvi_file']}",
                    flush=True,
                )

            runs = T.alternating_runs(
                __file__,
                {name: {**task, "kind": kind, "tree": str(trees[name])} for name in SYSTEMS},
                args.repeats,
                envs=envs,
                timeout_s=1800,
                on_result=progress,
            )
            results["runs"][figure] = runs
            speed = T.ratios(runs["new"], runs["baseline"], key)
            memory = T.ratios(runs["new"], runs["baseline"], "peak_mib")
            results["summary"][figure] = {
                **{name: {key: round(T.median(r[key] for r in runs[name]), 1)} for name in SYSTEMS},
                **{
                    f"{name}_peak_mib": round(T.median(r["peak_mib"] for r in runs[name]), 1)
                    for name in SYSTEMS
                },
                "speed_ratio_new_over_baseline": speed["median_ratio"],
                "speed_ratio_per_repeat": speed["per_repeat"],
                "memory_ratio_new_over_baseline": memory["median_ratio"],
                "met": speed["median_ratio"] >= args.min_ratio,
            }
        results["all_met"] = all(s["met"] for s in results["summary"].values())
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = results["machine"]
    labels = {name: tree_label(results["trees"][name]) for name in SYSTEMS}
    caption = (
        f"Revisions side by side: baseline {labels['baseline']}, new {labels['new']}; "
        f"{T.machine_summary(info)}, load {quiet['load_1min']} at start; median of {args.repeats} "
        f"alternating fresh-process repeats; check: new / baseline >= {args.min_ratio:g}."
    )
    rows = []
    for figure, s in results["summary"].items():
        key, label = FIGURES[figure][2], FIGURES[figure][3]
        rows.append(
            [
                label,
                f"{s['baseline'][key]:,.0f}",
                f"{s['new'][key]:,.0f}",
                f"{s['speed_ratio_new_over_baseline']:.2f}",
                ", ".join(f"{r:.2f}" for r in s["speed_ratio_per_repeat"]),
                f"{s['baseline_peak_mib']:,.0f} / {s['new_peak_mib']:,.0f}",
                "met" if s["met"] else "missed",
            ]
        )
    columns = [
        "figure",
        "baseline>",
        "new>",
        "new / baseline>",
        "per repeat",
        "peak MiB (baseline / new)>",
        "check",
    ]
    table = [
        *T.markdown_table(caption, columns, rows),
        "",
        f"Embedding: {args.cells:,} generated cells x 2,000 genes in tissues of {args.cells_per_tissue:,}, "
        f"float32. Training: pancreas (3,696 cells x 2,000 genes), {args.pancreas_epochs} epochs.",
    ]
    T.write_results(output, results, table)
    return 1 if args.check and not results["all_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
