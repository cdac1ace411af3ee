"""Users, their password hashes and their permissions: the users file, and the one
function every listener asks before it serves a request (`Principal.may`).

The users file is TOML, one table per user:

    [users.alice]
    password = "scrypt$16384$8$1$<salt, base64>$<hash, base64>"   # `nodi user add alice`
    scram_sha_256 = "4096$<salt>$<stored key>$<server key>"       # the same command (base64)
    scram_sha_512 = "4096$<salt>$<stored key>$<server key>"
    superuser = false
    [users.alice.produce]
    allow = ["orders.>"]                 # topic name patterns
    deny = ["orders.internal"]
    [users.alice.consume]
    allow = ["orders.*"]
    groups_allow = ["billing"]           # group name patterns (stream and queue groups)
    [users.alice.admin]
    allow = []                           # create, delete, compact these topics
    groups_allow = []                    # reset these groups

Patterns are NATS style over the dot-separated tokens of a name: `*` is one token, `>`
(last) one or more; anything else matches itself. Deny wins over allow; what no
pattern allows is refused. A topic's dead-letter topic `<topic>.dlq` is granted with
the topic (a pattern naming the dead-letter topic itself decides first). A superuser
may do everything. A user with no password authenticates only by a client
certificate whose common name is the user name.

The SCRAM keys are what the Kafka listener's SASL SCRAM-SHA-256/512 checks (RFC 5802:
a salt, the iteration count, StoredKey and ServerKey; never the password itself). A
file written before they existed is read as it is; its users authenticate by password
on nodi's protocol and with SASL PLAIN, and get SCRAM keys at their next `nodi user
passwd`.

`nodi user add|passwd|remove` rewrite the file (comments are not kept; permissions
are) and the server reads it at start and on SIGHUP."""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import scramp

from nodi.storage.errors import InvalidConfigError

# scrypt cost: 2**14 x 8 x 1 is about 16 MiB of memory and tens of ms per check.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_N_MAX = 1 << 20  # a hash asking for more is refused (memory a check may take)
SALT_BYTES = 16
HASH_BYTES = 32
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,128}")
PASSWORD_BYTES_MAX = 1024
DEAD_LETTER_SUFFIX = ".dlq"
# SCRAM mechanisms and their key in a user's table. 4096 iterations is Kafka's minimum
# and the count its own tools use; the client does the iterations, the server only HMACs.
SCRAM_MECHANISMS = {"SCRAM-SHA-256": "scram_sha_256", "SCRAM-SHA-512": "scram_sha_512"}
SCRAM_ITERATIONS = 4096
SCRAM_ITERATIONS_MAX = 1 << 20  # a stored count above this is refused (work a client is asked to do)


class Action(enum.Enum):
    PRODUCE = "produce"
    CONSUME = "consume"
    ADMIN = "admin"


class Resource(enum.Enum):
    TOPIC = "topic"
    GROUP = "group"


# Which (action, resource) a permission table's keys grant: allow/deny are topics,
# groups_allow/groups_deny groups. Produce has no group side.
_KEYS = {
    (Action.PRODUCE, Resource.TOPIC): ("allow", "deny"),
    (Action.CONSUME, Resource.TOPIC): ("allow", "deny"),
    (Action.CONSUME, Resource.GROUP): ("groups_allow", "groups_deny"),
    (Action.ADMIN, Resource.TOPIC): ("allow", "deny"),
    (Action.ADMIN, Resource.GROUP): ("groups_allow", "groups_deny"),
}
_TABLE_KEYS = {
    Action.PRODUCE: ("allow", "deny"),
    Action.CONSUME: ("allow", "deny", "groups_allow", "groups_deny"),
    Action.ADMIN: ("allow", "deny", "groups_allow", "groups_deny"),
}


