"""Sphinx configuration of the cellplm-scvi documentation."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))  # the source tree wins over an installed copy

# -- Project ----------------------------------------------------------------------------------------

project = "cellplm-scvi"
author = "cellplm-scvi developers"
copyright = f"2026, {author}"
try:
    release = version("cellplm-scvi")
except PackageNotFoundError:
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

# -- General ----------------------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "generated/*.tmp", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
master_doc = "index"
default_role = "literal"

# -- MyST and notebooks -----------------------------------------------------------------------------

nb_execution_mode = "off"  # notebooks are committed executed; the docs build never runs them
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_output_stderr = "remove"

# -- autodoc, autosummary, napoleon -----------------------------------------------------------------

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True

# -- intersphinx ------------------------------------------------------------------------------------
# Set CELLPLM_DOCS_OFFLINE=1 to build without network access (links to other projects then stay
# plain text instead of failing the -W build on unreachable inventories).

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}
if os.environ.get("CELLPLM_DOCS_OFFLINE"):
    intersphinx_mapping = {}

# -- HTML -------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "cellplm-scvi"
html_theme_options = {"show_toc_level": 2}
html_static_path: list[str] = []
