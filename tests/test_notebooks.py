"""Execute the tutorial notebooks of ``notebooks/`` and check what they compute.

Each notebook runs in a temporary copy, on a Jupyter kernel started from the interpreter that runs
pytest. The notebooks need the real datasets of ``../shared/data``; without them the tests are
skipped, and a separate fast test checks that the notebooks then skip their own work cleanly.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from conftest import SHARED_DATA  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "cellplm-scvi-tests"
DATASETS = {
    "scrna_pancreas.ipynb": ["pancreas_endocrinogenesis_mouse"],
    "spatial.ipynb": ["cosmx_nsclc_mini", "osmfish_mouse_sscortex"],
}


@pytest.fixture
def kernel(tmp_path_factory, monkeypatch):
    """A kernelspec that runs ``sys.executable``, so the notebooks see this environment's packages."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    return KERNEL


def _execute(name: str, workdir: Path, kernel_name: str, timeout: int):
    """Run a copy of ``notebooks/name`` in ``workdir``; return the executed notebook."""
    copy = workdir / name
    shutil.copy(NOTEBOOKS / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=kernel_name,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


def _stdout(cell) -> str:
    return "".join(
        output.get("text", "") for output in cell.get("outputs", []) if output.get("name") == "stdout"
    )


def _metrics(notebook) -> dict:
    """The JSON record printed by the cell tagged ``metrics``."""
    cells = [cell for cell in notebook.cells if "metrics" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "each notebook has exactly one cell tagged 'metrics'"
    return json.loads(_stdout(cells[0]))


def _numbers(record):
    """Every number in a nested JSON record (booleans excluded)."""
    if isinstance(record, dict):
        for value in record.values():
            yield from _numbers(value)
    elif isinstance(record, list):
        for value in record:
            yield from _numbers(value)
    elif isinstance(record, int | float) and not isinstance(record, bool):
        yield record


def _assert_no_error_outputs(notebook):
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"{output.get('ename')}: {output.get('evalue')}"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_stored_notebooks_are_executed_without_errors_or_machine_paths(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "commit the notebook executed"
    _assert_no_error_outputs(notebook)
    text = json.dumps([cell.get("outputs", []) for cell in code])
    for prefix in ("/work/", "/root/", "/tmp/", "/home/"):
        assert prefix not in text, f"a machine path ({prefix}...) is in the stored outputs"
    assert "SKIPPED" not in text, "the stored outputs come from a run without the data"
    assert all(math.isfinite(x) for x in _numbers(_metrics(notebook)))


def test_notebooks_skip_cleanly_without_the_data(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPLM_SHARED_DATA", str(tmp_path / "no-such-folder"))
    for name in sorted(DATASETS):
        notebook = _execute(name, tmp_path, kernel, timeout=120)
        _assert_no_error_outputs(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "SKIPPED" in _stdout(code[0])
        assert not any(cell.get("outputs") for cell in code[1:]), "later cells must do nothing"


def _run_with_data(name: str, kernel_name: str, tmp_path: Path, monkeypatch) -> dict:
    missing = [d for d in DATASETS[name] if not (SHARED_DATA / d / f"{d}.h5ad").is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not available (../shared/data missing)")
    monkeypatch.setenv("CELLPLM_SHARED_DATA", str(SHARED_DATA))
    notebook = _execute(name, tmp_path, kernel_name, timeout=900)
    _assert_no_error_outputs(notebook)
    metrics = _metrics(notebook)
    assert all(math.isfinite(x) for x in _numbers(metrics)), metrics
    return metrics


@pytest.mark.slow
def test_pancreas_notebook_runs_and_scores_clusters(kernel, tmp_path, monkeypatch):
    metrics = _run_with_data("scrna_pancreas.ipynb", kernel, tmp_path, monkeypatch)
    assert metrics["elbo_validation_last"] < metrics["elbo_validation_first"]
    for method in ("cellplm", "pca_baseline"):
        assert 0.0 < metrics[method]["NMI"] <= 1.0
        assert -0.5 <= metrics[method]["ARI"] <= 1.0
    assert metrics["reload_same_embedding"] is True


@pytest.mark.slow
def test_spatial_notebook_runs_and_scores_clusters(kernel, tmp_path, monkeypatch):
    metrics = _run_with_data("spatial.ipynb", kernel, tmp_path, monkeypatch)
    assert metrics["cosmx"]["elbo_train_last"] < metrics["cosmx"]["elbo_train_first"]
    for row in metrics["cosmx"]["clusters"].values():
        assert 0.0 <= row["chance"] <= row["spatial_coherence"] <= 1.0
    scores = metrics["osmfish"]["scores"]
    assert set(scores) == {"CellPLM, PE on", "CellPLM, PE off", "PCA baseline", "PCA + spatial neighbourhood"}
    for row in scores.values():
        assert 0.0 < row["cell type: NMI"] <= 1.0 and 0.0 < row["region: NMI"] <= 1.0
