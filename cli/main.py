"""The `nodi` command line (typer)."""

from __future__ import annotations

from importlib.metadata import version as _package_version

import typer

from nodi.cli import bench, compact, messaging, mirror, torture
from nodi.cli.common import ReadableGroup, command, readable_parameters, state_of
from nodi.cli.dlq import app as dlq_app
from nodi.cli.groups import app as groups_app
from nodi.cli.queues import app as queues_app
from nodi.cli.segments import app as segments_app
from nodi.cli.status import register as register_status
from nodi.cli.topics import app as topics_app
from nodi.cli.users import app as users_app

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
app.add_typer(users_app, name="user", cls=ReadableGroup)
messaging.register(app)
register_status(app)
bench.register(app)
torture.register(app)
compact.register(app)
mirror.register(app)


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
    tls: bool = typer.Option(False, "--tls", envvar="NODI_TLS", help="Connect with TLS, trusting the system's CAs."),
    tls_ca: str = typer.Option(
        None, "--tls-ca", envvar="NODI_TLS_CA", help="Connect with TLS, trusting this CA file (PEM)."
    ),
    tls_cert: str = typer.Option(
        None, "--tls-cert", envvar="NODI_TLS_CERT", help="A client certificate (PEM) for mutual TLS."
    ),
    tls_key: str = typer.Option(
        None, "--tls-key", envvar="NODI_TLS_KEY", help="The client certificate's key (else it is in --tls-cert)."
    ),
    user: str = typer.Option(
        None,
        "--user",
        envvar="NODI_USER",
        help="Authenticate as this user; the password comes from NODI_PASSWORD, else it is asked for.",
    ),
) -> None:
    """nodi: a durable, log-structured message broker."""
    state = state_of(ctx)
    state.server = server
    state.tls, state.tls_ca, state.tls_cert, state.tls_key, state.user = tls, tls_ca, tls_cert, tls_key, user


@command(app, "serve")
def serve(
    data_dir: str = typer.Option(None, "--data-dir", help="Where logs and metadata live (default: ./nodi-data)."),
    host: str = typer.Option(None, "--host", help="Address to listen on (default: 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="TCP port for clients; 0 picks a free one (default: 6634)."),
    metrics_port: int = typer.Option(
        None, "--metrics-port", help="Prometheus endpoint port; 0 picks a free one, -1 disables (default: 6635)."
    ),
    metrics_partition_series_max: int = typer.Option(
        None,
        "--metrics-partition-series-max",
        help="Metrics per partition up to this many partitions, per topic beyond; 0: always per topic (default: 1000).",
    ),
    console_port: int = typer.Option(
        None, "--console-port", help="Web console port (docs/console.md); 0 turns it off (default: 6636)."
    ),
    console_host: str = typer.Option(
        None,
        "--console-host",
        help="Web console address (default: 127.0.0.1); beyond loopback it needs a users file, as --host does.",
    ),
    config: str = typer.Option(
        None, "--config", help="A TOML file of settings with server, topic_defaults, protocol and groups tables."
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective settings as JSON and exit."),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning or error (default: info)."),
    log_json: bool = typer.Option(
        None, "--log-json/--log-plain", help="Log one JSON object per line on stderr (default: plain lines)."
    ),
    insecure_no_auth: bool = typer.Option(
        False,
        "--insecure-no-auth",
        help="Listen beyond loopback without a users file: anyone who reaches the port may do anything.",
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
    from nodi.broker.server.security_settings import check_exposure
    from nodi.broker.server.server import run
    from nodi.storage.errors import NodiError

    try:
        settings = load_config(
            config,
            data_dir=data_dir,
            host=host,
            port=port,
            metrics_port=metrics_port,
            metrics_partition_series_max=metrics_partition_series_max,
            console_port=console_port,
            console_host=console_host,
            log_level=log_level,
            log_json=log_json,
        )
        if kafka_port is not None:  # the [kafka] table's port, from the flag
            settings = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, port=kafka_port))
            settings.validate()
    except NodiError as error:
        typer.echo(f"nodi serve: {error}", err=True)
        raise typer.Exit(2) from None
    if insecure_no_auth:
        settings = dataclasses.replace(settings, security=dataclasses.replace(settings.security, insecure_no_auth=True))
    for warning in unknown_environment_variables():
        typer.echo(f"nodi serve: warning: {warning}", err=True)
    if print_config:
        typer.echo(json.dumps(settings.to_dict(), indent=2, sort_keys=True, default=str))
        return
    try:  # the safe default: no users file, no address beyond loopback (server.run checks again)
        check_exposure(settings.host, settings.security)
        if settings.kafka.enabled:  # the Kafka listener's host, by the same rule
            check_exposure(settings.kafka.host or settings.host, settings.security)
        if settings.console_port:
            check_exposure(settings.console_host, settings.security)
    except NodiError as error:
        typer.echo(f"nodi serve: {error}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        run(settings, announce=lambda line: typer.echo(line))
    except (OSError, NodiError) as error:  # a port taken, the data directory in use or unreadable
        typer.echo(f"nodi serve: {error}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
