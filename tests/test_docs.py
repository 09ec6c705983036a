"""Build the Sphinx documentation offline with warnings as errors (skipped without the docs extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_copybutton"):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_offline_without_warnings(tmp_path):
    env = {**os.environ, "CELLPLM_DOCS_OFFLINE": "1"}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    html = tmp_path / "html"
    # every public name of the package's modules has an API page
    import cellplm_scvi

    names = [
        name
        for name in cellplm_scvi.__all__
        if name not in ("data", "datasets", "nn", "pretrained", "PRESETS")
    ]
    for module in ("data", "nn", "pretrained", "model"):
        names += [
            f"{module}.{name}"
            for name in getattr(cellplm_scvi, module).__all__
            if name not in cellplm_scvi.__all__
        ]
    missing = [name for name in names if not (html / "generated" / f"cellplm_scvi.{name}.html").is_file()]
    assert not missing, f"not in docs/api.md: {missing}"
    # the notebooks are rendered with their stored outputs (tables, figures), never executed
    for notebook in ("scrna_pancreas", "spatial"):
        page = (html / "notebooks" / f"{notebook}.html").read_text()
        assert "PCA baseline" in page and "<img" in page, notebook
