"""Embedding speed and peak memory: cellplm-scvi vs the original CellPLM, at identical configurations.

Run from the repository root (the original package must be importable: ``pip install --no-deps
cellplm einops torchmetrics``; its config file is read from ``../shared/reference``)::

    python benchmarks/embedding_speed.py            # default: 20,000 cells, 3 repeats (~6 min, 2 cores)
    python benchmarks/embedding_speed.py --quick    # smoke run, < 1 min

Configurations (both systems built from the same numbers; random weights):

* ``85m``: the released CellPLM architecture — gene table width 1024, 4 Flowformer layers, 8 heads,
  feed-forward 2048, latent 512, dropout 0.2, GroupNorm token projection — with the plain Gaussian
  latent (reference ``latent_mod="vae"``; ours ``CellPLM(adata, preset="cellplm-85m",
  latent="normal", use_positional_encoding=False)``);
* ``small``: width 128, 2 layers, 4 heads, latent 32 (ours: the default architecture with
  ``latent="normal"``).

Data: ``--cells`` cells x 2,000 genes (the first 2,000 Ensembl IDs of the reference gene list, so
the reference aligns them), negative-binomial counts with ~90 % zeros, tissues of
``--cells-per-tissue`` cells in ``obs["batch"]`` (the reference's tissue column; ours registers it
as ``batch_key``).

Measurements, each in a fresh Python process, alternating reference / ours, ``--repeats`` times;
the medians are reported and the ratios are ours / reference:

* ``forward``: model forward only, in eval mode under ``torch.inference_mode()``, over every tissue
  once (one tissue = one forward call of ``--cells-per-tissue`` cells for both systems); inputs are
  prepared before the clock starts (reference: its ``x_dict`` with a sparse COO ``x_seq`` and
  ``input_gene_list``; ours: minibatches from the model's own data loader, passed to
  ``module.inference``); each call's outputs are released before the next call. Peak memory is
  the high-water mark of a first pass above the RSS before it (weights and inputs excluded); the
  second pass is timed (warm), and its own high-water mark above the RSS before it is the
  *later-pass peak*: the model's working memory once the libraries' first-use allocations (BLAS
  buffers, thread arenas), which a first pass includes and the process keeps, are made. It means
  something with ``--large-blocks-mmapped`` only: with glibc's default allocator a later pass
  reuses the heap the first one grew, and its peak above the RSS before it is about zero.
* ``end_to_end``: AnnData in -> embeddings in ``adata.obsm``, starting after the packages are
  imported and the AnnData is read:
  reference ``CellEmbeddingPipeline(prefix, directory)`` (reads ``{prefix}.config.json`` and the
  random weights saved as ``{prefix}.best.ckpt``) then ``predict`` (its default: each tissue is
  one chunk; it runs under its own ``torch.no_grad()`` and fails under ``inference_mode``); ours ``CellPLM.setup_anndata(adata, batch_key="batch")``,
  build the model (random weights; with ``--ours-load-weights`` it also loads a saved state
  dict, as the reference must), ``is_trained_ = True``, ``get_latent_representation()``. Timed once per process (a cold call, as a user would make it),
  split into ``load`` (pipeline construction / setup + build + load) and ``embed``; cells/s uses
  the total. Peak memory: high-water mark above the RSS after reading the AnnData, so it includes
  the model weights (the reference always holds its 19,374-gene table and a 10,000-row positional
  table; ours holds a table for the genes of the data).

With ``--large-blocks-mmapped`` every worker runs with glibc's large blocks always mmapped
(``MALLOC_MMAP_THRESHOLD_``, as in ``training_speed.py``): each freed large block goes back to
the system at once, so the peaks count live memory, not heap fragmentation, which otherwise moves
a peak by tens of MiB from run to run of the same code.

Writes ``benchmarks/results/embedding_speed.{json,md}`` (``--quick``: ``embedding_speed_quick``).
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

CONFIGS = {
    # reference overrides of the released config; our CellPLM keyword arguments
    "85m": {
        "reference": {
            "enc_hid": 1024,
            "enc_layers": 4,
            "enc_head": 8,
            "post_latent_dim": 512,
            "dec_hid": 1024,
        },
        "ours": {"preset": "cellplm-85m"},
    },
    "small": {
        "reference": {"enc_hid": 128, "enc_layers": 2, "enc_head": 4, "post_latent_dim": 32, "dec_hid": 128},
        "ours": {
            "n_hidden": 128,
            "n_layers": 2,
            "n_heads": 4,
            "n_latent": 32,
            "n_decoder_hidden": 128,
            "dropout": 0.2,
        },
    },
}
OURS_COMMON = {"latent": "normal", "use_positional_encoding": False}


def reference_config(name: str) -> dict:
    with open(T.REFERENCE_CONFIG) as handle:
        config = json.load(handle)
    config.update(CONFIGS[name]["reference"])
    config["latent_mod"] = "vae"  # plain Gaussian latent, as in the 20231027 checkpoint
    return config


# ------------------------------------------------------------------ preparation (parent)
def write_data(workdir: Path, n_cells: int, n_genes: int, cells_per_tissue: int):
    """Write the generated counts to ``workdir / "data.h5ad"``.

    Gene names are the first ``n_genes`` Ensembl IDs of the reference gene list (so that the
    original CellPLM aligns them), or ``gene0``, ... when its config file is absent.

    Returns
    -------
    tuple
        The AnnData, its path and a summary of the data.
    """
    names = T.reference_gene_list() if T.REFERENCE_CONFIG.exists() else None
    adata = T.synthetic_counts(n_cells, n_genes, cells_per_tissue, seed=0, gene_names=names)
    data_path = workdir / "data.h5ad"
    adata.write_h5ad(data_path)
    info = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "n_tissues": int(adata.obs["batch"].nunique()),
        "cells_per_tissue": cells_per_tissue,
        "zero_fraction": round(1 - adata.X.nnz / (adata.n_obs * adata.n_vars), 4),
        "mean_counts_per_cell": round(float(adata.X.sum() / adata.n_obs), 1),
    }
    return adata, data_path, info


def prepare(workdir: Path, args) -> dict:
    """Write the data and the random weights of both systems to ``workdir``."""
    import torch
    from CellPLM.model.cellformer import OmicsFormer

    import cellplm_scvi as cps

    adata, data_path, data_info = write_data(workdir, args.cells, args.genes, args.cells_per_tissue)
    params = {}
    for name in args.configs:
        torch.manual_seed(0)
        config = reference_config(name)
        prefix = f"ref_{name}"
        with open(workdir / f"{prefix}.config.json", "w") as handle:
            json.dump(config, handle)
        reference = OmicsFormer(**config)  # full model (decoder too), as a released checkpoint holds it
        torch.save({"model_state_dict": reference.state_dict()}, workdir / f"{prefix}.best.ckpt")
        embed_params = sum(
            p.numel() for n, p in reference.named_parameters() if not n.startswith(("decoder", "objective"))
        )
        del reference
        ours_adata = adata.copy()
        cps.CellPLM.setup_anndata(ours_adata, batch_key="batch")
        ours = cps.CellPLM(ours_adata, **CONFIGS[name]["ours"], **OURS_COMMON)
        torch.save(ours.module.state_dict(), workdir / f"ours_{name}.pt")
        ours_encoder_params = sum(
            p.numel() for n, p in ours.module.named_parameters() if not n.startswith("decoder")
        )
        params[name] = {
            "reference_params_embedding_path": embed_params,
            "ours_params_embedding_path": ours_encoder_params,
            "ours_summary": ours._model_summary_string,
        }
        if args.ours_precision != "32":
            params[name]["ours_precision_error"] = precision_error(ours, args.ours_precision)
    return {"data": data_info, "data_path": str(data_path), "params": params}


def precision_error(model, precision: str, n_cells: int = 4000) -> dict:
    """How far embeddings at ``precision`` lie from float32 ones (first ``n_cells`` cells)."""
    import numpy as np

    model.is_trained_ = True
    cells = np.arange(min(n_cells, model.adata.n_obs))
    exact = model.get_latent_representation(indices=cells)
    approx = model.get_latent_representation(indices=cells, precision=precision)
    relative = np.linalg.norm(approx - exact, axis=1) / np.linalg.norm(exact, axis=1)
    cosine = (approx * exact).sum(1) / np.linalg.norm(approx, axis=1) / np.linalg.norm(exact, axis=1)
    return {
        "cells": len(cells),
        "median_relative_l2": round(float(np.median(relative)), 5),
        "max_relative_l2": round(float(relative.max()), 5),
        "min_cosine": round(float(cosine.min()), 6),
    }


# ------------------------------------------------------------------ workers (fresh processes)
def _reference_inputs(adata):
    """One x_dict per tissue, as the reference's TranscriptomicDataset builds it."""
    import numpy as np
    import torch
    from CellPLM.utils.data import sparse_scipy_to_tensor
    from scipy.sparse import csr_matrix

    inputs = []
    codes = adata.obs["batch"].cat.codes.to_numpy()
    for code in np.unique(codes):
        x = csr_matrix(adata[codes == code].X.astype(float))
        inputs.append({"x_seq": sparse_scipy_to_tensor(x), "coord": torch.zeros(x.shape[0], 2) - 1})
    return inputs


