"""An in-memory FileSystem that behaves like a disk under the fault model
(docs/fault-model.md), for tests. It implements the File/FileSystem protocols of
storage/fileio.py, so a Log runs on it unchanged: Log.open(directory, config, fs=simfs).

The model
---------
A file is an inode; the namespace maps paths to inodes. Each inode holds
  - `current`: what reads see now (the page cache, which survives process death, F5);
  - `durable`: its content as of its last successful sync();
  - `pending`: the writes and truncates since then, in order.
A directory entry change (create, rename, unlink) is visible at once but durable only
after sync_directory() of its parent (F4): the filesystem keeps a current and a durable
namespace. Directories themselves are created durable and never removed.

A power loss takes two calls. `halt()` cuts the power now, `halt_after(n)` just before
the n-th mutating call from now (write, truncate, sync, create, rename, unlink, directory
sync): from then on every call raises OSError(EIO) and nothing changes, so the code under
test can unwind (and be closed) without touching the disk. `crash(rng, mode, names)`
brings the power back:
  - the namespace reverts to the durable one: with names "revert" (the default) every
    unsynced create, rename and unlink is undone; with "prefix" a random prefix of them
    survives, in order (a journaling filesystem); with "subset" any of them may survive
    (F4 promises no more). Inodes no surviving entry names are gone;
  - each surviving file becomes its durable content plus a random prefix of its pending
    operations, the first one not kept possibly torn at a random byte (F1, F2);
  - mode "garble" then overwrites a random stretch of the bytes that replay wrote with
    zeroes or random bytes (F3); mode "reorder" replays a random subset of the pending
    operations instead of a prefix, so a later write may survive an earlier one (F1).
Every File opened before crash() is dead afterwards: any use raises OSError(EBADF)
(close() is always a no-op on it). The filesystem itself is ready for a fresh Log.open.

Faults on demand (F7, F8): `fail_write(n)` / `fail_sync(n)` make the n-th next pwritev /
sync() (of a path ending in `path_endswith`) raise OSError(EIO). A failed sync forgets
the pending writes: they stay readable but will never become durable, and a later sync
"succeeds" without them, as Linux does after an fsync error. With `quota_bytes` set, a
write that would take the files past it writes what fits, then raises OSError(ENOSPC).
For assertions, read_bytes(path) shows a file's content and sync_attempts(path) counts
the fsyncs of the file now at `path`, failed ones included.

Read faults (a latent sector error, a bad cable): `fail_read(n, kind)` makes the n-th
next pread (of a path ending in `path_endswith`) raise OSError(EIO) ("eio"), return a
prefix of what was asked ("short"), or return the bytes with a few of them changed
("garble", seeded). The file itself is not changed: the next read is right again.

Every mutating call is counted (`mutating_calls`) and, while `operations` is a list, noted
in it as (kind, path); `halted_before` names the call a halt_after() fell on. `clone()`
copies the whole disk (namespaces, durable and pending state), so one starting state
can be crashed at every one of an operation's I/O points in turn: `walk_crash_points()`
below does that (SQLite's crash tests and TigerBeetle's simulated storage walk or sample
the same points; docs/fault-model.md, "The crash-point walk").
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .fileio import Buffer

CRASH_MODES = ("drop", "garble", "reorder")
# What a crash does to directory entries not yet made durable by sync_directory (F4):
# all revert; a random prefix of them survives (a journaling filesystem commits its
# metadata in order); or any subset survives (what F4 allows).
NAME_MODES = ("revert", "prefix", "subset")
READ_FAULT_KINDS = ("eio", "short", "garble")
# The kinds of mutating call a walk counts (`operations` entries).
OPERATION_KINDS = ("write", "truncate", "sync", "create", "rename", "unlink", "sync_directory")

# ("write", position, data) or ("truncate", size, None)
_Operation = tuple[str, int, bytes | None]


class _Inode:
    __slots__ = ("current", "durable", "pending", "sync_attempts")

    def __init__(self) -> None:
        self.current = bytearray()
        self.durable = bytearray()
        self.pending: list[_Operation] = []
        self.sync_attempts = 0


def _apply(content: bytearray, operation: _Operation, cut: int | None = None) -> tuple[int, int] | None:
    """Apply one operation to `content`; a write cut to its first `cut` bytes when given.
    Returns the byte range a write touched."""
    kind, position, data = operation
    if kind == "truncate":
        if position < len(content):
            del content[position:]
        else:
            content.extend(bytes(position - len(content)))
        return None
    assert data is not None  # only a truncate carries no data
    data = data if cut is None else data[:cut]
    if position > len(content):
        content.extend(bytes(position - len(content)))
    content[position : position + len(data)] = data
    return (position, position + len(data))


def _garbled(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to four of its bytes changed (each to a different value)."""
    if not data:
        return data
    out = bytearray(data)
    for position in rng.sample(range(len(out)), min(len(out), rng.randint(1, 4))):
        out[position] ^= rng.randrange(1, 256)
    return bytes(out)


