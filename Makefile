# The two commands README.md promises: `make run` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: run test install clean bench bench-tls crash-walk queue-leases torture lint many-partitions kafka-bench

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

# ruff's lint rules and its formatter's check (settings in pyproject.toml, named explicitly
# so a developer's own ruff config does not change them; `ruff format` fixes the format)
# and mypy.
# mypy cannot see the editable install's finder that maps nodi.storage, nodi.broker and
# nodi.cli onto the top-level folders, so build/typecheck/nodi holds three symlinks to
# them (the same mapping as pyproject's package-dir) and mypy_path points there: mypy
# checks the modules under their real names, and nothing is copied or generated.
# tests/ is a second run: it has no __init__.py and its files import each other as
# top-level modules (`from conftest import BrokerProcess`), as pytest's rootdir insertion
# lets them; given the folder, mypy names each file by its basename and puts tests/ on its
# search path, so every file is seen once, under the name the tests import it by.
TYPECHECK := build/typecheck/nodi
lint: $(STAMP)
	$(BIN)/ruff check --config pyproject.toml .
	$(BIN)/ruff format --config pyproject.toml --check .
	mkdir -p $(TYPECHECK)
	for p in storage broker cli; do ln -sfn ../../../$$p $(TYPECHECK)/$$p; done
	$(BIN)/mypy --config-file pyproject.toml
	$(BIN)/mypy --config-file pyproject.toml tests

# Compaction's swap and its recovery crashed at every I/O point in every crash mode,
# over NODI_CRASH_WALK_SEEDS seeds, each with a second power loss during recovery
# (docs/fault-model.md; `make test` crashes each point once). About 3 minutes at 2.
crash-walk: $(STAMP)
	NODI_CRASH_WALK_SEEDS=$${NODI_CRASH_WALK_SEEDS:-2} $(BIN)/python -m pytest -q -p no:randomly tests/test_compaction_walk.py

# Issue 10's four consumers with random 0-50 ms handlers on 5,000 messages (`make test`
# runs 1,000): none lost, none handled twice, the work spread. About a minute and a half.
queue-leases: $(STAMP)
	NODI_QUEUE_LEASES_MESSAGES=$${NODI_QUEUE_LEASES_MESSAGES:-5000} $(BIN)/python -m pytest -q -p no:randomly tests/test_queue_leases.py -k four_consumers

# Issue 18's test at its full size: 3,000 partitions on a broker under `ulimit -n 256`
# (`make test` runs 400). About a minute here.
many-partitions: $(STAMP)
	NODI_TEST_PARTITIONS=$${NODI_TEST_PARTITIONS:-3000} $(BIN)/python -m pytest -q -p no:randomly tests/test_many_partitions.py

# The bench extra (redis-py) for `nodi bench`'s Redis comparison; redis-server comes from
# the system (Debian: apt-get install -y redis-server), else nodi is reported alone.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m tools.storage_bench
	$(BIN)/nodi bench
	$(BIN)/nodi bench --suite queues
	$(BIN)/python -m tools.latency_bench
	$(BIN)/python -m tools.request_path_bench
	$(BIN)/python -m tools.embedded_bench

# TLS against plaintext, durable produce and consume (docs/benchmarks.md; needs openssl).
bench-tls: $(STAMP)
	$(BIN)/python -m tools.tls_bench

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

# The Kafka listener beside nodi's own client on one broker, with the disk's limits
# (tools/kafka_bench.py; docs/benchmarks.md, "Kafka clients").
kafka-bench: $(STAMP)
	$(BIN)/python -m tools.kafka_bench
