"""What the commands that talk to a running broker share: the global --server option
(kept in the typer context) and one way to open a client and report its errors.

    @app.command()
    def list_(ctx: typer.Context) -> None:
        with connect(ctx) as client:
            ...

`connect` gives a blocking nodi.broker.Client for the address from `nodi --server`,
else NODI_SERVER, else 127.0.0.1:6634. A client error ends the command with a one-line
message on stderr and exit code 1 (a usage error is typer's exit code 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import typer

from nodi.storage.errors import NodiError

# What a CLI call waits for one answer by default (each command may offer --timeout-ms).
CLI_TIMEOUT_MS = 10_000


@dataclass
class CliState:
    """Global options, set by the `nodi` callback and read by every command."""

    server: str | None = None


def state_of(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` on stderr and return the Exit to raise."""
    typer.echo(message, err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def connect(ctx: typer.Context, *, timeout_ms: int = CLI_TIMEOUT_MS) -> Iterator:
    """A connected Client for the chosen server; client errors become exit code 1."""
    from nodi.broker import Client

    command = ctx.command_path
    try:
        with Client(state_of(ctx).server, timeout_ms=timeout_ms) as client:
            client.connect()
            yield client
    except NodiError as error:
        raise fail(f"{command}: {type(error).__name__}: {error}") from None
    except ValueError as error:  # a malformed address
        raise fail(f"{command}: {error}", 2) from None