def _fault(message: str, code: int, path: str) -> OSError:
    return OSError(code, f"{message} ({os.strerror(code)})", path)


class SimulatedFile:
    __slots__ = ("path", "_fs", "_inode", "_generation", "_closed")

    def __init__(self, fs: SimulatedFileSystem, path: str, inode: _Inode, generation: int) -> None:
        self.path = path
        self._fs = fs
        self._inode = inode
        self._generation = generation
        self._closed = False

    def _check(self, kind: str | None) -> _Inode:
        """Called with the filesystem lock held; `kind` names a mutating call."""
        self._fs._check_power(kind, self.path)
        if self._closed or self._generation != self._fs._generation:
            raise _fault("file handle closed or from before a crash", errno.EBADF, self.path)
        return self._inode

    def pread(self, size: int, position: int) -> bytes:
        with self._fs._lock:
            data = bytes(self._check(None).current[position : position + size])
            fs = self._fs
            fs.read_calls += 1
            fault = fs._take_fault("read", self.path)
            if fault is None:
                return data
            kind, rng = fault[2]
            if kind == "eio":
                raise _fault("injected read error", errno.EIO, self.path)
            if kind == "short":
                return data[: rng.randrange(len(data))] if data else data
            return _garbled(data, rng)

    def pwritev(self, buffers: Sequence[Buffer], position: int) -> int:
        data = b"".join(bytes(buffer) for buffer in buffers)
        with self._fs._lock:
            inode = self._check("write")
            fs = self._fs
            if fs._take_fault("write", self.path) is not None:
                raise _fault("injected write error", errno.EIO, self.path)
            room = fs._room_for(inode, position, len(data))
            if room < len(data):
                if room > 0:  # a real disk writes what fits first
                    operation = ("write", position, data[:room])
                    _apply(inode.current, operation)
                    inode.pending.append(operation)
                raise _fault("quota reached", errno.ENOSPC, self.path)
            operation = ("write", position, data)
            _apply(inode.current, operation)
            inode.pending.append(operation)
            return len(data)

    def size(self) -> int:
        with self._fs._lock:
            return len(self._check(None).current)

    def truncate(self, size: int) -> None:
        with self._fs._lock:
            inode = self._check("truncate")
            operation = ("truncate", size, None)
            _apply(inode.current, operation)
            inode.pending.append(operation)

    def sync(self) -> None:
        with self._fs._lock:
            inode = self._check("sync")
            inode.sync_attempts += 1
            fault = self._fs._take_fault("sync", self.path)
            if fault is None:
                for operation in inode.pending:
                    _apply(inode.durable, operation)
            inode.pending.clear()  # made durable, or (F7) dropped with the dirty pages
        if fault is not None:
            if fault[2] is not None:
                fault[2]()
            raise _fault("injected fsync error", errno.EIO, self.path)

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self._closed = True


