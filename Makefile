# Set-up, demo, tests, lint and docs for cellplm-scvi.
#
#   make demo   create .venv, install, run the demo (writes demo_output/)
#   make test   create .venv, install, run the whole test suite
#
# torch is installed first and pinned, so that pip never pulls an unpinned (CUDA) build.
# For a GPU, install the CUDA build yourself, e.g.
#   make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo_output
PYTEST_ARGS ?= -q -ra --durations=10

BIN := $(VENV)/bin
# OpenMP threads that spin while waiting slow torch down many-fold when the cores are shared.
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := $(VENV)/.cellplm-scvi-installed
LINT_PATHS := $(wildcard src tests benchmarks docs/conf.py)

.PHONY: setup demo test lint docs clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -e ".[test]"
	# The reference CellPLM for the parity tests, without its heavy unused dependencies (tests skip without it).
	-$(BIN)/pip install --no-deps "cellplm==0.1.0.post2" einops torchmetrics
	@$(BIN)/python -c "import torch; print('installed torch', torch.__version__, 'CUDA ' + torch.version.cuda if torch.version.cuda else '(CPU build)')"
	touch $@

demo: $(STAMP)
	$(BIN)/cellplm-scvi demo --out $(DEMO_OUT)

# pytest exits 5 when it collects no tests; that is a failure here, not a pass.
test: $(STAMP)
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

# CELLPLM_DOCS_OFFLINE=1 make docs builds without network access (no intersphinx links).
docs: $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build docs/generated
