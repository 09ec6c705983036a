"""Shared harness of the benchmark scripts: timing, machine facts, quiet gates, workers, results.

* Timing side by side: :func:`median_ms_side_by_side` times candidates in one process, alternating
  them; :func:`alternating_runs` runs each measurement in a fresh process (:func:`run_worker`),
  the order of the systems swapped every repeat; :func:`ratios` compares two systems' runs.
* Machine facts: :func:`machine_info` and :func:`results_head` record what, where and when every
  result was measured.
* Quiet machine: :func:`wait_for_quiet` waits until the 1-minute load average is low before a
  script measures; :data:`IDLE_GATE` makes every worker wait until no other process uses the CPUs
  and measure again when one did while it ran (on a shared 2-core machine another process halves
  the speed of a 2-thread run); :func:`prepare_run` applies the shared command-line options.
* Memory: :class:`PeakMemory` is the peak resident memory of a code section, read from the
  kernel's high-water mark (``VmHWM``), reset before the section (``/proc/self/clear_refs``).
* Data: :func:`synthetic_counts` makes negative-binomial counts grouped into tissues.
* Results: :func:`write_results` writes a JSON file of everything and a Markdown table beside it
  (:func:`markdown_table`).

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"
REFERENCE_CONFIG = SHARED / "reference" / "cellplm_20230926_85M.config.json"
DATA = SHARED / "data"
RESULT_TAG = "BENCHMARK-RESULT "


# ------------------------------------------------------------------ memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mib() -> float:
    """Return the current resident memory of this process, in MiB."""
    return _status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    """Return the peak resident memory of this process since start or the last reset, in MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak() -> None:
    """Reset the kernel's resident-memory high-water mark of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


ALLOCATORS = {
    "glibc default": {},
    # a fixed mmap threshold returns every freed large block to the system at once, so the
    # high-water mark counts live memory only, not heap fragmentation
    "large blocks mmapped": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
}
"""Environment variables of a worker process (:func:`run_worker`) for each glibc allocator setting."""


class PeakMemory:
    """Peak resident memory of a ``with`` block above the RSS at its start.

    Attributes
    ----------
    baseline_mib : float
        Resident memory at entry, MiB.
    peak_mib : float
        High-water mark during the block, MiB (set on exit).
    delta_mib : float
        ``peak_mib - baseline_mib`` (set on exit).
    """

    def __enter__(self):
        reset_peak()
        self.baseline_mib = rss_mib()
        return self

    def __exit__(self, *exc):
        self.peak_mib = hwm_mib()
        self.delta_mib = self.peak_mib - self.baseline_mib
        return False


# ------------------------------------------------------------------ machine
def cpu_model() -> str:
    """Return the CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Return what and when the numbers are measured on.

    Returns
    -------
    dict
        CPU model, logical CPUs, memory, torch threads, Python/torch/scvi-tools versions, GPU,
        date, the command line (script path relative to the repository) and the load average.
    """
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python " + " ".join(shlex.quote(a) for a in _relative_argv()),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import scvi

        info["scvi_tools"] = scvi.__version__
    except ImportError:
        pass
    return info


def machine_summary(info: dict) -> str:
    """Return ``"<cpu>, <n> torch threads, torch <version>, <date>"`` for a table caption."""
    return f"{info['cpu']}, {info['torch_threads']} torch threads, torch {info['torch']}, {info['date']}"


def results_head(benchmark: str, quiet: dict) -> dict:
    """Return the first fields of every results file.

    Parameters
    ----------
    benchmark
        The script's name.
    quiet
        What :func:`wait_for_quiet` returned.

    Returns
    -------
    dict
        ``benchmark``, ``machine`` (:func:`machine_info`), ``wait_for_quiet`` and ``idle_gate``.
    """
    return {
        "benchmark": benchmark,
        "machine": machine_info(),
        "wait_for_quiet": quiet,
        "idle_gate": dict(IDLE_GATE),
    }


def _relative_argv() -> list[str]:
    """Return ``sys.argv`` with the script path relative to the repository root."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPOSITORY))
    except ValueError:
        argv[0] = Path(argv[0]).name
    return argv


