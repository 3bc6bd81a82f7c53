# Quick start: `make demo` (set up + run the main job), `make test-fast` (the tests not marked slow: a few minutes)
# and `make test` (every test: about 5 minutes on an idle 2-core machine, much longer on a loaded one).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,ui]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/controlnet demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) outputs .pytest_cache