def worker_forward(task: dict) -> dict:
    """Time the model forward of one system over every tissue (see the module docstring).

    ``task`` holds ``data_path``, ``config``, ``system`` (``"reference"`` or ``"ours"``),
    ``cells_per_tissue`` and ``ours_precision``.
    """
    import anndata as ad
    import numpy as np
    import torch

    adata = ad.read_h5ad(task["data_path"])
    name, system = task["config"], task["system"]
    if system == "reference":
        from CellPLM.model.cellformer import OmicsFormer
        from CellPLM.utils.data import XDict

        model = OmicsFormer(**{**reference_config(name), "head_type": "embedder"}).eval()
        gene_list = adata.var_names.tolist()
        inputs = _reference_inputs(adata)

        def forward_all():
            for x_dict in inputs:
                out, _ = model(XDict(dict(x_dict)), gene_list)
                assert out["pred"].shape[0] == x_dict["x_seq"].shape[0]
                del out, _  # released before the next call, which then peaks on its own

    else:
        import cellplm_scvi as cps

        cps.CellPLM.setup_anndata(adata, batch_key="batch")
        model = cps.CellPLM(adata, **CONFIGS[name]["ours"], **OURS_COMMON)
        module = model.module.eval()
        loader = model._make_data_loader(
            adata=adata, indices=np.arange(adata.n_obs), max_cells_per_batch=task["cells_per_tissue"]
        )
        inputs = [module._get_inference_input(tensors) for tensors in loader]
        autocast = model._autocast(task["ours_precision"])

        def forward_all():
            for tensors in inputs:
                with autocast:
                    out = module.inference(**tensors)
                assert out["z"].shape[0] == tensors["x_indptr"].numel() - 1
                del out

    with torch.inference_mode():
        with T.PeakMemory() as memory:  # first pass: peak memory, the libraries' first use included
            forward_all()
        with T.PeakMemory() as later_memory:  # second pass: time and the peak of a later pass
            start = time.perf_counter()
            forward_all()
            seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cells_per_s": adata.n_obs / seconds,
        "n_forward_calls": len(inputs),
        "peak_mib": round(memory.delta_mib, 1),
        "later_pass_peak_mib": round(later_memory.delta_mib, 1),
    }


