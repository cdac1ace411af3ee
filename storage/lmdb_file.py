"""The header of the metadata store's LMDB data file (DATA_DIR/meta/data.mdb), read with
plain file reads before LMDB maps the file.

Why: LMDB trusts its file. It maps it and follows page numbers into the map, so a file
cut short (a bad copy, a restore from a partial backup, a full disk during a copy)
kills the process with SIGBUS on the first read past its end, with nothing in the log.
An empty file is silently made into a new, empty store. Both are refused here, naming
the file, before the file is handed to LMDB (storage/metadata.py calls `check_data_file`
from its constructor; `nodi segments verify` reports the same problems).

Layout (LMDB 0.9, data format version 1; native byte order and a 64-bit build, as the
engine writes it; there is no checksum). Pages 0 and 1 are the two meta pages; page n
starts at byte n * page_size. Each meta page:

    offset  size  field
         0     8  page_number       0 or 1
         8     2  (pad)
        10     2  page_flags        0x08: a meta page
        12     4  (lower/upper)
        16     4  magic             0xBEEFC0DE
        20     4  version           1
        24     8  map_address
        32     8  map_size          bytes
        40    48  free_db           its first field (uint32) is the page size
        88    48  main_db
       136     8  last_page         the highest page number the meta's transaction uses
       144     8  transaction_id

A commit writes the data pages, then the meta page not used last time; the meta page
with the higher transaction_id is the one the engine opens (page 0 on a tie). The file
must reach the end of that meta's last page: (last_page + 1) * page_size bytes.

Only the header is checked here: pages past the metas are checked by LMDB's own
structural verifier in `nodi segments verify` (storage/admin.py).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import NamedTuple

from .errors import MetadataCorruptError

DATA_FILE_NAME = "data.mdb"
MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_FLAG_META = 0x08
PAGE_SIZE_MIN = 512
PAGE_SIZE_MAX = 32 * 1024  # LMDB 0.9's largest page
META_BYTES = 152  # through transaction_id

_ORDER = "<" if sys.byteorder == "little" else ">"
_PAGE_HEADER = struct.Struct(_ORDER + "Q2xH4x")  # page_number, page_flags
_META = struct.Struct(_ORDER + "IIQQ")  # magic, version, map_address, map_size at 16
_FREE_DB_PAD = struct.Struct(_ORDER + "I")  # the page size, at 40
_META_TAIL = struct.Struct(_ORDER + "QQ")  # last_page, transaction_id at 136


class MetaPage(NamedTuple):
    page_number: int
    page_size: int
    map_size: int
    last_page: int
    transaction_id: int


def _engine_is_checked() -> bool:
    """The layout above is LMDB 0.9's; another engine's files are left to the engine."""
    try:
        import lmdb
    except ImportError:  # pragma: no cover - lmdb is a dependency
        return False
    return tuple(lmdb.version()[:2]) == (0, 9)


def _decode_meta(path: str, data: bytes, page_number: int) -> MetaPage:
    """`data`: the first META_BYTES bytes of meta page `page_number`."""
    stored_number, flags = _PAGE_HEADER.unpack_from(data, 0)
    magic, version, _, map_size = _META.unpack_from(data, 16)
    if magic != MAGIC:
        raise MetadataCorruptError(
            f"{path} is not an LMDB data file: meta page {page_number} has magic {magic:#010x}, expected {MAGIC:#010x}"
        )
    if version != DATA_VERSION:
        raise MetadataCorruptError(
            f"{path}: meta page {page_number} has LMDB data format version {version}, "
            f"this LMDB reads version {DATA_VERSION}"
        )
    if stored_number != page_number or not flags & PAGE_FLAG_META:
        raise MetadataCorruptError(
            f"{path}: page {page_number} is not a meta page (it says page {stored_number}, flags {flags:#x})"
        )
    (page_size,) = _FREE_DB_PAD.unpack_from(data, 40)
    last_page, transaction_id = _META_TAIL.unpack_from(data, 136)
    return MetaPage(page_number, page_size, map_size, last_page, transaction_id)


def read_meta_pages(path: str) -> tuple[MetaPage, MetaPage, int]:
    """Both meta pages of the data file at `path` and its size in bytes.
    MetadataCorruptError naming the file for anything LMDB could not open safely."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise MetadataCorruptError(
                    f"{path} is empty (0 bytes): the metadata store's topics and offsets are not in it "
                    "(restore it from a backup; remove it only if this data directory holds no data yet)"
                )
            if size < META_BYTES:
                raise MetadataCorruptError(f"{path} is truncated: {size} bytes, shorter than its first meta page")
            first = _decode_meta(path, file.read(META_BYTES), 0)
            if first.page_size & (first.page_size - 1) or not PAGE_SIZE_MIN <= first.page_size <= PAGE_SIZE_MAX:
                raise MetadataCorruptError(f"{path}: meta page 0 gives an impossible page size {first.page_size}")
            if size < 2 * first.page_size:
                raise MetadataCorruptError(
                    f"{path} is truncated: {size} bytes, shorter than its two meta pages ({2 * first.page_size} bytes)"
                )
            file.seek(first.page_size)
            second = _decode_meta(path, file.read(META_BYTES), 1)
    except OSError as error:
        raise MetadataCorruptError(f"cannot read {path}: {error.strerror or error}") from None
    if second.page_size != first.page_size:
        raise MetadataCorruptError(
            f"{path}: the meta pages disagree on the page size ({first.page_size} and {second.page_size})"
        )
    return first, second, size


def current_meta(first: MetaPage, second: MetaPage) -> MetaPage:
    """The meta page LMDB opens: the higher transaction id, page 0 on a tie."""
    return second if second.transaction_id > first.transaction_id else first


def check_data_file(meta_directory: str) -> None:
    """Refuse (MetadataCorruptError, one line naming the file) a data file LMDB would
    crash on or silently replace: empty, cut short, not LMDB, another format version,
    or shorter than the pages its current meta page uses. No file yet is fine (a new
    store)."""
    path = os.path.join(meta_directory, DATA_FILE_NAME)
    if not os.path.exists(path) or not _engine_is_checked():
        return
    first, second, size = read_meta_pages(path)
    meta = current_meta(first, second)
    if meta.last_page < 1:
        raise MetadataCorruptError(f"{path}: meta page {meta.page_number} says the last page is {meta.last_page}")
    needed = (meta.last_page + 1) * meta.page_size
    if size < needed:
        raise MetadataCorruptError(
            f"{path} is truncated: {size} bytes, but its last commit (transaction {meta.transaction_id}) "
            f"uses pages up to {meta.last_page}, {needed} bytes; restore the metadata store from a backup"
        )
