"""The `nodi` command line (typer)."""

from __future__ import annotations

from importlib.metadata import version as _package_version

import typer

from nodi.cli import bench, compact, messaging, torture
from nodi.cli.common import ReadableGroup, command, readable_parameters, state_of
from nodi.cli.dlq import app as dlq_app
from nodi.cli.groups import app as groups_app
from nodi.cli.queues import app as queues_app
from nodi.cli.segments import app as segments_app
from nodi.cli.status import register as register_status
from nodi.cli.topics import app as topics_app

app = typer.Typer(
    name="nodi",
    help="nodi: a durable, log-structured message broker.",
    no_args_is_help=True,
    add_completion=False,
    cls=ReadableGroup,
)
app.add_typer(segments_app, name="segments", cls=ReadableGroup)
app.add_typer(topics_app, name="topic", cls=ReadableGroup)
app.add_typer(groups_app, name="group", cls=ReadableGroup)
app.add_typer(dlq_app, name="dlq", cls=ReadableGroup)
app.add_typer(queues_app, name="queue", cls=ReadableGroup)
messaging.register(app)
register_status(app)
bench.register(app)
torture.register(app)
compact.register(app)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nodi {_package_version('nodi')}")
        raise typer.Exit()


@app.callback()
@readable_parameters
def main(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    server: str = typer.Option(
        None,
        "--server",
        envvar="NODI_SERVER",
        help="Broker address HOST:PORT for the commands that talk to a running broker (default 127.0.0.1:6634).",
    ),
) -> None:
    """nodi: a durable, log-structured message broker."""
    state_of(ctx).server = server


@command(app, "serve")
def serve(
    data_dir: str = typer.Option(None, "--data-dir", help="Where logs and metadata live (default: ./nodi-data)."),
    host: str = typer.Option(None, "--host", help="Address to listen on (default: 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="TCP port for clients; 0 picks a free one (default: 6634)."),
    metrics_port: int = typer.Option(
        None, "--metrics-port", help="Prometheus endpoint port; 0 picks a free one, -1 disables (default: 6635)."
    ),
    config: str = typer.Option(
        None, "--config", help="A TOML file of settings with server, topic_defaults, protocol and groups tables."
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective settings as JSON and exit."),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning or error (default: info)."),
    log_json: bool = typer.Option(
        None, "--log-json/--log-plain", help="Log one JSON object per line on stderr (default: plain lines)."
    ),
    kafka_port: int = typer.Option(
        None,
        "--kafka-port",
        help="Also serve Kafka clients (confluent-kafka, kafka-python, aiokafka, kcat) on this port; "
        "0 picks a free one (default: off; also `port` in the config file's kafka table).",
    ),
) -> None:
    """Run the broker until SIGTERM or SIGINT (a clean shutdown: the next start needs
    no recovery). Settings: defaults < --config file < NODI_* environment < flags."""
    import dataclasses
    import json

    from nodi.broker.server.config import load_config, unknown_environment_variables
    from nodi.broker.server.logs import configure_logging
    from nodi.broker.server.server import run
    from nodi.storage.errors import NodiError

    try:
        settings = load_config(
            config,
            data_dir=data_dir,
            host=host,
            port=port,
            metrics_port=metrics_port,
            log_level=log_level,
            log_json=log_json,
        )
        if kafka_port is not None:  # the [kafka] table's port, from the flag
            settings = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, port=kafka_port))
            settings.validate()
    except NodiError as error:
        typer.echo(f"nodi serve: {error}", err=True)
        raise typer.Exit(2) from None
    for warning in unknown_environment_variables():
        typer.echo(f"nodi serve: warning: {warning}", err=True)
    if print_config:
        typer.echo(json.dumps(settings.to_dict(), indent=2, sort_keys=True, default=str))
        return
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        run(settings, announce=lambda line: typer.echo(line))
    except (OSError, NodiError) as error:  # a port taken, the data directory in use or unreadable
        typer.echo(f"nodi serve: {error}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
