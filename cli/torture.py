"""`nodi torture`: the crash torture, tools/torture.py, run with the same options.

    nodi torture --rounds 20                      # about a minute
    nodi torture --rounds 1000 --json out.json    # an hour or so
    nodi torture --power-loss --rounds 200        # storage level, on the simulated disk

Like `nodi bench`, the tool lives in the source tree (tools/ is not installed), so this
command needs a checkout installed in development mode (`pip install -e .`).
"""

from __future__ import annotations

import typer

from nodi.cli.bench import TOOLS, _load_tool

TOOL = TOOLS / "torture.py"


def torture(ctx: typer.Context) -> None:
    """Kill the broker at random moments under concurrent producers and consumers, and
    check every acknowledged message after each restart.

    Runs tools/torture.py with the same options; `nodi torture --help` lists them. It
    starts its own `nodi serve` processes on a scratch data directory (never a running
    broker's). Exit status 1 when any violation was found."""
    try:
        code = _load_tool(TOOL).main(list(ctx.args))
    except SystemExit as exit_:  # argparse: --help, or a usage error
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    raise typer.Exit(code or 0)


def register(app: typer.Typer) -> None:
    """Add `torture` to the nodi command; its options go to the tool's own parser."""
    app.command(
        "torture",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(torture)


__all__ = ["register", "torture"]
