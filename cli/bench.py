"""`nodi bench`: the benchmarks of tools/ (broker_bench.py, queue_bench.py). Their options
are declared once here (BENCH_OPTIONS): `nodi bench`'s typer options and each tool's
argparse arguments (add_bench_options) derive from them.

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
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from nodi.cli.common import command, fail, state_of

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TOOL = TOOLS / "broker_bench.py"
# --suite NAME picks the tool.
SUITES = {"broker": TOOL, "queues": TOOLS / "queue_bench.py"}


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


@dataclass(frozen=True)
class BenchOption:
    """One option of `nodi bench`, declared here once: the typer option of `nodi bench`
    and the argparse argument of each suite's tool (add_bench_options) derive from it.
    `default` is the tool's own (None: the tool picks, as its help says)."""

    flag: str
    type: type  # bool: a flag (store_true)
    help: str
    suites: tuple[str, ...] = ("broker", "queues")
    default: object = None

    @property
    def name(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


BENCH_OPTIONS: tuple[BenchOption, ...] = (
    BenchOption(
        "--quick",
        bool,
        "Seconds-long smoke run (broker: 5,000 messages, 1 round; queues: 3,000 messages, 200 requests).",
        default=False,
    ),
    BenchOption("--server", str, "HOST:PORT of a running broker to measure instead of starting one.", ("broker",)),
    BenchOption(
        "--messages",
        int,
        "Messages per throughput phase (broker: default 200,000, 5,000 with --quick; "
        "queues: default 100,000, 3,000 with --quick).",
    ),
    BenchOption("--value-bytes", int, "Bytes per message value (default 1024).", default=1024),
    BenchOption("--partitions", int, "Partitions of the bench topics (default 1).", default=1),
    BenchOption(
        "--batch-bytes-max",
        int,
        "The throughput producer's batch_bytes_max (default: the producer's, 256 KiB).",
        ("broker",),
    ),
    BenchOption("--rounds", int, "Rounds of every measurement (default 3; 1 with --quick).", ("broker",)),
    BenchOption(
        "--phase-seconds-max",
        float,
        "Time cap of each throughput phase (broker: default 30, 10 with --quick; queues: default 60).",
    ),
    BenchOption(
        "--latency-rate", int, "Messages per second in the latency phase (default 1,000).", ("broker",), default=1_000
    ),
    BenchOption("--latency-seconds", float, "Length of the latency phase (default 10; 0.5 with --quick).", ("broker",)),
    BenchOption(
        "--latency-warmup", int, "First latency messages not counted (default 200; 50 with --quick).", ("broker",)
    ),
    BenchOption(
        "--latency-linger-ms",
        float,
        "The latency producer's linger_ms (default 0: a batch per sender pass).",
        ("broker",),
        default=0.0,
    ),
    BenchOption("--no-redis", bool, "Do not run Redis, report nodi alone.", ("broker",), default=False),
    BenchOption("--redis-server", str, "Path of redis-server (default: found on PATH).", ("broker",)),
    BenchOption("--requests", int, "Requests per request-reply phase (default 3,000; 200 with --quick).", ("queues",)),
    BenchOption(
        "--warmup",
        int,
        "Requests sent before each request-reply phase, not counted (default 200; 20 with --quick).",
        ("queues",),
    ),
    BenchOption(
        "--concurrency", int, "Requesters at once in the concurrent phase (default 8).", ("queues",), default=8
    ),
    BenchOption(
        "--request-fsync",
        str,
        "Fsync policies of the request topic, comma-separated (default always,never).",
        ("queues",),
        default="always,never",
    ),
    BenchOption(
        "--limit-seconds", float, "Length of each machine-limit loop (default 2; 0.3 with --quick).", ("queues",)
    ),
    BenchOption(
        "--data-dir",
        str,
        "Parent of the bench's temporary directory (default: the system temp dir "
        "unless it is tmpfs, else .bench-data beside tools/).",
    ),
    BenchOption("--keep", bool, "Keep the temporary directory.", default=False),
    BenchOption("--json-out", str, "Write the results as JSON here."),
)


def add_bench_options(parser, suite: str) -> None:
    """Add the options of `suite` (BENCH_OPTIONS) to a tool's argparse parser."""
    for option in BENCH_OPTIONS:
        if suite not in option.suites:
            continue
        if option.type is bool:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=option.type, default=option.default, help=option.help)


def _tool_arguments(suite: str, given: dict[str, object]) -> list[str]:
    """The tool's command line for the options given (a flag set, a value not None);
    an option of the other suite is a usage error."""
    arguments = []
    for option in BENCH_OPTIONS:
        value = given[option.name]
        if value is None or value is False:
            continue
        if suite not in option.suites:
            raise fail(
                f"nodi bench: {option.flag} is an option of --suite {' or '.join(option.suites)}, "
                f"not of --suite {suite}",
                code=2,
            )
        arguments += [option.flag] if value is True else [option.flag, str(value)]
    return arguments


def bench(
    ctx: typer.Context,
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="broker: produce, consume and latency "
            "(tools/broker_bench.py); queues: queue groups and request-reply "
            "(tools/queue_bench.py).",
        ),
    ] = "broker",
    **options,
) -> None:
    """Benchmark produce, consume and latency beside the disk's limits and Redis, or with
    --suite queues queue groups and request-reply. Options of one suite only say so.

    Runs from a source checkout (pip install -e .); docs/benchmarks.md explains the
    figures. Exit status 1 when the run fails."""
    if suite not in SUITES:
        raise fail(f"nodi bench: --suite must be one of {', '.join(SUITES)}, got {suite!r}", code=2)
    arguments = _tool_arguments(suite, options)
    tool = SUITES[suite]
    # Only an explicit `nodi --server`: NODI_SERVER alone must not stop the bench from
    # starting its own server.
    source = ctx.find_root().get_parameter_source("server")
    server = state_of(ctx).server
    if tool == TOOL and getattr(source, "name", None) == "COMMANDLINE" and server and "--server" not in arguments:
        arguments = ["--server", server, *arguments]
    try:
        code = _load_tool(tool).main(arguments)
    except SystemExit as exit_:  # argparse: a usage error the tool found
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    raise typer.Exit(code or 0)


def _typer_option(option: BenchOption) -> inspect.Parameter:
    suites = "" if len(option.suites) > 1 else f" (--suite {option.suites[0]} only)"
    default = False if option.type is bool else None
    annotation = option.type if option.type is bool else option.type | None
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(option.flag, help=option.help + suites, show_default=False)],
    )


def register(app: typer.Typer) -> None:
    """Add `bench` to the nodi command: an option per BenchOption."""
    parameters = list(inspect.signature(bench, eval_str=True).parameters.values())[:-1]
    # typer builds the command from the signature inspect reports, which is __signature__.
    bench.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*parameters, *map(_typer_option, BENCH_OPTIONS)]
    )
    command(app, "bench")(bench)


__all__ = ["BENCH_OPTIONS", "BenchOption", "add_bench_options", "register", "bench"]
