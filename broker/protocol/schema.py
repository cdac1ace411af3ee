"""A tiny schema engine for message bodies.

A message (or a nested struct) is a dataclass whose wire fields are declared in order with
`wire(TYPE, default, doc=...)`; `schema_of(cls)` reads that declaration once and is the
only encoder and decoder of the body, and `schema_rows(cls)` renders the same declaration
as the byte tables of docs/protocol.md. Dataclass fields declared without `wire` (a
message's request_id) are not part of the body.

Wire types, all big-endian:

    int8 int16 int32 int64     signed, two's complement; 1, 2, 4, 8 bytes
    uint16 uint32              unsigned; 2, 4 bytes
    bool                       1 byte, 0 or 1 (anything else is invalid)
    enum                       an int8 or uint16 whose value must be a member of its IntEnum
    magic                      fixed bytes that must match exactly
    string                     uint16 length + UTF-8 bytes (at most 65,534); the nullable
                               variant ("string?") encodes None as length 0xFFFF
    bytes                      uint32 length + bytes
    array<T>                   uint32 count + count items of T; count <= array_items_max
    struct                     the nested struct's fields in order, no header of its own
    records                    uint32 length + opaque RecordBatch bytes. Always the last
                               field of a message and never nested, so a sender can write
                               everything before it, then the batches themselves (sendfile
                               from a segment); the decoder checks that the length reaches
                               exactly to the end of the body and returns a memoryview of
                               the frame (no copy).

Decoding never raises anything but ProtocolError: INVALID_REQUEST for bytes that do not
fit the declaration (truncated, trailing, out of range, bad UTF-8), LIMIT_EXCEEDED for an
array count above its limit, checked before any item is decoded. Encoding raises
ProtocolError(INVALID_REQUEST) for a value outside its type, and never emits a partial
body: the caller's buffer is only appended to by a whole, valid encoding.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from .errors import ErrorCode, ProtocolError
from .limits import ProtocolLimits

Buffer = bytes | bytearray | memoryview

_NULL_STRING_LENGTH = 0xFFFF
STRING_BYTES_MAX = _NULL_STRING_LENGTH - 1
_UINT32 = struct.Struct(">I")
_UINT16 = struct.Struct(">H")


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def _need(end: int, position: int, size: int, what: str) -> None:
    if end - position < size:
        raise _invalid(f"truncated {what}: {max(end - position, 0)} of {size} bytes")


class WireType:
    """One wire type: a name for the docs, the fewest bytes it can take, and an
    encode/decode pair. `decode` reads from `buffer[position:end]` and returns the value
    and the position after it."""

    name: str = ""
    min_bytes: int = 0

    def encode(self, value: Any, out: bytearray) -> None:
        raise NotImplementedError

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Integer(WireType):
    def __init__(self, name: str, code: str, low: int, high: int) -> None:
        self.name = name
        self._struct = struct.Struct(">" + code)
        self.min_bytes = self._struct.size
        self.low = low
        self.high = high

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(f"expected an integer for {self.name}, got {type(value).__name__}")
        if not self.low <= value <= self.high:
            raise _invalid(f"{value} is outside {self.name} [{self.low}, {self.high}]")
        out += self._struct.pack(value)

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, self.min_bytes, self.name)
        return self._struct.unpack_from(buffer, position)[0], position + self.min_bytes


INT8 = Integer("int8", "b", -(1 << 7), (1 << 7) - 1)
INT16 = Integer("int16", "h", -(1 << 15), (1 << 15) - 1)
INT32 = Integer("int32", "i", -(1 << 31), (1 << 31) - 1)
INT64 = Integer("int64", "q", -(1 << 63), (1 << 63) - 1)
UINT8 = Integer("uint8", "B", 0, (1 << 8) - 1)
UINT16 = Integer("uint16", "H", 0, (1 << 16) - 1)
UINT32 = Integer("uint32", "I", 0, (1 << 32) - 1)


class Boolean(WireType):
    name = "bool"
    min_bytes = 1

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, bool):
            raise _invalid(f"expected a bool, got {type(value).__name__}")
        out.append(1 if value else 0)

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, 1, "bool")
        byte = buffer[position]
        if byte > 1:
            raise _invalid(f"bool byte {byte}, expected 0 or 1")
        return byte == 1, position + 1


BOOL = Boolean()


class Enumeration(WireType):
    """An integer whose value must be a member of `enum_class`; decodes to the member.
    `list_values` puts "0 = NAME, ..." in the docs' notes (off for long enums)."""

    def __init__(self, enum_class: type[enum.IntEnum], integer: Integer, *, list_values: bool = True) -> None:
        self.enum_class = enum_class
        self.integer = integer
        self.name = f"{integer.name} ({enum_class.__name__})"
        self.min_bytes = integer.min_bytes
        self.list_values = list_values
        assert all(integer.low <= member <= integer.high for member in enum_class)
        self._members = {member.value: member for member in enum_class}

    def values_doc(self) -> str:
        return ", ".join(f"{member.value} = {member.name.lower()}" for member in self.enum_class)

    def encode(self, value: Any, out: bytearray) -> None:
        if type(value) is self.enum_class:  # a member: in range by the assert above
            out += self.integer._struct.pack(value)
            return
        self.integer.encode(self._member(value), out)

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        value, position = self.integer.decode(buffer, position, end, limits)
        member = self._members.get(value)
        if member is None:
            raise _invalid(f"{value!r} is not a {self.enum_class.__name__}")
        return member, position

    def _member(self, value: Any) -> enum.IntEnum:
        if isinstance(value, bool):
            raise _invalid(f"expected a {self.enum_class.__name__}, got a bool")
        try:
            return self.enum_class(value)
        except (ValueError, TypeError):
            raise _invalid(f"{value!r} is not a {self.enum_class.__name__}") from None