# ------------------------------------------------------------------ quiet machine
#: gate applied around every worker (see :func:`run_worker`): wait until other processes use
#: less than ``max_busy`` of the CPUs (at most ``timeout_s``), and measure again (up to
#: ``attempts`` runs in all) when they used more than ``max_others_during`` while it ran
IDLE_GATE = {"max_busy": 0.15, "timeout_s": 300.0, "max_others_during": 0.10, "attempts": 3}

#: a ``--quick`` run only shows that a script works: short waits, one attempt per measurement
QUICK_GATE = {"timeout_s": 20.0, "attempts": 1}
QUICK_MAX_WAIT_S = 60.0


def wait_for_quiet(max_load: float = 1.0, timeout_s: float = 1200, poll_s: float = 20) -> dict:
    """Wait until the 1-minute load average is below ``max_load``, at most ``timeout_s``.

    Returns
    -------
    dict
        ``load_1min`` when the wait ended, ``waited_s`` and ``quiet`` (False after a timeout;
        measurement goes on regardless).
    """
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < max_load or waited >= timeout_s:
            return {"load_1min": round(load, 2), "waited_s": round(waited), "quiet": load < max_load}
        print(f"load average {load:.2f} >= {max_load}; waiting ({waited:.0f} s so far)", flush=True)
        time.sleep(poll_s)