def worker_end_to_end(task: dict) -> dict:
    """Time AnnData in -> embeddings in ``obsm`` for one system, once, cold.

    ``task`` holds ``data_path``, ``config``, ``system`` (``"reference"`` or ``"ours"``),
    ``ours_precision``, and ``workdir`` with the saved weights (for the reference, and for ours
    with ``ours_load_weights``). Returns seconds, cells/s (total and embedding only) and the peak
    memory above the RSS after reading the data.
    """
    import anndata as ad
    import torch

    adata = ad.read_h5ad(task["data_path"])
    name, system, workdir = task["config"], task["system"], task["workdir"]
    n_latent = CONFIGS[name]["reference"]["post_latent_dim"]
    # imports are not timed: the baseline is the process after imports and after reading the data
    if system == "reference":
        from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline
    else:
        import cellplm_scvi as cps
    with T.PeakMemory() as memory:
        start = time.perf_counter()
        if system == "reference":
            pipeline = CellEmbeddingPipeline(pretrain_prefix=f"ref_{name}", pretrain_directory=workdir)
            loaded = time.perf_counter()
            # predict runs under its own torch.no_grad(); it fails under inference_mode
            # ("Inplace update to inference tensor outside InferenceMode").
            embedding = pipeline.predict(adata, device="cpu")
            adata.obsm["X_cellplm"] = embedding.cpu().numpy()
        else:
            cps.CellPLM.setup_anndata(adata, batch_key="batch")
            model = cps.CellPLM(adata, **CONFIGS[name]["ours"], **OURS_COMMON)
            if task.get("ours_load_weights"):
                model.module.load_state_dict(torch.load(os.path.join(workdir, f"ours_{name}.pt")))
            model.is_trained_ = True
            loaded = time.perf_counter()
            adata.obsm["X_cellplm"] = model.get_latent_representation(precision=task["ours_precision"])
        seconds = time.perf_counter() - start
    assert adata.obsm["X_cellplm"].shape == (adata.n_obs, n_latent)
    return {
        "seconds": seconds,
        "load_seconds": loaded - start,
        "embed_seconds": seconds - (loaded - start),
        "cells_per_s": adata.n_obs / seconds,
        "embed_only_cells_per_s": adata.n_obs / (seconds - (loaded - start)),
        "peak_mib": round(memory.delta_mib, 1),
    }