class Magic(WireType):
    """Constant bytes that must match exactly (a handshake's b"NODI")."""

    def __init__(self, constant: bytes) -> None:
        self.constant = constant
        self.min_bytes = len(constant)
        self.name = f"magic ({len(constant)} bytes)"

    def encode(self, value: Any, out: bytearray) -> None:
        if value != self.constant:
            raise _invalid(f"magic must be {self.constant!r}, got {value!r}")
        out += self.constant

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, self.min_bytes, "magic")
        found = bytes(buffer[position : position + self.min_bytes])
        if found != self.constant:
            raise _invalid(f"magic {found!r}, expected {self.constant!r}")
        return found, position + self.min_bytes


class String(WireType):
    min_bytes = 2

    def __init__(self, *, nullable: bool) -> None:
        self.nullable = nullable
        self.name = "string?" if nullable else "string"

    def encode(self, value: Any, out: bytearray) -> None:
        if value is None and self.nullable:
            out += _UINT16.pack(_NULL_STRING_LENGTH)
            return
        if not isinstance(value, str):
            raise _invalid(f"expected a {self.name}, got {type(value).__name__}")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _invalid(f"string is not encodable as UTF-8: {error}") from None
        if len(encoded) > STRING_BYTES_MAX:
            raise _invalid(f"string of {len(encoded)} bytes exceeds {STRING_BYTES_MAX}")
        out += _UINT16.pack(len(encoded))
        out += encoded

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, 2, "string length")
        (length,) = _UINT16.unpack_from(buffer, position)
        position += 2
        if length == _NULL_STRING_LENGTH:
            if not self.nullable:
                raise _invalid("null where a string is required")
            return None, position
        _need(end, position, length, "string")
        try:
            text = str(buffer[position : position + length], "utf-8")
        except UnicodeDecodeError as error:
            raise _invalid(f"string is not valid UTF-8: {error.reason} at byte {error.start}") from None
        return text, position + length


STRING = String(nullable=False)
NULLABLE_STRING = String(nullable=True)


class Bytes(WireType):
    name = "bytes"
    min_bytes = 4

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _invalid(f"expected bytes, got {type(value).__name__}")
        try:
            view = memoryview(value).cast("B")
        except TypeError as error:
            raise _invalid(f"bytes must be contiguous: {error}") from None
        if view.nbytes > UINT32.high:
            raise _invalid(f"{view.nbytes} bytes do not fit a uint32 length")
        out += _UINT32.pack(view.nbytes)
        out += view

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, 4, "bytes length")
        (length,) = _UINT32.unpack_from(buffer, position)
        position += 4
        _need(end, position, length, "bytes")
        return bytes(buffer[position : position + length]), position + length


BYTES = Bytes()


class Records(WireType):
    """See the module docstring: last field only, decoded as a zero-copy memoryview."""

    name = "records"
    min_bytes = 4

    def encode(self, value: Any, out: bytearray) -> None:
        BYTES.encode(value, out)

    def encode_length(self, length: int, out: bytearray) -> None:
        """Only the length: the caller sends the `length` bytes of batches after it."""
        UINT32.encode(length, out)

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, 4, "records length")
        (length,) = _UINT32.unpack_from(buffer, position)
        position += 4
        if length != end - position:
            raise _invalid(f"records length {length}, but {end - position} bytes follow it")
        return buffer[position:end], end


RECORDS = Records()


