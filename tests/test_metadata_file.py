"""A damaged metadata file (DATA_DIR/meta/data.mdb) is refused before LMDB maps it
(issue 8, item 8): LMDB trusts its file, and a truncated one killed `nodi serve` with
SIGBUS and an empty log while `nodi segments verify` said ok. Now the store checks the
file's size and meta pages first (storage/lmdb_file.py), `nodi serve` exits 1 with one
line naming the file, and verify checks the metadata store."""

from __future__ import annotations

import os
import subprocess

import pytest

from nodi.storage.admin import verify_metadata_store
from nodi.storage.errors import MetadataCorruptError
from nodi.storage.lmdb_file import DATA_FILE_NAME, check_data_file, current_meta, read_meta_pages
from nodi.storage.metadata import MetadataStore, TopicConfig
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.store import Store

from conftest import NODI

TOPICS = 40


@pytest.fixture
def data_dir(tmp_path) -> str:
    """A data directory with topics, a message each, and committed offsets: its
    metadata file is several pages long."""
    path = str(tmp_path / "data")
    with Store.open(path) as store:
        for number in range(TOPICS):
            store.create_topic(f"topic-{number}", TopicConfig(partitions=1))
            store.log(f"topic-{number}", 0).append(build_batch([NewRecord(None, b"m", (), 1)]))
            store.metadata.stage_offset("group-" + "x" * 100, f"topic-{number}", 0, 1)
        store.metadata.flush()
    return path


def data_file(data_dir: str) -> str:
    return os.path.join(data_dir, "meta", DATA_FILE_NAME)


def run_nodi(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*NODI, *args], capture_output=True, text=True, timeout=timeout_s)


def test_a_whole_file_passes_and_its_current_meta_reaches_its_end(data_dir):
    path = data_file(data_dir)
    check_data_file(os.path.dirname(path))
    first, second, size = read_meta_pages(path)
    meta = current_meta(first, second)
    assert meta.transaction_id == max(first.transaction_id, second.transaction_id)
    assert meta.last_page > 2  # the fixture's file is more than its meta pages
    assert (meta.last_page + 1) * meta.page_size <= size


@pytest.mark.parametrize("cut", ["empty", "inside-first-meta", "inside-second-meta", "after-metas", "one-page-short"])
def test_a_truncated_file_is_refused_naming_it(data_dir, cut):
    path = data_file(data_dir)
    first, second, size = read_meta_pages(path)
    page_size = first.page_size
    new_size = {
        "empty": 0,
        "inside-first-meta": 100,
        "inside-second-meta": page_size + 100,
        "after-metas": 2 * page_size,
        "one-page-short": (current_meta(first, second).last_page) * page_size,
    }[cut]
    os.truncate(path, new_size)
    with pytest.raises(MetadataCorruptError, match=path):
        check_data_file(os.path.dirname(path))
    with pytest.raises(MetadataCorruptError, match=path):
        MetadataStore(data_dir)
    assert os.path.getsize(path) == new_size  # refused before LMDB could touch it


@pytest.mark.parametrize(
    "offset, value, reason",
    [
        (16, b"\x00\x00\x00\x00", "not an LMDB data file"),  # magic
        (20, b"\x07\x00\x00\x00", "format version 7"),  # version
        (10, b"\x00\x00", "not a meta page"),  # page flags
    ],
)
def test_a_damaged_first_meta_page_is_refused(data_dir, offset, value, reason):
    path = data_file(data_dir)
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(value)
    with pytest.raises(MetadataCorruptError, match=reason):
        MetadataStore(data_dir)


def test_a_damaged_second_meta_page_is_refused(data_dir):
    path = data_file(data_dir)
    first, _, _ = read_meta_pages(path)
    with open(path, "r+b") as file:
        file.seek(first.page_size + 16)
        file.write(b"\x01\x02\x03\x04")
    with pytest.raises(MetadataCorruptError, match="meta page 1"):
        MetadataStore(data_dir)


def test_serve_refuses_a_truncated_file_in_one_line_and_verify_fails(data_dir):
    """The issue's case: serve exits 1 with one line naming the file (no traceback, no
    SIGBUS), and verify reports the error and exits 1, where it said ok."""
    path = data_file(data_dir)
    assert run_nodi("segments", "verify", data_dir).returncode == 0
    first, _, _ = read_meta_pages(path)
    os.truncate(path, 3 * first.page_size)
    result = run_nodi("serve", "--data-dir", data_dir, "--port", "0", "--metrics-port", "-1")
    assert result.returncode == 1, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert path in lines[0] and "truncated" in lines[0]
    assert "Traceback" not in result.stderr
    verify = run_nodi("segments", "verify", data_dir)
    assert verify.returncode == 1
    assert f"ERROR: {path}: is truncated" in verify.stdout
    assert os.path.getsize(path) == 3 * first.page_size


def test_verify_walks_every_page(data_dir):
    """A damaged page past the meta pages (its stored page number flipped) is found by
    the structural walk; the file is never handed to LMDB then."""
    path = data_file(data_dir)
    first, second, _ = read_meta_pages(path)
    last_page = current_meta(first, second).last_page
    original = open(path, "rb").read()
    caught = []
    for page in range(2, last_page + 1):
        data = bytearray(original)
        data[page * first.page_size] ^= 0x5A
        with open(path, "wb") as file:
            file.write(data)
        problems = verify_metadata_store(data_dir)
        assert all(problem.severity == "error" and "LMDB structure" in problem.reason for problem in problems)
        if problems:
            caught.append(page)
    # Free pages hold nothing to check; every page of every table is caught.
    assert len(caught) >= pages_in_use(data_dir), caught
    data = bytearray(original)
    data[caught[0] * first.page_size] ^= 0x5A
    with open(path, "wb") as file:
        file.write(data)
    result = run_nodi("segments", "verify", data_dir)
    assert result.returncode == 1 and "LMDB structure" in result.stdout
    with open(path, "wb") as file:
        file.write(original)
    assert verify_metadata_store(data_dir) == []


def pages_in_use(data_dir: str) -> int:
    import lmdb

    env = lmdb.open(os.path.join(data_dir, "meta"), readonly=True, max_dbs=8)
    try:
        with env.begin() as transaction:
            statistics = [env.stat()] + [
                transaction.stat(env.open_db(name, txn=transaction, create=False))
                for name in (b"topics", b"offsets", b"queue_state")
            ]
    finally:
        env.close()
    return sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in statistics)


def test_verify_reads_every_table_entry(data_dir):
    """An entry LMDB stores fine but nodi cannot read (written behind its back) is an
    error of verify, naming the table and key."""
    import lmdb

    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    topics = env.open_db(b"topics")
    with env.begin(write=True) as transaction:
        transaction.put(b"topic-0", b"{not json", db=topics)
    env.close()
    result = run_nodi("segments", "verify", data_dir)
    assert result.returncode == 1
    assert "table 'topics', key b'topic-0'" in result.stdout
