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

import base64
import contextlib
import copy
import datetime
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.models import ArgumentInfo, ParameterInfo

from nodi.storage.errors import NodiError

# What a CLI call waits for one answer by default (each command may offer --timeout-ms).
CLI_TIMEOUT_MS = 10_000
# Connection attempts per outage (about 0.4 s of backoff in all): a command run against
# a broker that is not there fails at once rather than after CLI_TIMEOUT_MS.
CLI_CONNECT_ATTEMPTS_MAX = 4


@dataclass
class CliState:
    """Global options, set by the `nodi` callback and read by every command."""

    server: str | None = None
    # TLS and credentials (--tls, --tls-ca, --tls-cert, --tls-key, --user; NODI_* variables).
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    user: str | None = None


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
    state = state_of(ctx)
    try:
        security = _security_options(state)
        with Client(
            state.server, timeout_ms=timeout_ms, reconnect_attempts_max=CLI_CONNECT_ATTEMPTS_MAX, **security
        ) as client:
            client.connect()
            yield client
    except NodiError as error:
        raise fail(f"{command}: {type(error).__name__}: {error}") from None
    except ValueError as error:  # a malformed address
        raise fail(f"{command}: {error}", 2) from None


def _security_options(state: CliState) -> dict[str, Any]:
    """The client's tls=, user= and password= from the global options (which typer
    fills from the NODI_* variables too); the password from NODI_PASSWORD, else asked
    for on the terminal."""
    from nodi.broker.client.tls import PASSWORD_VARIABLE, client_tls_context

    options: dict[str, Any] = {}
    if state.tls or state.tls_ca or state.tls_cert:
        options["tls"] = client_tls_context(state.tls_ca, state.tls_cert, state.tls_key)
    else:
        options["tls"] = False
    if state.user:
        password = os.environ.get(PASSWORD_VARIABLE)
        if password is None:
            password = typer.prompt(f"Password for {state.user}", hide_input=True, err=True)
        options["user"], options["password"] = state.user, password
    else:
        options["user"], options["password"] = None, None
    return options


# ---------------------------------------------------------------------------
# What several commands print or parse


def json_bytes(data: bytes | None) -> object:
    """Bytes in JSON output: text when valid UTF-8, else {"base64": "..."} (the marker:
    an object with the one key "base64"); None stays null."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def parse_position(text: str, option: str) -> str | int | datetime.datetime:
    """A position in a partition from the command line: "earliest", "latest", an offset
    (a non-negative integer) or an ISO-8601 time ("2026-12-01T14:00:00Z"; without a zone
    it is local time): the first message at or after it. Anything else is a usage error
    (exit code 2) naming `option`."""
    text = text.strip()
    if text in ("earliest", "latest"):
        return text
    if text.isdigit():
        return int(text)
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not earliest, latest, an offset or an ISO-8601 time", param_hint=option
        ) from None


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(cell) for cell in header]]
    numeric = [True] * len(header)
    for row in rows:
        cells.append(["-" if cell is None else str(cell) for cell in row])
        for column, cell in enumerate(row):
            if not (isinstance(cell, int) or cell is None):
                numeric[column] = False
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for row in cells:
        line = "  ".join(
            cell.rjust(width) if numeric[column] else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        typer.echo(line.rstrip())


def command(app: typer.Typer, name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """app.command(name), its help the docstring with each paragraph on one line: typer's
    help renderer keeps the single line breaks of later paragraphs, which wraps badly.
    Its parameters read like the rest of the CLI (readable_parameters)."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(function.__doc__ or "").split("\n\n")
        readable = readable_parameters(function)
        help_text = "\n\n".join(" ".join(text.split()) for text in paragraphs)
        return app.command(name, help=help_text, cls=ReadableCommand)(readable)

    return register


class _ReadableArgument(TyperArgument):
    """An argument shown as NAME in the usage line (typer writes "{name}" for a required
    one) and without typer's "<str>" beside it in the Arguments panel."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + "..." if self.nargs != 1 else name

    def display_type_rich(self, ctx: Any) -> str | None:  # click's Context (typer vendors click)
        return None


class ReadableCommand(TyperCommand):
    """The command class of every `command`: its arguments are _ReadableArguments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for parameter in self.params:
            if type(parameter) is TyperArgument:
                parameter.__class__ = _ReadableArgument

    def get_help_option(self, ctx: Any):  # click's Context (typer vendors click)
        """--help, a flag: no "<bool>" beside it."""
        return _flag_without_metavar(super().get_help_option(ctx))