class Array(WireType):
    def __init__(self, item: WireType) -> None:
        assert not isinstance(item, Records)
        # A count can only be checked against the bytes left when every item takes some.
        assert item.min_bytes >= 1
        self.item = item
        self.name = f"array<{item.name}>"
        self.min_bytes = 4

    def encode(self, value: Any, out: bytearray) -> None:
        if type(value) is not list and (  # a list is a Sequence: no ABC check for the usual case
            isinstance(value, (str, bytes, bytearray, memoryview)) or not isinstance(value, Sequence)
        ):
            raise _invalid(f"expected a sequence for {self.name}, got {type(value).__name__}")
        if len(value) > UINT32.high:
            raise _invalid(f"{len(value)} items do not fit a uint32 count")
        out += _UINT32.pack(len(value))
        for index, item in enumerate(value):
            try:
                self.item.encode(item, out)
            except ProtocolError as error:
                raise ProtocolError(error.code, f"[{index}]: {error.message}") from None

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        _need(end, position, 4, "array count")
        (count,) = _UINT32.unpack_from(buffer, position)
        position += 4
        if count > limits.array_items_max:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"array of {count} items exceeds array_items_max {limits.array_items_max}",
            )
        if count * self.item.min_bytes > end - position:
            raise _invalid(f"array of {count} items cannot fit in the {end - position} bytes left")
        items = []
        decode = self.item.decode
        for _ in range(count):
            item, position = decode(buffer, position, end, limits)
            items.append(item)
        return items, position