# -- passwords --------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password`, as the users file stores it."""
    _check_password(password)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(
        ("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)),
    )


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches the `stored` hash (constant time in the comparison)."""
    n, r, p, salt, digest = _parse_hash(stored)
    if len(password.encode()) > PASSWORD_BYTES_MAX:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# A check against this for an unknown user costs what a real one costs, so the time of
# a refusal does not tell whether the user exists.
_DUMMY_HASH = "$".join(
    ("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(bytes(SALT_BYTES)), _b64(bytes(HASH_BYTES)))
)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int = HASH_BYTES) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * r * n + (1 << 20))


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise InvalidConfigError("a password is not an scrypt hash made by `nodi user add`") from None
    if not (1 < n <= SCRYPT_N_MAX and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and salt and digest):
        raise InvalidConfigError("a password hash has scrypt parameters outside the allowed range")
    return n, r, p, salt, digest


def _check_password(password: str) -> None:
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode()) > PASSWORD_BYTES_MAX:
        raise ValueError(f"the password is over {PASSWORD_BYTES_MAX} bytes")


# -- SCRAM keys -------------------------------------------------------------------------


def scram_credentials(password: str) -> dict[str, str]:
    """The SCRAM keys of `password` for every mechanism, as the users file stores them:
    `iterations$salt$stored key$server key` (base64)."""
    _check_password(password)
    credentials = {}
    for mechanism in SCRAM_MECHANISMS:
        salt, stored_key, server_key, iterations = scramp.ScramMechanism(mechanism).make_auth_info(
            password, iteration_count=SCRAM_ITERATIONS
        )
        credentials[mechanism] = "$".join((str(iterations), _b64(salt), _b64(stored_key), _b64(server_key)))
    return credentials


def parse_scram(stored: str) -> tuple[bytes, bytes, bytes, int]:
    """(salt, stored key, server key, iterations): what a SCRAM server checks against."""
    parts = stored.split("$")
    try:
        if len(parts) != 4:
            raise ValueError
        iterations = int(parts[0])
        salt, stored_key, server_key = (base64.b64decode(part, validate=True) for part in parts[1:])
    except ValueError:
        raise InvalidConfigError(
            "SCRAM keys are not `iterations$salt$stored key$server key` from `nodi user`"
        ) from None
    if not (SCRAM_ITERATIONS <= iterations <= SCRAM_ITERATIONS_MAX and salt and stored_key and server_key):
        raise InvalidConfigError(
            f"SCRAM keys with {iterations} iterations (allowed {SCRAM_ITERATIONS}..{SCRAM_ITERATIONS_MAX}) or empty parts"
        )
    return salt, stored_key, server_key, iterations


# -- patterns ---------------------------------------------------------------------------


def check_pattern(pattern: str) -> None:
    """InvalidConfigError for a pattern that is not NATS style: empty tokens, a `*` or
    `>` inside a token, a `>` before the last token."""
    tokens = pattern.split(".")
    for index, token in enumerate(tokens):
        if not token or (("*" in token or ">" in token) and token not in ("*", ">")):
            raise InvalidConfigError(f"permission pattern {pattern!r}: tokens are names, * or a final >")
        if token == ">" and index != len(tokens) - 1:
            raise InvalidConfigError(f"permission pattern {pattern!r}: > may only be the last token")


def pattern_matches(pattern: str, name: str) -> bool:
    """NATS-style match of a dot-separated `name`: `*` one token, `>` the rest (one or more)."""
    pattern_tokens = pattern.split(".")
    name_tokens = name.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(name_tokens) > index
        if index >= len(name_tokens) or (token != "*" and token != name_tokens[index]):
            return False
    return len(name_tokens) == len(pattern_tokens)


@dataclass(frozen=True, slots=True)
class Rule:
    """Allow and deny patterns of one kind of name for one action."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def decides(self, name: str) -> bool | None:
        """False when a deny pattern matches (deny wins), True when an allow pattern
        does, None when none does."""
        if any(pattern_matches(pattern, name) for pattern in self.deny):
            return False
        if any(pattern_matches(pattern, name) for pattern in self.allow):
            return True
        return None


# -- principals -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection acts as, and what it may do."""

    name: str
    superuser: bool = False
    rules: Mapping[tuple[Action, Resource], Rule] = field(default_factory=dict)

    def may(self, action: Action, resource: Resource, name: str) -> bool:
        """THE permission check, for nodi's protocol, the Kafka listener and the web
        console alike: may this principal do `action` on the topic or group `name`?"""
        if self.superuser:
            return True
        rule = self.rules.get((action, resource))
        if rule is None:
            return False
        decision = rule.decides(name)
        if decision is None and resource is Resource.TOPIC and name.endswith(DEAD_LETTER_SUFFIX):
            decision = rule.decides(name.removesuffix(DEAD_LETTER_SUFFIX))  # granted with its topic
        return bool(decision)


# A broker without a users file: everyone may do everything (on loopback, by default).
ANONYMOUS = Principal("anonymous", superuser=True)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password_hash: str | None  # None: only a client certificate authenticates this user
    principal: Principal
    # The permission tables as the file has them, written back unchanged by `nodi user`.
    tables: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    # SCRAM keys by mechanism (SCRAM_MECHANISMS), as the file stores them; empty in a
    # file written before they existed (until `nodi user passwd`).
    scram: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Users:
    """The users file's contents."""

    users: Mapping[str, User] = field(default_factory=dict)

    def get(self, name: str) -> User | None:
        return self.users.get(name)

    def authenticate(self, name: str, password: str) -> Principal | None:
        """The principal of `name` when `password` is its password, else None. Costs one
        scrypt check whether or not the user exists (run it off the event loop)."""
        user = self.users.get(name)
        if user is None or user.password_hash is None:
            verify_password(password, _DUMMY_HASH)
            return None
        return user.principal if verify_password(password, user.password_hash) else None

    def with_password(self, name: str, password: str, *, superuser: bool = False) -> Users:
        """A copy with `name` added (no permissions, or a superuser) or its password changed."""
        if not USER_NAME.fullmatch(name):
            raise ValueError(f"user name {name!r}: 1-128 characters of A-Z a-z 0-9 . _ @ -")
        old = self.users.get(name)
        password_hash, scram = hash_password(password), scram_credentials(password)
        user = (
            User(name, password_hash, Principal(name, superuser), scram=scram)
            if old is None
            else replace(old, password_hash=password_hash, scram=scram)
        )
        return Users({**self.users, name: user})

    def without(self, name: str) -> Users:
        return Users({key: value for key, value in self.users.items() if key != name})


def load_users(path: str) -> Users:
    """Read and check a users file; InvalidConfigError naming the file and the user."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InvalidConfigError(f"users file {path}: {error}") from None
    unknown = set(document) - {"users"}
    if unknown:
        raise InvalidConfigError(f"users file {path}: unknown tables {sorted(unknown)} (only [users.NAME])")
    users: dict[str, User] = {}
    for name, table in document.get("users", {}).items():
        try:
            users[name] = _user_from(name, table)
        except InvalidConfigError as error:
            raise InvalidConfigError(f"users file {path}: user {name}: {error}") from None
    return Users(users)


def _user_from(name: str, table: object) -> User:
    if not USER_NAME.fullmatch(name):
        raise InvalidConfigError("a user name is 1-128 characters of A-Z a-z 0-9 . _ @ -")
    if not isinstance(table, dict):
        raise InvalidConfigError("not a table")
    unknown = set(table) - {"password", "superuser", *SCRAM_MECHANISMS.values(), *(action.value for action in Action)}
    if unknown:
        raise InvalidConfigError(f"unknown keys {sorted(unknown)}")
    password_hash = table.get("password")
    if password_hash is not None:
        if not isinstance(password_hash, str):
            raise InvalidConfigError("password is not a string")
        _parse_hash(password_hash)
    scram = {}
    for mechanism, key in SCRAM_MECHANISMS.items():
        if key in table:
            if not isinstance(table[key], str):
                raise InvalidConfigError(f"{key} is not a string")
            parse_scram(table[key])
            scram[mechanism] = table[key]
    superuser = table.get("superuser", False)
    if not isinstance(superuser, bool):
        raise InvalidConfigError("superuser is not true or false")
    tables: dict[str, dict[str, tuple[str, ...]]] = {}
    for action in Action:
        raw = table.get(action.value, {})
        if not isinstance(raw, dict):
            raise InvalidConfigError(f"{action.value} is not a table")
        wrong = set(raw) - set(_TABLE_KEYS[action])
        if wrong:
            raise InvalidConfigError(
                f"{action.value}: unknown keys {sorted(wrong)} (the keys are {_TABLE_KEYS[action]})"
            )
        lists: dict[str, tuple[str, ...]] = {}
        for key, patterns in raw.items():
            if not isinstance(patterns, list) or not all(isinstance(pattern, str) for pattern in patterns):
                raise InvalidConfigError(f"{action.value}.{key} is not a list of strings")
            for pattern in patterns:
                check_pattern(pattern)
            lists[key] = tuple(patterns)
        if lists:
            tables[action.value] = lists
    rules = {}
    for (action, resource), (allow_key, deny_key) in _KEYS.items():
        lists = tables.get(action.value, {})
        rules[(action, resource)] = Rule(lists.get(allow_key, ()), lists.get(deny_key, ()))
    return User(name, password_hash, Principal(name, superuser, rules), tables, scram)


def users_file_text(users: Iterable[User]) -> str:
    """The users file for `users` (TOML; strings written as JSON, which TOML reads)."""
    lines = [
        "# nodi users (docs/security.md): `nodi user add|passwd|remove` rewrite this file and keep",
        "# the permissions; edit permissions by hand, then send the broker SIGHUP.",
    ]
    for user in sorted(users, key=lambda user: user.name):
        lines += ["", f"[users.{json.dumps(user.name)}]"]
        if user.password_hash is not None:
            lines.append(f"password = {json.dumps(user.password_hash)}")
        for mechanism, key in SCRAM_MECHANISMS.items():
            if mechanism in user.scram:
                lines.append(f"{key} = {json.dumps(user.scram[mechanism])}")
        lines.append(f"superuser = {'true' if user.principal.superuser else 'false'}")
        for action, lists in user.tables.items():
            lines.append(f"[users.{json.dumps(user.name)}.{action}]")
            lines += [f"{key} = {json.dumps(list(patterns))}" for key, patterns in lists.items()]
    return "\n".join(lines) + "\n"


def save_users(path: str, users: Users) -> None:
    """Write the users file whole (a temporary file, fsync, rename), readable by its owner only."""
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(users_file_text(users.users.values()))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
