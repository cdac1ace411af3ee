"""The Kafka wire types and the request/response schemas nodi's listener serves.

Only non-flexible versions (before KIP-482's tagged fields) are described: the listener
advertises no flexible version, so no client sends one (ApiVersions v3+ is answered in
the v0 format before its body is read: connection.py).

A schema is a tuple of fields; a field is (name, type, first version, last version);
a type is one of the primitive names below or a nested schema (an array of structs) or
("array", primitive) (an array of primitives). Field names and version ranges follow
Apache Kafka's message JSON files (clients/src/main/resources/common/message/*.json);
the layouts were written from those descriptions, not copied. Decoding yields dicts;
encoding takes dicts with the same names (a field outside the version is skipped).

All integers are big-endian; strings are int16 length + UTF-8 (-1 = null); bytes and
records are int32 length + bytes (-1 = null); arrays are int32 count (-1 = null) + items.
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import KafkaDecodeError

ALL = 1 << 15  # "every version from here on"

Schema = tuple
Field = tuple[str, Any, int, int]

_INT8 = struct.Struct(">b")
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")


class Reader:
    """A cursor over one request body; every read checks the bytes are there and every
    count against `array_items_max`, before anything is allocated for it."""

    __slots__ = ("data", "position", "array_items_max")

    def __init__(self, data: memoryview, array_items_max: int, position: int = 0) -> None:
        self.data = data
        self.position = position
        self.array_items_max = array_items_max

    def _take(self, size: int) -> int:
        start = self.position
        end = start + size
        if end > len(self.data):
            raise KafkaDecodeError(f"the request ends {end - len(self.data)} byte(s) early")
        self.position = end
        return start

    def int8(self) -> int:
        return _INT8.unpack_from(self.data, self._take(1))[0]

    def int16(self) -> int:
        return _INT16.unpack_from(self.data, self._take(2))[0]

    def int32(self) -> int:
        return _INT32.unpack_from(self.data, self._take(4))[0]

    def int64(self) -> int:
        return _INT64.unpack_from(self.data, self._take(8))[0]

    def boolean(self) -> bool:
        value = self.int8()
        if value not in (0, 1):
            raise KafkaDecodeError(f"boolean {value} is neither 0 nor 1")
        return bool(value)

    def nullable_string(self) -> str | None:
        length = self.int16()
        if length < 0:
            if length != -1:
                raise KafkaDecodeError(f"string length {length}")
            return None
        start = self._take(length)
        try:
            return str(self.data[start : start + length], "utf-8")
        except UnicodeDecodeError as error:
            raise KafkaDecodeError(f"a string is not UTF-8: {error}") from None

    def string(self) -> str:
        value = self.nullable_string()
        if value is None:
            raise KafkaDecodeError("a non-nullable string is null")
        return value

    def nullable_bytes(self) -> memoryview | None:
        length = self.int32()
        if length < 0:
            if length != -1:
                raise KafkaDecodeError(f"bytes length {length}")
            return None
        start = self._take(length)
        return self.data[start : start + length]

    def bytes(self) -> memoryview:
        value = self.nullable_bytes()
        if value is None:
            raise KafkaDecodeError("a non-nullable bytes field is null")
        return value

    def count(self, nullable: bool) -> int | None:
        count = self.int32()
        if count < 0:
            if count != -1 or not nullable:
                raise KafkaDecodeError(f"array count {count}")
            return None
        if count > self.array_items_max:
            raise KafkaDecodeError(f"array of {count} items over array_items_max {self.array_items_max}")
        if count > len(self.data) - self.position:  # every item takes at least a byte
            raise KafkaDecodeError(f"array of {count} items in {len(self.data) - self.position} bytes")
        return count


_PRIMITIVE_READERS = {
    "int8": Reader.int8,
    "int16": Reader.int16,
    "int32": Reader.int32,
    "int64": Reader.int64,
    "bool": Reader.boolean,
    "string": Reader.string,
    "nullable_string": Reader.nullable_string,
    "bytes": Reader.bytes,
    "nullable_bytes": Reader.nullable_bytes,
    "records": Reader.nullable_bytes,
}


def _is_array(kind: Any) -> bool:
    return isinstance(kind, tuple) and len(kind) == 2 and kind[0] in ("array", "nullable_array")


def decode(schema: Schema, version: int, reader: Reader) -> dict[str, Any]:
    """One struct of `schema` at `version` from `reader`."""
    result: dict[str, Any] = {}
    for name, kind, first, last in schema:
        if not first <= version <= last:
            continue
        if isinstance(kind, str):
            result[name] = _PRIMITIVE_READERS[kind](reader)
        elif _is_array(kind):
            count = reader.count(nullable=kind[0] == "nullable_array")
            if count is None:
                result[name] = None
            else:
                item = kind[1]
                if isinstance(item, str):
                    read = _PRIMITIVE_READERS[item]
                    result[name] = [read(reader) for _ in range(count)]
                else:
                    result[name] = [decode(item, version, reader) for _ in range(count)]
        else:
            raise AssertionError(f"field {name}: unknown type {kind!r}")
    return result


def _encode_primitive(kind: str, value: Any, out: list[bytes]) -> None:
    if kind == "int8":
        out.append(_INT8.pack(value))
    elif kind == "int16":
        out.append(_INT16.pack(value))
    elif kind == "int32":
        out.append(_INT32.pack(value))
    elif kind == "int64":
        out.append(_INT64.pack(value))
    elif kind == "bool":
        out.append(b"\x01" if value else b"\x00")
    elif kind in ("string", "nullable_string"):
        if value is None:
            assert kind == "nullable_string"
            out.append(_INT16.pack(-1))
        else:
            data = value.encode()
            out.append(_INT16.pack(len(data)))
            out.append(data)
    elif kind in ("bytes", "nullable_bytes", "records"):
        if value is None:
            assert kind != "bytes"
            out.append(_INT32.pack(-1))
        else:
            out.append(_INT32.pack(len(value)))
            out.append(value)
    else:
        raise AssertionError(f"unknown type {kind!r}")


def encode(schema: Schema, version: int, values: dict[str, Any], out: list[bytes]) -> None:
    """Append one struct of `schema` at `version` to `out` (a list of byte strings)."""
    for name, kind, first, last in schema:
        if not first <= version <= last:
            continue
        value = values.get(name, _DEFAULTS.get(kind) if isinstance(kind, str) else [])
        if isinstance(kind, str):
            _encode_primitive(kind, value, out)
        else:
            if value is None:
                assert kind[0] == "nullable_array", name
                out.append(_INT32.pack(-1))
                continue
            out.append(_INT32.pack(len(value)))
            item = kind[1]
            for element in value:
                if isinstance(item, str):
                    _encode_primitive(item, element, out)
                else:
                    encode(item, version, element, out)


# What an encoded field left out of `values` is: Kafka's defaults.
_DEFAULTS: dict[str, Any] = {
    "int8": 0,
    "int16": 0,
    "int32": 0,
    "int64": 0,
    "bool": False,
    "string": "",
    "nullable_string": None,
    "bytes": b"",
    "nullable_bytes": None,
    "records": None,
}


def array(item: Any) -> tuple[str, Any]:
    return ("array", item)


def nullable_array(item: Any) -> tuple[str, Any]:
    return ("nullable_array", item)