class Struct(WireType):
    """A nested dataclass declared with `wire` fields, encoded inline."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.schema = schema_of(cls)
        assert not self.schema.has_records
        self.min_bytes = self.schema.min_bytes

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, self.cls):
            raise _invalid(f"expected a {self.name}, got {type(value).__name__}")
        self.schema.encode(value, out)

    def decode(self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits) -> tuple[Any, int]:
        return self.schema.decode(buffer, position, end, limits)


# ---------------------------------------------------------------------------
# Declarations


def wire(type_: WireType, default: Any = dataclasses.MISSING, *, doc: str = "") -> Any:
    """Declare a dataclass field as the next field of the body. An empty list default
    becomes a fresh list per instance."""
    metadata = {"wire": type_, "doc": doc}
    if isinstance(default, list):
        assert not default
        return dataclasses.field(default_factory=list, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class WireField(NamedTuple):
    name: str
    type: WireType
    doc: str


class _Run(NamedTuple):
    """Consecutive fields of a schema encoded as one step. `packed` is the one
    struct.Struct of a run of two or more fixed-size integer fields, enumerations
    included (decoded and encoded with one call, and checked field by field only when
    that fails); None for a single field."""

    fields: tuple[WireField, ...]
    names: tuple[str, ...]
    packed: struct.Struct | None
    get_values: Any  # operator.attrgetter of the names (packed runs)
    # The type each value of a packed run has when it packs as is: int for an integer
    # field (not a bool, not an IntEnum), the enum class for an enumeration (a member,
    # in range by Enumeration's assert); any other value is encoded field by field.
    value_types: tuple[type, ...]
    # (name, members by value, field) of the run's enumerations, checked after unpacking.
    enumerations: tuple[tuple[str, dict[int, enum.IntEnum], WireField], ...]


def _integer_of(type_: WireType) -> Integer | None:
    """The fixed-size integer a field is on the wire, when it can join a packed run."""
    if type(type_) is Integer:
        return type_
    if type(type_) is Enumeration:
        return type_.integer
    return None


def _runs(fields: tuple[WireField, ...]) -> tuple[_Run, ...]:
    groups: list[list[WireField]] = []
    for field in fields:
        integer = _integer_of(field.type) is not None
        if integer and groups and len(groups[-1]) and _integer_of(groups[-1][-1].type) is not None:
            groups[-1].append(field)
        else:
            groups.append([field])
    runs = []
    for group in groups:
        names = tuple(field.name for field in group)
        if len(group) >= 2:
            integers = [_integer_of(field.type) for field in group]
            codes = "".join(integer._struct.format[1:] for integer in integers if integer is not None)
            value_types = tuple(
                field.type.enum_class if isinstance(field.type, Enumeration) else int for field in group
            )
            enumerations = tuple(
                (field.name, field.type._members, field) for field in group if isinstance(field.type, Enumeration)
            )
            runs.append(
                _Run(
                    tuple(group),
                    names,
                    struct.Struct(">" + codes),
                    operator.attrgetter(*names),
                    value_types,
                    enumerations,
                )
            )
        else:
            runs.append(_Run(tuple(group), names, None, None, (), ()))
    return tuple(runs)


class Schema:
    """The wire fields of one dataclass, in declaration order. Runs of integer fields
    are packed and unpacked with one precompiled struct each (the hot messages are
    mostly integers and strings); a value a run cannot pack as is goes through the
    fields one by one, which say exactly what is wrong."""

    def __init__(self, cls: type) -> None:
        assert dataclasses.is_dataclass(cls)
        self.cls = cls
        self.fields = tuple(
            WireField(field.name, field.metadata["wire"], field.metadata["doc"])
            for field in dataclasses.fields(cls)
            if "wire" in field.metadata
        )
        records_at = [index for index, field in enumerate(self.fields) if isinstance(field.type, Records)]
        assert len(records_at) <= 1
        assert not records_at or records_at[0] == len(self.fields) - 1, f"{cls.__name__}: records must be last"
        self.has_records = bool(records_at)
        self.min_bytes = sum(field.type.min_bytes for field in self.fields)
        self._runs = _runs(self.fields)

    def encode(self, value: Any, out: bytearray, *, records_bytes: int | None = None) -> None:
        """Append the body of `value` to `out`. With `records_bytes`, the records field is
        written as that length alone (the caller sends the batches after it)."""
        assert records_bytes is None or self.has_records
        for run in self._runs:
            if run.packed is not None:
                values = run.get_values(value)
                if tuple(map(type, values)) == run.value_types:
                    try:
                        out += run.packed.pack(*values)
                        continue
                    except struct.error:
                        pass  # out of range: the fields below say which
            for field in run.fields:
                try:
                    if records_bytes is not None and field.type is RECORDS:
                        RECORDS.encode_length(records_bytes, out)
                    else:
                        field.type.encode(getattr(value, field.name), out)
                except ProtocolError as error:
                    raise ProtocolError(error.code, f"{field.name}: {error.message}") from None

    def decode(
        self, buffer: memoryview, position: int, end: int, limits: ProtocolLimits, **extra: Any
    ) -> tuple[Any, int]:
        values = extra
        for run in self._runs:
            packed = run.packed
            if packed is not None and end - position >= packed.size:
                values.update(zip(run.names, packed.unpack_from(buffer, position)))
                position += packed.size
                for name, members, field in run.enumerations:
                    member = members.get(values[name])
                    if member is None:
                        assert isinstance(field.type, Enumeration)
                        raise _invalid(f"{name}: {values[name]!r} is not a {field.type.enum_class.__name__}")
                    values[name] = member
                continue
            for field in run.fields:  # one field, or a truncated run: the field that is short says so
                try:
                    values[field.name], position = field.type.decode(buffer, position, end, limits)
                except ProtocolError as error:
                    raise ProtocolError(error.code, f"{field.name}: {error.message}") from None
        return self.cls(**values), position


_SCHEMAS: dict[type, Schema] = {}


def schema_of(cls: type) -> Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = Schema(cls)
    return schema


def encode_body(value: Any, *, records_bytes: int | None = None) -> bytearray:
    """The whole body of `value`, or everything up to its records with `records_bytes`.
    The result is a fresh buffer only once every field encoded."""
    out = bytearray()
    schema_of(type(value)).encode(value, out, records_bytes=records_bytes)
    return out


def decode_body(cls: type, body: memoryview, limits: ProtocolLimits, **extra: Any) -> Any:
    """Decode exactly `body` (a whole frame body) as `cls`; trailing bytes are invalid.
    `extra` are the constructor's non-wire arguments (request_id)."""
    value, position = schema_of(cls).decode(body, 0, len(body), limits, **extra)
    if position != len(body):
        raise _invalid(f"{len(body) - position} trailing bytes after a {cls.__name__}")
    return value


# ---------------------------------------------------------------------------
# Documentation


def schema_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field, type, notes) rows for the byte table of `cls`; nested structs and arrays of
    structs are flattened as `field.inner` and `field[].inner`."""
    rows: list[tuple[str, str, str]] = []
    for field in schema_of(cls).fields:
        name = prefix + field.name
        notes = field.doc
        type_ = field.type
        if isinstance(type_, Enumeration) and type_.list_values:
            notes = f"{notes}: {type_.values_doc()}" if notes else type_.values_doc()
        if isinstance(type_, Array) and isinstance(type_.item, Struct):
            rows.append((name, f"array<{type_.item.name}>", notes))
            rows.extend(schema_rows(type_.item.cls, name + "[]."))
        elif isinstance(type_, Struct):
            rows.append((name, type_.name, notes))
            rows.extend(schema_rows(type_.cls, name + "."))
        else:
            rows.append((name, type_.name, notes))
    return rows
