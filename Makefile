# Two entry points on a fresh machine: `make repro` (the pipeline on params.yaml) and `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# pytest-xdist workers for `make test`: the long tests wait on servers, containers, polling workers and
# subprocesses much of the time (on a 2-CPU VM: 22 min with 4 workers, 25 with 3, 36 in one process)
TEST_WORKERS ?= 4
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install repro test bench docs

install: $(VENV)/.installed .dvc/plots/page.html

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,flower]'
	touch $@

# the page `dvc plots show` fills, with vega inlined so that it draws offline (feddmmr/tracking/plots_page.py)
.dvc/plots/page.html: feddmmr/tracking/plots_page.py $(VENV)/.installed
	$(BIN)/python -m feddmmr.tracking.plots_page --cdn-if-missing

repro: install
	PATH=$(BIN):$$PATH dvc repro

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

bench: install
	$(BIN)/python benchmarks/round_time.py

docs: install
	$(BIN)/mkdocs build --strict   # site/index.html; a broken link or a page missing from the nav fails
