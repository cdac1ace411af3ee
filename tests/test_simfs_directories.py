"""The simulated disk's remove_directory (storage/simfs.py), which topic deletion calls
(Store -> fs.remove_directory). It passed a keyword _check_power does not take, so every
call raised TypeError; mypy found it."""

from __future__ import annotations

import errno

import pytest

from nodi.storage.simfs import SimulatedFileSystem


def test_remove_directory_removes_an_empty_directory_and_refuses_the_rest() -> None:
    fs = SimulatedFileSystem()
    fs.make_directory("/data/logs/orders-0")
    fs.make_directory("/data/logs/orders-1")
    fs.open("/data/logs/orders-1/00000000000000000000.log", create=True).close()

    fs.remove_directory("/data/logs/orders-0")
    assert not fs.exists("/data/logs/orders-0")
    with pytest.raises(OSError) as missing:
        fs.remove_directory("/data/logs/orders-0")
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(OSError) as not_empty:
        fs.remove_directory("/data/logs/orders-1")
    assert not_empty.value.errno == errno.ENOTEMPTY
    assert fs.exists("/data/logs/orders-1")


def test_remove_directory_is_a_mutating_call_a_crash_walk_can_halt_before() -> None:
    fs = SimulatedFileSystem()
    fs.make_directory("/data/logs/orders-0")
    fs.halt_after(1)
    with pytest.raises(OSError) as halted:
        fs.remove_directory("/data/logs/orders-0")
    assert halted.value.errno == errno.EIO
    assert fs.halted_before == ("remove_directory", "/data/logs/orders-0")
