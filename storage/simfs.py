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
test can unwind (and be closed) without touching the disk. `crash(rng, mode)` brings the
power back:
  - the namespace reverts to the durable one: unsynced creates, renames and unlinks are
    undone, and inodes no durable entry names are gone;
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
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable, Sequence

from .fileio import Buffer

CRASH_MODES = ("drop", "garble", "reorder")

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
    data = data if cut is None else data[:cut]
    if position > len(content):
        content.extend(bytes(position - len(content)))
    content[position : position + len(data)] = data
    return (position, position + len(data))


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

    def _check(self, *, mutating: bool) -> _Inode:
        """Called with the filesystem lock held."""
        self._fs._check_power(mutating=mutating, path=self.path)
        if self._closed or self._generation != self._fs._generation:
            raise _fault("file handle closed or from before a crash", errno.EBADF, self.path)
        return self._inode

    def pread(self, size: int, position: int) -> bytes:
        with self._fs._lock:
            return bytes(self._check(mutating=False).current[position : position + size])

    def pwritev(self, buffers: Sequence[Buffer], position: int) -> int:
        data = b"".join(bytes(buffer) for buffer in buffers)
        with self._fs._lock:
            inode = self._check(mutating=True)
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
            return len(self._check(mutating=False).current)

    def truncate(self, size: int) -> None:
        with self._fs._lock:
            inode = self._check(mutating=True)
            operation = ("truncate", size, None)
            _apply(inode.current, operation)
            inode.pending.append(operation)

    def sync(self) -> None:
        with self._fs._lock:
            inode = self._check(mutating=True)
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
        self._generation = 0
        self._halted = False
        self._halt_at: int | None = None
        # "write" / "sync" -> [countdown, path suffix, before_raise]
        self._faults: dict[str, list] = {}
        self.quota_bytes = quota_bytes
        self.mutating_calls = 0
        self.crashes = 0

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

    def _take_fault(self, kind: str, path: str) -> list | None:
        fault = self._faults.get(kind)
        if fault is None or not path.endswith(fault[1]):
            return None
        fault[0] -= 1
        if fault[0] > 0:
            return None
        return self._faults.pop(kind)

    def _check_power(self, *, mutating: bool, path: str) -> None:
        if not self._halted and mutating:
            self.mutating_calls += 1
            if self._halt_at is not None and self.mutating_calls >= self._halt_at:
                self._halted = True
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

    def crash(self, rng: random.Random, mode: str = "drop") -> None:
        """Power loss and restart: keep what was durable plus a random part of the rest
        (see the module docstring). Old File objects become invalid."""
        assert mode in CRASH_MODES, mode
        with self._lock:
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
            self._faults.clear()
            self.crashes += 1

    @staticmethod
    def _replay(
        rng: random.Random, mode: str, content: bytearray, pending: list[_Operation]
    ) -> list[tuple[int, int]]:
        touched = []
        if mode == "reorder":
            chosen = [(operation, None) for operation in pending if rng.random() < 0.5]
        else:
            kept = rng.randint(0, len(pending))
            chosen = [(operation, None) for operation in pending[:kept]]
            if kept < len(pending) and pending[kept][0] == "write" and rng.random() < 0.5:
                chosen.append((pending[kept], rng.randrange(len(pending[kept][2]) + 1)))
        for operation, cut in chosen:
            written = _apply(content, operation, cut)
            if written is not None and written[0] < written[1]:
                touched.append(written)
        return touched

    # -- FileSystem protocol ----------------------------------------------------------

    def open(self, path: str, *, create: bool = False) -> SimulatedFile:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=create and path not in self._names, path=path)
            inode = self._names.get(path)
            if inode is None:
                if path in self._directories:
                    raise _fault("is a directory", errno.EISDIR, path)
                if not create:
                    raise _fault("no such file", errno.ENOENT, path)
                if os.path.dirname(path) not in self._directories:
                    raise _fault("no such directory", errno.ENOENT, path)
                inode = self._names[path] = _Inode()
            return SimulatedFile(self, path, inode, self._generation)

    def list_directory(self, path: str) -> list[str]:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=False, path=path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
            entries = [*self._names, *(name for name in self._directories if name != path)]
            return sorted(os.path.basename(name) for name in entries if os.path.dirname(name) == path)

    def exists(self, path: str) -> bool:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=False, path=path)
            return path in self._names or path in self._directories

    def rename(self, source: str, destination: str) -> None:
        source, destination = os.path.normpath(source), os.path.normpath(destination)
        with self._lock:
            self._check_power(mutating=True, path=source)
            if source not in self._names:
                raise _fault("no such file", errno.ENOENT, source)
            if os.path.dirname(destination) not in self._directories:
                raise _fault("no such directory", errno.ENOENT, destination)
            self._names[destination] = self._names.pop(source)

    def unlink(self, path: str) -> None:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=True, path=path)
            if path not in self._names:
                raise _fault("no such file", errno.ENOENT, path)
            del self._names[path]

    def make_directory(self, path: str) -> None:
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=False, path=path)
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
            self._check_power(mutating=True, path=path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
            if any(os.path.dirname(name) == path for name in [*self._names, *self._directories]):
                raise _fault("directory not empty", errno.ENOTEMPTY, path)
            self._directories.discard(path)

    def sync_directory(self, path: str) -> None:
        """Make the directory's current entries durable (F4)."""
        path = os.path.normpath(path)
        with self._lock:
            self._check_power(mutating=True, path=path)
            if path not in self._directories:
                raise _fault("no such directory", errno.ENOENT, path)
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
