"""Benchmarks and diagnostics, run from the repository root as modules:

    .venv/bin/python -m tools.storage_bench
    .venv/bin/python -m tools.broker_bench --quick     # also `nodi bench`
    .venv/bin/python -m tools.queue_bench --quick      # also `nodi bench --suite queues`

They import each other as `from tools import storage_bench`; nothing edits sys.path.
"""
