"""The `nodi` command line (typer)."""

from __future__ import annotations

from importlib.metadata import version as _package_version

import typer

from nodi.cli.segments import app as segments_app

app = typer.Typer(
    name="nodi",
    help="nodi: a durable, log-structured message broker.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(segments_app, name="segments")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nodi {_package_version('nodi')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """nodi: a durable, log-structured message broker."""


@app.command()
def serve() -> None:
    """Start the broker (the network server is not built yet)."""
    typer.echo(
        "nodi serve: the network broker is not built yet (issue 3).\n"
        "What exists today: the storage engine (nodi.storage) and `nodi segments "
        "list|dump|verify|recover` for inspecting and repairing a data directory."
    )


if __name__ == "__main__":
    app()
