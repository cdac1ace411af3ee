"""`nodi bench`: the broker benchmark, tools/broker_bench.py, run with the same options.

    nodi bench --quick                     # a seconds-long smoke run
    nodi bench --json-out results.json     # the full run (about a minute)
    nodi --server HOST:PORT bench          # measure a running broker
    nodi bench --suite queues [--quick]    # queue groups and request-reply, tools/queue_bench.py

The tool lives in the source tree (the tools package is not installed; this command loads
tools.broker_bench from the checkout it was installed from), so this command needs a
checkout installed in development mode (`pip install -e .`); redis-py for the Redis
comparison comes with the `bench` extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import typer

from nodi.cli.common import fail, state_of

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TOOL = TOOLS / "broker_bench.py"
# --suite NAME picks the tool (the option is taken out before the tool parses the rest).
SUITES = {"broker": TOOL, "queues": TOOLS / "queue_bench.py"}


def _suite(arguments: list[str]) -> tuple[Path, list[str]]:
    """The tool `--suite NAME` (or `--suite=NAME`) names, and the arguments without it."""
    for index, argument in enumerate(arguments):
        if argument == "--suite" or argument.startswith("--suite="):
            name = argument.partition("=")[2] if "=" in argument else (arguments[index + 1:index + 2] or [""])[0]
            if name not in SUITES:
                raise fail(f"nodi bench: --suite must be one of {', '.join(SUITES)}, got {name!r}", code=2)
            rest = arguments[:index] + arguments[index + (1 if "=" in argument else 2):]
            return SUITES[name], rest
    return TOOL, arguments


def _load_tool(tool: Path = TOOL) -> ModuleType:
    """tools.<name> from the checkout this command was installed from. tools/ is a package
    that is not installed: its spec is made from the folder, so the tool's own
    `from tools import ...` imports resolve there, wherever nodi is run from."""
    if not tool.is_file():
        raise fail(f"nodi bench: {tool} not found: the benchmark runs from a source checkout (pip install -e .)")
    package = sys.modules.get("tools")
    if package is None or list(getattr(package, "__path__", [])) != [str(TOOLS)]:
        spec = importlib.util.spec_from_file_location(
            "tools", TOOLS / "__init__.py", submodule_search_locations=[str(TOOLS)]
        )
        if spec is None or spec.loader is None:
            raise fail(f"nodi bench: {TOOLS} is not a package (no __init__.py)")
        package = importlib.util.module_from_spec(spec)
        sys.modules["tools"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"tools.{tool.stem}")


def bench(ctx: typer.Context) -> None:
    """Benchmark produce, consume and latency beside the disk's limits and Redis.

    Runs tools/broker_bench.py with the same options; `nodi bench --help` lists them.
    `--suite queues` runs tools/queue_bench.py (queue groups, request-reply) instead."""
    tool, arguments = _suite(list(ctx.args))
    root = ctx.find_root()
    # Only an explicit `nodi --server`: NODI_SERVER alone must not stop the bench from
    # starting its own server.
    source = root.get_parameter_source("server")
    server = state_of(ctx).server
    if tool == TOOL and getattr(source, "name", None) == "COMMANDLINE" and server and "--server" not in arguments:
        arguments = ["--server", server, *arguments]
    try:
        code = _load_tool(tool).main(arguments)
    except SystemExit as exit_:  # argparse: --help, or a usage error
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    raise typer.Exit(code or 0)


def register(app: typer.Typer) -> None:
    """Add `bench` to the nodi command; its options go to the tool's own parser."""
    app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(bench)


__all__ = ["register", "bench"]
