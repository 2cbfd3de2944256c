# Two entry points on a fresh machine: `make repro` (the pipeline on params.yaml) and `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install repro test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,flower]'
	touch $@

repro: install
	PATH=$(BIN):$$PATH dvc repro

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/round_time.py