def _cpu_ticks() -> tuple[int, int]:
    """Return the machine's total and idle (idle + iowait) CPU ticks from ``/proc/stat``."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def cpu_busy_fraction(window_s: float = 2.0) -> float:
    """Return the share of all CPUs busy during the next ``window_s`` seconds.

    Unlike the load average it has no memory, so, called while this process is idle, it tells
    whether *other* processes use the CPUs right now.
    """
    total0, idle0 = _cpu_ticks()
    time.sleep(window_s)
    total1, idle1 = _cpu_ticks()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle_cpus(max_busy: float = 0.15, timeout_s: float = 300, window_s: float = 2.0) -> dict:
    """Wait, at most ``timeout_s``, until other processes use less than ``max_busy`` of the CPUs.

    Returns
    -------
    dict
        ``cpu_busy_before`` (the last share seen), ``idle_wait_s`` and ``idle``.
    """
    start = time.monotonic()
    while True:
        busy = cpu_busy_fraction(window_s)
        waited = time.monotonic() - start
        if busy < max_busy or waited >= timeout_s:
            return {"cpu_busy_before": round(busy, 3), "idle_wait_s": round(waited), "idle": busy < max_busy}


class OthersCpu:
    """Share of all CPUs that processes *other than this one and its children* used in a block.

    Busy CPU time of the whole machine (``/proc/stat``) minus the CPU time of this process and
    its waited-for children (``getrusage``), over the block's total CPU time; in ``share`` after
    the block.
    """

    @staticmethod
    def _own() -> float:
        import resource

        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return own

    def __enter__(self):
        self._ticks, self._own0 = _cpu_ticks(), self._own()
        return self

    def __exit__(self, *exc):
        total1, idle1 = _cpu_ticks()
        total = max(total1 - self._ticks[0], 1)
        busy = total - (idle1 - self._ticks[1])
        own = (self._own() - self._own0) * os.sysconf("SC_CLK_TCK")
        self.share = max(0.0, (busy - own) / total)
        return False


# ------------------------------------------------------------------ command line
def add_run_arguments(parser: argparse.ArgumentParser, quick_help: str, workers: bool = True) -> None:
    """Add the options every script shares.

    Parameters
    ----------
    parser
        The script's parser.
    quick_help
        What ``--quick`` runs, for its help text.
    workers
        Also add the hidden ``--worker JSON`` option of scripts that start workers.
    """
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this"
    )
    parser.add_argument("--max-wait", type=float, default=1200, help="longest wait for a quiet machine, s")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}")
    parser.add_argument("--output", default=None, help="results name (default: the script's name)")
    if workers:
        parser.add_argument("--worker", help=argparse.SUPPRESS)


def set_threads(n: int | None) -> None:
    """Use ``n`` torch threads here and in every worker started later (``OMP_NUM_THREADS``).

    With fewer threads than CPUs, other processes may use the remaining CPUs without slowing
    the measurement much, so the idle gate is relaxed to the free share (1 thread of 2 CPUs:
    others may use up to about half the machine).
    """
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    free = max(0.0, (os.cpu_count() - n) / os.cpu_count())
    IDLE_GATE["max_busy"] = max(0.15, free - 0.05)
    IDLE_GATE["max_others_during"] = max(0.10, free + 0.05)


def prepare_run(args: argparse.Namespace) -> None:
    """Apply the options of :func:`add_run_arguments` before measuring.

    Sets the threads (:func:`set_threads`); in a ``--quick`` run, shortens the waits for a quiet
    machine (:data:`QUICK_GATE`, ``args.max_wait`` at most :data:`QUICK_MAX_WAIT_S`), since a
    smoke run shows that a script works, not how fast.
    """
    set_threads(args.threads)
    if args.quick:
        IDLE_GATE.update(QUICK_GATE)
        args.max_wait = min(args.max_wait, QUICK_MAX_WAIT_S)


# ------------------------------------------------------------------ workers
def run_worker(script: str | Path, task: dict, timeout_s: float = 900, env: dict | None = None) -> dict:
    """Run ``python script --worker '<json>'`` in a fresh process and return what it reports.

    Before starting, waits until other processes leave the CPUs idle (:data:`IDLE_GATE`), and
    runs again when they used more than the gate allows while it ran.

    Parameters
    ----------
    script
        A script whose ``--worker JSON`` option runs ``task`` and calls :func:`report`.
    task
        The measurement, passed as JSON.
    timeout_s
        Longest run.
    env
        Environment variables added for the worker.

    Returns
    -------
    dict
        The worker's result, with the gate's record: ``cpu_busy_before``, ``idle_wait_s``,
        ``others_cpu_share_during``, ``others_cpu_share_attempts``, ``contended`` and
        ``load_1min_after``.
    """
    attempts = []
    for attempt in range(IDLE_GATE["attempts"]):
        gate = wait_for_idle_cpus(IDLE_GATE["max_busy"], IDLE_GATE["timeout_s"])
        command = [sys.executable, str(script), "--worker", json.dumps(task)]
        with OthersCpu() as others:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}
            )
        result = None
        for line in done.stdout.splitlines()[::-1]:
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG) :])
                break
        if result is None:
            break
        result["load_1min_after"] = round(os.getloadavg()[0], 2)
        result.update(gate)
        result["others_cpu_share_during"] = round(others.share, 3)
        attempts.append(others.share)
        if others.share <= IDLE_GATE["max_others_during"]:
            break
        again = "measuring again" if attempt + 1 < IDLE_GATE["attempts"] else "kept, marked contended"
        print(f"  other processes used {others.share:.0%} of the CPUs during the run; {again}", flush=True)
    if result is not None:
        result["others_cpu_share_attempts"] = [round(a, 3) for a in attempts]
        result["contended"] = attempts[-1] > IDLE_GATE["max_others_during"]
        return result
    raise RuntimeError(
        f"worker failed (exit {done.returncode}) for task {task}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def report(result: dict) -> None:
    """Print a worker's result in the form :func:`run_worker` reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def alternating_runs(
    script: str | Path,
    tasks: dict[str, dict],
    repeats: int,
    envs: dict[str, dict] | None = None,
    timeout_s: float = 900,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, list[dict]]:
    """Run every system's task ``repeats`` times in fresh processes, alternating the systems.

    Repeat 0 runs the systems in the order of ``tasks``, repeat 1 in the reverse order, and so on,
    so that a slow drift of the machine favours neither.

    Parameters
    ----------
    script
        The worker script (see :func:`run_worker`).
    tasks
        The task of each system, by system name.
    repeats
        Runs per system.
    envs
        Environment variables of each system's worker, by system name.
    timeout_s
        Longest run of one worker.
    on_result
        Called with the system's name and its result after every run (for progress lines).

    Returns
    -------
    dict
        The results of each system, in repeat order.
    """
    names = list(tasks)
    runs = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            result = run_worker(script, tasks[name], timeout_s=timeout_s, env=(envs or {}).get(name))
            result["repeat"] = repeat
            runs[name].append(result)
            if on_result is not None:
                on_result(name, result)
    return runs


# ------------------------------------------------------------------ statistics
def median(values: Iterable[float]) -> float:
    """Return the median as a float."""
    return float(statistics.median(values))