# ------------------------------------------------------------------ driver
def summarise(runs: list[dict], key: str) -> float:
    """Return the median of ``key`` over ``runs``."""
    return T.median([r[key] for r in runs])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (benchmarks/embedding_speed.py) for the protocol.",
    )
    parser.add_argument(
        "--cells", type=int, default=20_000, help="cells in the generated data (default 20000)"
    )
    parser.add_argument("--genes", type=int, default=2000, help="genes (default 2000)")
    parser.add_argument("--cells-per-tissue", type=int, default=2000, help="cells per tissue (default 2000)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh-process repeats per measurement (default 3)"
    )
    parser.add_argument("--configs", nargs="+", default=["85m", "small"], choices=sorted(CONFIGS))
    parser.add_argument(
        "--measure", nargs="+", default=["forward", "end_to_end"], choices=["forward", "end_to_end"]
    )
    T.add_run_arguments(parser, "4,000 cells, small config, 1 repeat")
    parser.add_argument(
        "--ours-load-weights",
        action="store_true",
        help="end to end: ours also loads a saved state dict (as the reference must)",
    )
    parser.add_argument(
        "--ours-precision",
        default="32",
        choices=["32", "bf16-mixed"],
        help="ours: float32 (default) or bfloat16 autocast (get_latent_representation(precision=...))",
    )
    parser.add_argument(
        "--large-blocks-mmapped",
        action="store_true",
        help="workers map every large block afresh (MALLOC_MMAP_THRESHOLD_): peaks count live memory",
    )
    args = parser.parse_args(argv)

    if args.worker:
        task = json.loads(args.worker)
        T.report({"forward": worker_forward, "end_to_end": worker_end_to_end}[task["measure"]](task))
        return
    T.prepare_run(args)
    if args.quick:
        args.cells, args.cells_per_tissue, args.repeats, args.configs = 4000, 1000, 1, ["small"]
    output = args.output or ("embedding_speed_quick" if args.quick else "embedding_speed")

    workdir = Path(tempfile.mkdtemp(prefix="cellplm_embedding_speed_"))
    try:
        print("preparing data and weights ...", flush=True)
        prepared = prepare(workdir, args)
        quiet = T.wait_for_quiet(args.max_load, args.max_wait)
        allocator = "large blocks mmapped" if args.large_blocks_mmapped else "glibc default"
        results = {
            **T.results_head("embedding_speed", quiet),
            "data": prepared["data"],
            "params": prepared["params"],
            "repeats": args.repeats,
            "ours_load_weights": args.ours_load_weights,
            "ours_precision": args.ours_precision,
            "allocator": allocator,
            "runs": {},
            "summary": {},
        }
        for name in args.configs:
            for measure in args.measure:
                task = {
                    "measure": measure,
                    "config": name,
                    "data_path": prepared["data_path"],
                    "workdir": str(workdir),
                    "cells_per_tissue": args.cells_per_tissue,
                    "ours_load_weights": args.ours_load_weights,
                    "ours_precision": args.ours_precision,
                }

                def progress(system, result, name=name, measure=measure):
                    print(
                        f"{name:6s} {measure:10s} {system:9s} {result['cells_per_s']:9.0f} cells/s  "
                        f"peak {result['peak_mib']:8.1f} MiB  load {result['load_1min_after']}",
                        flush=True,
                    )

                runs = T.alternating_runs(
                    __file__,
                    {system: {**task, "system": system} for system in ("reference", "ours")},
                    args.repeats,
                    envs=dict.fromkeys(("reference", "ours"), T.ALLOCATORS[allocator]),
                    on_result=progress,
                )
                results["runs"][f"{name}/{measure}"] = runs
                summary = {}
                for system in runs:
                    summary[system] = {
                        "cells_per_s": round(summarise(runs[system], "cells_per_s"), 1),
                        "peak_mib": round(summarise(runs[system], "peak_mib"), 1),
                    }
                    if measure == "end_to_end":
                        summary[system]["load_seconds"] = round(summarise(runs[system], "load_seconds"), 2)
                        summary[system]["embed_only_cells_per_s"] = round(
                            summarise(runs[system], "embed_only_cells_per_s"), 1
                        )
                speed = T.ratios(runs["ours"], runs["reference"], "cells_per_s")
                summary["speed_ratio_ours_over_reference"] = round(speed["median_ratio"], 2)
                summary["speed_ratio_per_repeat"] = [round(r, 2) for r in speed["per_repeat"]]
                summary["memory_ratio_ours_over_reference"] = round(
                    summary["ours"]["peak_mib"] / max(summary["reference"]["peak_mib"], 1e-9), 3
                )
                if measure == "forward" and args.large_blocks_mmapped:
                    later = {system: summarise(runs[system], "later_pass_peak_mib") for system in runs}
                    for system, mib in later.items():
                        summary[system]["later_pass_peak_mib"] = round(mib, 1)
                    summary["later_pass_memory_ratio_ours_over_reference"] = round(
                        later["ours"] / max(later["reference"], 1e-9), 3
                    )
                results["summary"][f"{name}/{measure}"] = summary
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info = results["machine"]
    rows = [
        f"Embedding speed, {results['data']['n_cells']:,} cells x {results['data']['n_genes']:,} genes "
        f"(tissues of {args.cells_per_tissue:,}), {T.machine_summary(info)}, load {quiet['load_1min']} at start; median of {args.repeats}; "
        f"ours in {'float32' if args.ours_precision == '32' else 'bfloat16 autocast'}; allocator: {allocator}.",
        "",
        "| config | measure | reference cells/s | ours cells/s | speed ours/ref | reference peak MiB | ours peak MiB | memory ours/ref |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in results["summary"].items():
        name, measure = key.split("/")
        rows.append(
            f"| {name} | {measure} | {s['reference']['cells_per_s']:,.0f} | {s['ours']['cells_per_s']:,.0f} | "
            f"{s['speed_ratio_ours_over_reference']:.2f}x | {s['reference']['peak_mib']:,.0f} | "
            f"{s['ours']['peak_mib']:,.0f} | {s['memory_ratio_ours_over_reference']:.2f} |"
        )
    forward = {key: s for key, s in results["summary"].items() if key.endswith("/forward")}
    if forward and args.large_blocks_mmapped:
        rows += [
            "",
            "Forward, peak of a later pass (the libraries' first-use allocations already made):",
            "",
            "| config | reference MiB | ours MiB | memory ours/ref |",
            "|---|---:|---:|---:|",
        ]
        for key, s in forward.items():
            rows.append(
                f"| {key.split('/')[0]} | {s['reference']['later_pass_peak_mib']:,.0f} | "
                f"{s['ours']['later_pass_peak_mib']:,.0f} | {s['later_pass_memory_ratio_ours_over_reference']:.2f} |"
            )
    T.write_results(output, results, rows)


if __name__ == "__main__":
    main()
