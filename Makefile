# The two commands README.md promises: `make run` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: run test install clean bench torture

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nodi serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The bench extra (redis-py) for `nodi bench`'s Redis comparison; redis-server comes from
# the system (Debian: apt-get install -y redis-server), else nodi is reported alone.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python tools/storage_bench.py
	$(BIN)/nodi bench
	$(BIN)/nodi bench --suite queues

# The crash torture (tools/torture.py, docs/operations.md): ROUNDS kill -9 rounds of a real
# broker under concurrent producers and consumers, every acknowledged message checked;
# 11-17 rounds a minute here (docs/benchmarks.md), so 1,000 rounds take 60-95 minutes.
# `make torture ROUNDS=100 TORTURE_ARGS="--power-loss"`.
ROUNDS ?= 1000
TORTURE_ARGS ?=
torture: $(STAMP)
	$(BIN)/python tools/torture.py --rounds $(ROUNDS) --json torture-summary.json $(TORTURE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