def ratios(numerator: Sequence[dict], denominator: Sequence[dict], key: str) -> dict:
    """Compare two systems' runs of one measurement by the field ``key``.

    Returns
    -------
    dict
        ``median_ratio`` (median over the numerator's runs over the median over the
        denominator's) and ``per_repeat`` (the ratio within each repeat), rounded to 3 digits.
    """
    top, bottom = median(r[key] for r in numerator), median(r[key] for r in denominator)
    per_repeat = [a[key] / b[key] for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median_ratio": round(top / bottom, 3),
        "per_repeat": [round(r, 3) for r in per_repeat],
    }


def median_ms_side_by_side(timers: dict, repeats: int, swap_order: bool = False) -> dict[str, float]:
    """Return the median milliseconds of each timer, all timed in one process.

    Parameters
    ----------
    timers
        By name, a call that runs one candidate once and returns the seconds it took.
    repeats
        Timed rounds; each calls every timer once, after one warm-up round.
    swap_order
        Reverse the order every other round (the warm-up round reversed).
    """
    times = {name: [] for name in timers}
    for round_ in range(repeats + 1):
        names = list(timers)[:: -1 if swap_order and round_ % 2 == 0 else 1]
        for name in names:
            elapsed = timers[name]()
            if round_:
                times[name].append(elapsed)
    return {name: 1e3 * median(values) for name, values in times.items()}


# ------------------------------------------------------------------ data
def reference_gene_list() -> list[str]:
    """Return the 19,374 Ensembl IDs of the original checkpoint (row order of its gene table)."""
    with open(REFERENCE_CONFIG) as handle:
        return json.load(handle)["gene_list"]


def synthetic_counts(
    n_cells: int,
    n_genes: int = 2000,
    cells_per_tissue: int = 2000,
    seed: int = 0,
    gene_names: list[str] | None = None,
    chunk: int = 10_000,
):
    """Return an AnnData of negative-binomial counts (CSR float32, about 90 % zeros) in tissues.

    Gene means are log-normal (``exp(N(-3.2, 1.6))``), five cell types shift them (log-fold
    changes ``N(0, 0.8)``), library factors are ``exp(N(0, 0.3))`` and the dispersion is 1
    (a gamma-Poisson mixture). ``obs["batch"]`` names the tissue (``t000``, ``t001``, ...),
    ``obs["cell_type"]`` the type. Generated in row chunks, so 100,000 cells never need a dense
    ``n_cells x n_genes`` matrix.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the counts.
    cells_per_tissue
        Consecutive cells per tissue.
    seed
        Random seed.
    gene_names
        The first ``n_genes`` become ``var_names`` (default ``gene0``, ``gene1``, ...).
    chunk
        Rows generated at a time.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.normal(-3.2, 1.6, n_genes)
    shifts = rng.normal(0.0, 0.8, (5, n_genes))
    types = rng.integers(0, 5, n_cells)
    blocks = []
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        library = np.exp(rng.normal(0.0, 0.3, stop - start))[:, None]
        mean = np.exp(base[None, :] + shifts[types[start:stop]]) * library
        counts = rng.poisson(rng.gamma(1.0, mean)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    matrix = sp.vstack(blocks, format="csr")
    names = gene_names[:n_genes] if gene_names is not None else [f"gene{i}" for i in range(n_genes)]
    tissue = np.arange(n_cells) // cells_per_tissue
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"t{t:03d}" for t in tissue]),
            "cell_type": pd.Categorical([f"type{t}" for t in types]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=names))


# ------------------------------------------------------------------ output
def markdown_table(caption: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """Return the lines of ``caption``, a blank line and a Markdown table.

    A column name ending in ``">"`` is right-aligned (numbers); the marker is not shown.
    """
    header = [name.removesuffix(">") for name in columns]
    rule = ["---:" if name.endswith(">") else "---" for name in columns]
    return [caption, "", *("| " + " | ".join(cells) + " |" for cells in (header, rule, *rows))]


def write_results(name: str, results: dict, table_rows: list[str]) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` and print the table.

    Parameters
    ----------
    name
        File name without suffix (``--output``; it may name a path elsewhere).
    results
        Everything measured; ``results["machine"]["command"]`` ends the Markdown file.
    table_rows
        Lines of the Markdown file.

    Returns
    -------
    Path
        The JSON file.
    """
    table_rows = [*table_rows, "", f"Command: `{results['machine']['command']}`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(table_rows) + "\n")
    print("\n".join(table_rows))
    shown = path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path
    print(f"wrote {shown} and .md")
    return path