class SimulatedFileSystem:
    def __init__(self, *, quota_bytes: int | None = None) -> None:
        self._lock = threading.RLock()
        self._directories: set[str] = {os.sep}
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        # Entry changes since their directory's last sync, in order: ("link", path,
        # inode), ("unlink", path, inode), ("rename", source, destination, inode).
        self._pending_names: list[tuple] = []
        self._generation = 0
        self._halted = False
        self._halt_at: int | None = None
        # "write" / "sync" -> [countdown, path suffix, before_raise]
        # "read" -> [countdown, path suffix, (kind, rng)]
        self._faults: dict[str, list] = {}
        self.quota_bytes = quota_bytes
        self.mutating_calls = 0
        self.read_calls = 0
        self.crashes = 0
        # (kind, path) of each mutating call while this is a list (walks); None: not kept.
        self.operations: list[tuple[str, str]] | None = None
        # The call halt_after() cut the power before, as (kind, path).
        self.halted_before: tuple[str, str] | None = None

    def clone(self) -> SimulatedFileSystem:
        """An independent copy of this disk as it is now: current and durable content,
        pending writes, both namespaces (files named in both stay one inode). Power,
        faults, counters and open files are not copied: the copy is powered and idle."""
        with self._lock:
            copy = SimulatedFileSystem(quota_bytes=self.quota_bytes)
            inodes: dict[int, _Inode] = {}
            for inode in [*self._names.values(), *self._durable_names.values()]:
                if id(inode) not in inodes:
                    twin = inodes[id(inode)] = _Inode()
                    twin.current = bytearray(inode.current)
                    twin.durable = bytearray(inode.durable)
                    twin.pending = list(inode.pending)
            copy._directories = set(self._directories)
            copy._names = {path: inodes[id(inode)] for path, inode in self._names.items()}
            copy._durable_names = {path: inodes[id(inode)] for path, inode in self._durable_names.items()}
            copy._pending_names = [(*change[:-1], inodes[id(change[-1])]) for change in self._pending_names]
            return copy

    # -- power and faults ---------------------------------------------------------

    @property
    def halted(self) -> bool:
        return self._halted

    def halt(self) -> None:
        """Cut the power now: every later call raises OSError(EIO) until crash()."""
        with self._lock:
            self._halted = True

    def halt_after(self, calls: int) -> None:
        """Cut the power just before the `calls`-th mutating call from now."""
        assert calls >= 1
        with self._lock:
            self._halt_at = self.mutating_calls + calls

    def fail_write(self, nth: int = 1, *, path_endswith: str = "") -> None:
        """The nth next pwritev on a matching path raises OSError(EIO), writing nothing."""
        assert nth >= 1
        with self._lock:
            self._faults["write"] = [nth, path_endswith, None]

    def fail_sync(
        self, nth: int = 1, *, path_endswith: str = "", before_raise: Callable[[], None] | None = None
    ) -> None:
        """The nth next sync() of a matching path fails with EIO and drops its pending
        writes. `before_raise` runs in the failing thread just before the error is raised
        (outside the filesystem lock): a test runs another thread's step at that moment."""
        assert nth >= 1
        with self._lock:
            self._faults["sync"] = [nth, path_endswith, before_raise]

    def fail_read(self, nth: int = 1, *, kind: str = "eio", path_endswith: str = "", seed: int = 0) -> None:
        """The nth next pread of a matching path fails: "eio" raises OSError(EIO),
        "short" returns a random prefix of the bytes, "garble" returns them with a few
        changed (seeded). Only that read: the file is unchanged."""
        assert nth >= 1
        assert kind in READ_FAULT_KINDS, kind
        with self._lock:
            self._faults["read"] = [nth, path_endswith, (kind, random.Random(seed))]

    @property
    def read_fault_pending(self) -> bool:
        with self._lock:
            return "read" in self._faults

    def _take_fault(self, kind: str, path: str) -> list | None:
        fault = self._faults.get(kind)
        if fault is None or not path.endswith(fault[1]):
            return None
        fault[0] -= 1
        if fault[0] > 0:
            return None
        return self._faults.pop(kind)

    def _check_power(self, kind: str | None, path: str) -> None:
        """Count a mutating call of `kind` (None: not mutating); raise if the power is off."""
        if not self._halted and kind is not None:
            self.mutating_calls += 1
            if self._halt_at is not None and self.mutating_calls >= self._halt_at:
                self._halted = True
                self.halted_before = (kind, path)
            elif self.operations is not None:
                self.operations.append((kind, path))
        if self._halted:
            raise _fault("simulated power loss", errno.EIO, path)

    def _room_for(self, inode: _Inode, position: int, length: int) -> int:
        """How many of `length` bytes at `position` fit under the quota."""
        if self.quota_bytes is None:
            return length
        growth = max(0, position + length - len(inode.current))
        free = self.quota_bytes - self.used_bytes()
        if growth <= free:
            return length
        return max(0, len(inode.current) + max(free, 0) - position)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(len(inode.current) for inode in set(self._names.values()))

    def crash(self, rng: random.Random, mode: str = "drop", names: str = "revert") -> None:
        """Power loss and restart: keep what was durable plus a random part of the rest
        (see the module docstring; `names` is one of NAME_MODES). Old File objects
        become invalid."""
        assert mode in CRASH_MODES, mode
        assert names in NAME_MODES, names
        with self._lock:
            survived = dict(self._durable_names)
            changes = self._pending_names
            if names == "prefix":
                changes = changes[: rng.randint(0, len(changes))]
            elif names == "subset":
                changes = [change for change in changes if rng.random() < 0.5]
            else:
                changes = []
            for change in changes:  # a change whose premise did not survive is void
                inode: _Inode = change[-1]
                if change[0] == "link":
                    survived[change[1]] = inode
                elif survived.get(change[1]) is inode:
                    del survived[change[1]]
                    if change[0] == "rename":
                        survived[change[2]] = inode
            self._durable_names = survived
            self._pending_names = []
            survivors = {id(inode): inode for inode in self._durable_names.values()}
            for inode in survivors.values():
                content = bytearray(inode.durable)
                touched = self._replay(rng, mode, content, inode.pending)
                if mode == "garble" and touched:
                    start, end = rng.choice(touched)
                    end = min(end, len(content))
                    if start < end:
                        start = rng.randrange(start, end)
                        end = rng.randrange(start, end) + 1
                        noise = bytes(end - start) if rng.random() < 0.3 else rng.randbytes(end - start)
                        content[start:end] = noise
                inode.current = content
                inode.durable = bytearray(content)
                inode.pending = []
            self._names = dict(self._durable_names)
            self._generation += 1
            self._halted = False
            self._halt_at = None
            self.halted_before = None
            self._faults.clear()
            self.crashes += 1

    @staticmethod
    def _replay(rng: random.Random, mode: str, content: bytearray, pending: list[_Operation]) -> list[tuple[int, int]]:
        touched = []
        chosen: list[tuple[_Operation, int | None]]
        if mode == "reorder":
            chosen = [(operation, None) for operation in pending if rng.random() < 0.5]
        else:
            kept = rng.randint(0, len(pending))
            chosen = [(operation, None) for operation in pending[:kept]]
            torn = pending[kept] if kept < len(pending) else None
            if torn is not None and torn[0] == "write" and torn[2] is not None and rng.random() < 0.5:
                chosen.append((torn, rng.randrange(len(torn[2]) + 1)))
        for operation, cut in chosen:
            written = _apply(content, operation, cut)
            if written is not None and written[0] < written[1]:
                touched.append(written)
        return touched

    # -- FileSystem protocol ----------------------------------------------------------

    def open(self, path: str, *, create: bool = False) -> SimulatedFile:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power("create" if create and path not in self._names else None, path)
            inode = self._names.get(path)
            if inode is None:
                if path in self._directories:
                    raise _fault("is a directory", errno.EISDIR, path)
                if not create:
                    raise _fault("no such file", errno.ENOENT, path)
                if os.path.dirname(path) not in self._directories:
                    raise _fault("no such directory", errno.ENOENT, path)
                inode = self._names[path] = _Inode()
                self._pending_names.append(("link", path, inode))
            return SimulatedFile(self, path, inode, self._generation)

    def list_directory(self, path: str) -> list[str]:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(None, path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
            entries = [*self._names, *(name for name in self._directories if name != path)]
            return sorted(os.path.basename(name) for name in entries if os.path.dirname(name) == path)

    def exists(self, path: str) -> bool:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(None, path)
            return path in self._names or path in self._directories

    def rename(self, source: str, destination: str) -> None:
        source, destination = os.path.normpath(source), os.path.normpath(destination)
        with self._lock:
            self._check_power("rename", source)
            if source not in self._names:
                raise _fault("no such file", errno.ENOENT, source)
            if os.path.dirname(destination) not in self._directories:
                raise _fault("no such directory", errno.ENOENT, destination)
            inode = self._names[destination] = self._names.pop(source)
            if os.path.dirname(source) == os.path.dirname(destination):
                self._pending_names.append(("rename", source, destination, inode))
            else:  # durable in two steps, one per directory
                self._pending_names.append(("unlink", source, inode))
                self._pending_names.append(("link", destination, inode))

    def unlink(self, path: str) -> None:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power("unlink", path)
            if path not in self._names:
                raise _fault("no such file", errno.ENOENT, path)
            self._pending_names.append(("unlink", path, self._names.pop(path)))

    def make_directory(self, path: str) -> None:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(None, path)
            while path not in self._directories:
                if path in self._names:
                    raise _fault("a file is in the way", errno.EEXIST, path)
                self._directories.add(path)
                path = os.path.dirname(path)

    def remove_directory(self, path: str) -> None:
        """Remove an empty directory (at once and for good: directories are not part of
        the crash model)."""
        path = os.path.normpath(path)
        with self._lock:
            self._check_power("remove_directory", path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
            if any(os.path.dirname(name) == path for name in [*self._names, *self._directories]):
                raise _fault("directory not empty", errno.ENOTEMPTY, path)
            self._directories.discard(path)

    def sync_directory(self, path: str) -> None:
        """Make the directory's current entries durable (F4)."""
        path = os.path.normpath(path)
        with self._lock:
            self._check_power("sync_directory", path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
            self._pending_names = [change for change in self._pending_names if os.path.dirname(change[1]) != path]
            for name in [name for name in self._durable_names if os.path.dirname(name) == path]:
                del self._durable_names[name]
            for name, inode in self._names.items():
                if os.path.dirname(name) == path:
                    self._durable_names[name] = inode

    # -- inspection (tests) -------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """What a read of `path` sees now, ignoring the power state."""
        with self._lock:
            return bytes(self._names[os.path.normpath(path)].current)

    def sync_attempts(self, path: str) -> int:
        """sync() calls (failed ones included) on the file now at `path`."""
        with self._lock:
            return self._names[os.path.normpath(path)].sync_attempts


# ---------------------------------------------------------------------------
# The crash-point walk


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """One trial of a walk: the power went off just before the `number`-th counted call
    (`before`, as (kind, path)), or, when number is total + 1, after the last one; then
    crash() in `mode` and `names` with the rng seeded by `seed`."""

    number: int
    total: int
    before: tuple[str, str] | None
    mode: str
    names: str
    seed: str

    def describe(self) -> str:
        where = "after the last call" if self.before is None else f"before {self.before[0]} {self.before[1]}"
        return (
            f"crash point {self.number}/{self.total} ({where}), mode {self.mode}, "
            f"names {self.names}, seed {self.seed!r}"
        )


@dataclass(frozen=True, slots=True)
class WalkSummary:
    operations: tuple[tuple[str, str], ...]  # the counted calls of one uninterrupted run
    trials: int

    def counts(self) -> dict[str, int]:
        """Counted calls per kind (write, sync, rename...)."""
        return dict(Counter(kind for kind, _ in self.operations))


# run(fs, arm): does the operation on `fs`, calling arm() once, just before the part whose
# calls are walked, and closes what it opened (also when a call fails: power loss).
WalkRun = Callable[[SimulatedFileSystem, Callable[[], None]], None]
# check(fs, point): after the crash, on the restarted disk.
WalkCheck = Callable[[SimulatedFileSystem, CrashPoint], None]


def count_operations(start: SimulatedFileSystem, run: WalkRun) -> tuple[tuple[str, str], ...]:
    """The mutating calls `run` makes after arm(), on a copy of `start`, uninterrupted."""
    fs = start.clone()
    armed = False

    def arm() -> None:
        nonlocal armed
        assert not armed, "arm() called twice"
        armed = True
        fs.operations = []

    run(fs, arm)
    assert armed, "run never called arm()"
    assert not fs.halted
    return tuple(fs.operations or ())


def walk_crash_points(
    start: SimulatedFileSystem,
    run: WalkRun,
    check: WalkCheck,
    *,
    modes: Sequence[str] = CRASH_MODES,
    names: Sequence[str] = NAME_MODES,
    seed: str = "walk",
    numbers: Sequence[int] | None = None,
    every_mode: bool = True,
) -> WalkSummary:
    """Crash `run` at each of its I/O points in turn: count the mutating calls it makes
    after arm() (N), then for every n in 1..N+1 and every pair of a mode and a names
    mode, run it again on a fresh copy of `start` with the power cut just before call n
    (N+1: after the last), crash that way (seeded) and call check(). `numbers` limits
    the walk to those points; without `every_mode` point n is crashed one way only, the
    pairs taken in turn.
    Every trial must make the same calls as the count up to its cut (the run must be
    deterministic), and a run may fail only after the cut."""
    operations = count_operations(start, run)
    total = len(operations)
    ways = [(mode, name) for name in names for mode in modes]
    trials = 0
    for number in range(1, total + 2) if numbers is None else numbers:
        assert 1 <= number <= total + 1, number
        before = operations[number - 1] if number <= total else None
        for mode, name in ways if every_mode else [ways[(number - 1) % len(ways)]]:
            point = CrashPoint(number, total, before, mode, name, f"{seed}-{number}-{mode}-{name}")
            fs = start.clone()

            def arm(fs: SimulatedFileSystem = fs, number: int = number) -> None:
                fs.halt_after(number)

            try:
                run(fs, arm)
            except Exception as error:
                if not fs.halted:
                    error.add_note(point.describe() + ": failed with the power on")
                    raise
            if number <= total:
                assert fs.halted, f"{point.describe()}: the run ended before the cut"
                assert fs.halted_before == before, (
                    f"{point.describe()}: the run diverged from the count ({fs.halted_before} instead)"
                )
            fs.halt()
            fs.crash(random.Random(point.seed), mode, name)
            try:
                check(fs, point)
            except BaseException as error:
                error.add_note(point.describe())
                raise
            trials += 1
    return WalkSummary(operations, trials)
