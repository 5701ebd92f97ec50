# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test model bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/python -m scheduler_plugins.builtin_models --ensure

run: model
	$(BIN)/batch-router up $(ARGS)

test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: model
	$(BIN)/python -m benchmarks.loadtest --spawn --baseline --concurrency 16 --duration 30s

clean:
	rm -rf $(VENV) build *.egg-info
