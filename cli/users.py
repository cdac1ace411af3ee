"""`nodi user add | list | remove | passwd`: the users file a broker authenticates
against (docs/security.md). Passwords are stored as salted scrypt hashes, never as
text, beside the SCRAM-SHA-256/512 keys the Kafka listener's SASL checks (derived keys,
not the password); they are read from the terminal (asked twice) or, with --password-stdin, from
the first line of standard input. Permissions are edited in the file by hand and kept
by these commands; `kill -HUP <broker pid>` makes a running broker read the file again."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from nodi.cli.common import command, fail

app = typer.Typer(
    name="user",
    help="Add, list, remove users and change passwords in a users file (offline; SIGHUP the broker after).",
    no_args_is_help=True,
)

UsersFile = Annotated[
    str,
    typer.Option(
        "--users-file",
        envvar="NODI_SECURITY_USERS_FILE",
        help="The users file (default: NODI_SECURITY_USERS_FILE, else ./nodi-users.toml).",
    ),
]
UserName = Annotated[str, typer.Argument(help="The user's name: 1-128 characters of A-Z a-z 0-9 . _ @ -.")]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input.")
]
DEFAULT_USERS_FILE = "nodi-users.toml"


def _load(path: str, *, missing_ok: bool):
    from nodi.broker.server.users import Users, load_users
    from nodi.storage.errors import NodiError

    if missing_ok and not os.path.exists(path):
        return Users()
    try:
        return load_users(path)
    except NodiError as error:
        raise fail(f"nodi user: {error}") from None


def _save(path: str, users) -> None:
    from nodi.broker.server.users import save_users

    try:
        save_users(path, users)
    except OSError as error:
        raise fail(f"nodi user: cannot write {path}: {error}") from None


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise fail("nodi user: the password is empty", 2)
    return password


@command(app, "add")
def add_command(
    name: UserName,
    users_file: UsersFile = DEFAULT_USERS_FILE,
    password_stdin: PasswordStdin = False,
    superuser: Annotated[bool, typer.Option("--superuser", help="The user may do everything.")] = False,
) -> None:
    """Add a user with a password, stored as a scrypt hash and SCRAM-SHA-256/512 keys (the file is made if it is not there, readable by its owner only). The new user may do nothing until you give it permissions in the file (or --superuser)."""
    users = _load(users_file, missing_ok=True)
    if users.get(name) is not None:
        raise fail(f"nodi user add: {name} exists (use `nodi user passwd`)")
    try:
        users = users.with_password(name, _read_password(password_stdin), superuser=superuser)
    except ValueError as error:
        raise fail(f"nodi user add: {error}", 2) from None
    _save(users_file, users)
    typer.echo(f"added {name} to {users_file}")


@command(app, "passwd")
def passwd_command(
    name: UserName,
    users_file: UsersFile = DEFAULT_USERS_FILE,
    password_stdin: PasswordStdin = False,
) -> None:
    """Change a user's password (its permissions stay); also stores the user's SCRAM-SHA-256/512 keys, which Kafka clients' SASL SCRAM needs (users added before nodi stored them: run this once)."""
    users = _load(users_file, missing_ok=False)
    if users.get(name) is None:
        raise fail(f"nodi user passwd: no user {name} in {users_file}")
    try:
        users = users.with_password(name, _read_password(password_stdin))
    except ValueError as error:
        raise fail(f"nodi user passwd: {error}", 2) from None
    _save(users_file, users)
    typer.echo(f"changed the password of {name}")


@command(app, "remove")
def remove_command(name: UserName, users_file: UsersFile = DEFAULT_USERS_FILE) -> None:
    """Remove a user (its open connections stay until they close; new ones are refused after SIGHUP)."""
    users = _load(users_file, missing_ok=False)
    if users.get(name) is None:
        raise fail(f"nodi user remove: no user {name} in {users_file}")
    _save(users_file, users.without(name))
    typer.echo(f"removed {name}")


@command(app, "list")
def list_command(users_file: UsersFile = DEFAULT_USERS_FILE) -> None:
    """Every user: whether it has a password, whether it is a superuser, and its permission patterns (never a hash)."""
    from nodi.cli.common import print_table

    users = _load(users_file, missing_ok=False)
    rows = []
    for user in sorted(users.users.values(), key=lambda user: user.name):
        grants = "; ".join(
            f"{action} {key}={','.join(patterns)}"
            for action, lists in user.tables.items()
            for key, patterns in lists.items()
            if patterns
        )
        rows.append(
            (
                user.name,
                "yes" if user.password_hash else "no",
                "yes" if user.principal.superuser else "no",
                grants or "-",
            )
        )
    print_table(("USER", "PASSWORD", "SUPERUSER", "PERMISSIONS"), rows)