class ReadableGroup(TyperGroup):
    """The class of `nodi` and its command groups: --help without "<bool>"."""

    def get_help_option(self, ctx: Any):  # click's Context (typer vendors click)
        return _flag_without_metavar(super().get_help_option(ctx))


def _flag_without_metavar(option):
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


# What help shows for an option's value, by type (typer's own are "<str>", "<int range>").
_METAVARS: dict[object, str] = {int: "INTEGER", str: "TEXT", float: "NUMBER"}


def readable_parameters(function: Callable[..., None]) -> Callable[..., None]:
    """Give every typer parameter of `function` the help and errors of the rest of the
    CLI, in place of typer's: an argument's metavar is its name in capitals (NAME, not
    "{name}" and "<str>"), an option's is INTEGER, TEXT or NUMBER, a flag has none (not
    "<bool>"); an integer is parsed here, so that a bad value says "'abc' is not an
    integer" or "0 is below the minimum 1" rather than pydantic's "Input should be ...".
    A parameter that sets its own metavar or parser keeps it."""
    parameters = []
    for parameter in inspect.signature(function, eval_str=True).parameters.values():
        annotation, default = parameter.annotation, parameter.default
        if typing.get_origin(annotation) is typing.Annotated:
            value_type, *metadata = typing.get_args(annotation)
            metadata = [_readable_info(info, parameter.name, value_type) for info in metadata]
            annotation = typing.Annotated[(value_type, *metadata)]
        elif isinstance(default, ParameterInfo):
            default = _readable_info(default, parameter.name, annotation)
        parameters.append(parameter.replace(annotation=annotation, default=default))
    # typer builds the command from the signature inspect reports, which is __signature__.
    function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return function


def _readable_info(info: object, name: str, value_type: object) -> object:
    if not isinstance(info, ParameterInfo):
        return info
    info = copy.copy(info)
    base = _base_type(value_type)
    if info.metavar is None:
        if isinstance(info, ArgumentInfo):
            info.metavar = name.upper()
        elif base is bool:
            info.metavar = ""
        else:
            info.metavar = _METAVARS.get(base, "TEXT")
    if base is int and info.parser is None:
        info.parser = _integer_parser(info.min, info.max)  # info.min/max still show the range in help
    return info


def _base_type(value_type: object) -> object:
    """int for int, int | None and list[int]."""
    arguments = [argument for argument in typing.get_args(value_type) if argument is not type(None)]
    if typing.get_origin(value_type) in (list, tuple, typing.Union, types.UnionType) and len(arguments) == 1:
        return _base_type(arguments[0])
    return value_type


def _integer_parser(low: float | None, high: float | None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise typer.BadParameter(f"{value!r} is not an integer")
        try:
            number = int(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not an integer") from None
        if low is not None and number < low:
            raise typer.BadParameter(f"{number} is below the minimum {low}")
        if high is not None and number > high:
            raise typer.BadParameter(f"{number} is above the maximum {high}")
        return number

    return parse


def check_offline_data_directory(command_path: str, data_dir: str | os.PathLike[str], *, writes: bool) -> None:
    """What every offline tool does before touching a data directory: refuse (exit 1) a
    directory that is not nodi's; a reader warns on stderr when a broker or another tool
    holds it (it is reading a live directory). A writer takes the data directory's lock
    itself (nodi.storage.lock) and is refused with a DataDirectoryLockedError."""
    from nodi.storage.errors import holder_name
    from nodi.storage.layout import is_data_directory
    from nodi.storage.lock import lock_holder

    if not is_data_directory(data_dir):
        raise fail(f"{command_path}: {data_dir} is not a nodi data directory (it has no meta/ or logs/)")
    if writes:
        return
    holder = lock_holder(data_dir)
    if holder is not None:
        typer.echo(
            f"{command_path}: note: {data_dir} is in use by {holder_name(holder)}: reading a live directory, "
            "whose active segments may change while they are read",
            err=True,
        )
