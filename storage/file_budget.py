"""Open descriptors under a named limit: a file layer that closes the least recently
used files and opens them again by path when they are next used.

A broker with thousands of partitions would otherwise hold three descriptors per
segment for as long as it runs (and fail with EMFILE past the process's file limit).
`BudgetedFileSystem` wraps the real file system (storage/fileio.py's interface, so
the log, recovery and compaction are unchanged); each file it opens is a
`BudgetedFile` that holds its real file only while it is among the `open_files_max`
most recently used. Rules (docs/fault-model.md, "Open descriptors under a limit"):

- A file is opened for real at open() (so a missing file fails there, as before), and
  again on its next use after the budget closed it. A reopened file must be the same
  file (device and inode): one renamed over meanwhile (compaction's swap) is an
  OSError (ESTALE) on that use, never another file's bytes. keep_open() exempts a file
  (compaction pins the segments it replaces, so their readers keep the old inode).
- A file with writes not yet fsynced is closed only after an fsync made by the budget
  (clean files go first: under fsync `always` few are dirty). When that fsync fails,
  the file keeps the error and its owner's next sync() raises it: the log goes
  read-only as after its own failed fsync (I9, F7); the fsync is not retried.
- Closing drops the budget's reference to the real file: a reader that was handed it
  (a FileSlice being sent) keeps it open until it lets go (OsFile closes on its last
  reference), so a descriptor is never closed, or its number reused, under a send.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import resource
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from .fileio import Buffer, File, FileSystem

_logger = logging.getLogger("nodi.storage.file_budget")

# The least open_files_max a budget may have: a segment's three files, compaction's
# group, the atomic writes of a close, with room to spare.
OPEN_FILES_MIN = 32
# Descriptors left for everything but partition files: LMDB's two, the data directory's
# lock, listeners, the event loop, standard streams, a directory fsync or an atomic
# write in progress. Of what is above it, half goes to partition files and half to
# connections and the segment files reads are sending (open_files_max_for).
FILES_RESERVED = 64
# The soft RLIMIT_NOFILE below which a Store refuses to open.
FILES_LIMIT_MIN = FILES_RESERVED + 2 * OPEN_FILES_MIN


def open_files_max_for(soft_limit: int) -> int:
    """The partition files a process with this soft RLIMIT_NOFILE may keep open."""
    return max(0, (soft_limit - FILES_RESERVED) // 2)


def raise_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped by the kernel's nr_open)
    where allowed; (soft before, soft now, hard). Unchanged when it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def files_soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True, slots=True)
class FileBudgetStatistics:
    open_files_max: int
    open_files: int  # real files held now
    reopens: int  # files opened again after the budget closed them
    closes: int  # files the budget closed to stay under the limit
    dirty_closes: int  # of which it fsynced first
    over_limit: int  # times every open file was in use or kept open: the limit was passed


class FileBudget:
    """The LRU of open files; one per Store (every partition's files)."""

    def __init__(self, open_files_max: int) -> None:
        if open_files_max < OPEN_FILES_MIN:
            raise ValueError(f"open_files_max {open_files_max} below {OPEN_FILES_MIN}")
        self.open_files_max = open_files_max
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[BudgetedFile, None] = collections.OrderedDict()
        self._reopens = self._closes = self._dirty_closes = self._over_limit = 0

    def statistics(self) -> FileBudgetStatistics:
        with self._lock:
            return FileBudgetStatistics(
                self.open_files_max, len(self._open), self._reopens, self._closes, self._dirty_closes, self._over_limit
            )

    def _checkout(self, file: BudgetedFile, *, write: bool) -> File:
        """`file`'s real file, opened again if the budget closed it; most recently used
        now. `write`: a write follows, so it is dirty from now until a sync."""
        victims: list[BudgetedFile] = []
        with self._lock:
            inner = file._inner
            if inner is None:
                inner = file._reopen_locked()
                self._reopens += 1
                self._open[file] = None
                victims = self._choose_victims_locked(file)
            elif file._closing:  # chosen to be closed, not yet closed: keep it after all
                file._closing = False
                self._open[file] = None
                victims = self._choose_victims_locked(file)
            else:
                self._open.move_to_end(file)
            if write:
                file._generation += 1
        for victim in victims:
            victim._close_for_budget()
        return inner

    def _register(self, file: BudgetedFile) -> None:
        with self._lock:
            self._open[file] = None
            victims = self._choose_victims_locked(file)
        for victim in victims:
            victim._close_for_budget()

    def _forget(self, file: BudgetedFile) -> None:
        with self._lock:
            self._open.pop(file, None)

    def _choose_victims_locked(self, newcomer: BudgetedFile) -> list[BudgetedFile]:
        """Take files out of the LRU until it is back under the limit: the least
        recently used clean ones first, then dirty ones (closed after an fsync)."""
        excess = len(self._open) - self.open_files_max
        if excess <= 0:
            return []
        victims: list[BudgetedFile] = []
        for dirty_allowed in (False, True):
            for candidate in self._open:
                if len(victims) == excess:
                    break
                if candidate is newcomer or candidate._kept_open or candidate in victims:
                    continue
                if candidate._generation != candidate._synced_generation and not dirty_allowed:
                    continue
                victims.append(candidate)
        for victim in victims:
            del self._open[victim]
            victim._closing = True
        if len(victims) < excess:
            self._over_limit += 1
        self._closes += len(victims)
        return victims


class BudgetedFile:
    """A File whose real file the budget may close between uses (see the module)."""

    def __init__(self, budget: FileBudget, fs: FileSystem, path: str, inner: File) -> None:
        self.path = path
        self._budget = budget
        self._fs = fs
        self._inner: File | None = inner
        self._identity = _identity_of(inner)
        # Writes so far (a counter bumped before each) and the count the last
        # successful fsync covered: equal when clean.
        self._generation = 0
        self._synced_generation = 0
        self._kept_open = False
        self._closing = False  # taken out of the LRU, its fsync-and-close pending
        self._closed = False
        self._sync_error: OSError | None = None  # from an fsync the budget made (sticky)

    # -- the File interface ---------------------------------------------------------------

    def pread(self, size: int, position: int) -> bytes:
        return self._budget._checkout(self, write=False).pread(size, position)

    def pwritev(self, buffers: Sequence[Buffer], position: int) -> int:
        return self._budget._checkout(self, write=True).pwritev(buffers, position)

    def size(self) -> int:
        return self._budget._checkout(self, write=False).size()

    def truncate(self, size: int) -> None:
        self._budget._checkout(self, write=True).truncate(size)

    def sync(self) -> None:
        if self._sync_error is not None:  # never retried (F7): the budget's fsync failed
            raise OSError(errno.EIO, f"an earlier fsync of {self.path} failed: {self._sync_error}")
        generation = self._generation
        self._budget._checkout(self, write=False).sync()
        with self._budget._lock:
            if generation > self._synced_generation:
                self._synced_generation = generation

    def fileno(self) -> int | None:
        return self._budget._checkout(self, write=False).fileno()

    def close(self) -> None:
        self._budget._forget(self)
        with self._budget._lock:
            self._closed = True
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()

    # -- what the budget adds -----------------------------------------------------------------

    def handle(self) -> File:
        """The real file, open: a reader that keeps it (a FileSlice) keeps reading this
        file even if the budget closes it meanwhile."""
        return self._budget._checkout(self, write=False)

    def keep_open(self) -> None:
        """Never close this file for the budget (compaction pins replaced segments)."""
        self._budget._checkout(self, write=False)
        self._kept_open = True

    def _reopen_locked(self) -> File:
        if self._closed:
            raise OSError(errno.EBADF, f"{self.path} is closed")
        inner = self._fs.open(self.path)
        if self._identity is not None and _identity_of(inner) != self._identity:
            inner.close()
            raise OSError(errno.ESTALE, f"{self.path} was replaced since it was opened")
        self._inner = inner
        self._closing = False
        return inner

    def _close_for_budget(self) -> None:
        """Out of the LRU: fsync it first when it holds unsynced writes, then drop the
        reference (the real file closes with its last one)."""
        with self._budget._lock:
            inner = self._inner
            dirty = self._generation != self._synced_generation
            generation = self._generation
        if inner is None:
            return
        if dirty and self._sync_error is None:
            try:
                inner.sync()
            except OSError as error:
                self._sync_error = error
                _logger.error("fsync of %s before closing it for the descriptor limit failed: %s", self.path, error)
            with self._budget._lock:
                self._budget._dirty_closes += 1
                if self._sync_error is None and generation > self._synced_generation:
                    self._synced_generation = generation
        with self._budget._lock:
            if not self._closing or self._inner is not inner:
                return  # used again meanwhile: back in the LRU with it
            if self._generation != generation and self._sync_error is None:
                # Written while it was being synced: keep it (it is counted again).
                self._closing = False
                self._budget._open[self] = None
                return
            self._inner = None
            self._closing = False


class BudgetedFileSystem:
    """`inner` with every opened file under `budget` (the other calls pass through)."""

    def __init__(self, inner: FileSystem, budget: FileBudget) -> None:
        self.inner = inner
        self.budget = budget

    def open(self, path: str, *, create: bool = False) -> BudgetedFile:
        file = BudgetedFile(self.budget, self.inner, path, self.inner.open(path, create=create))
        self.budget._register(file)
        return file

    def list_directory(self, path: str) -> list[str]:
        return self.inner.list_directory(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def rename(self, source: str, destination: str) -> None:
        self.inner.rename(source, destination)

    def unlink(self, path: str) -> None:
        self.inner.unlink(path)

    def make_directory(self, path: str) -> None:
        self.inner.make_directory(path)

    def remove_directory(self, path: str) -> None:
        self.inner.remove_directory(path)

    def sync_directory(self, path: str) -> None:
        self.inner.sync_directory(path)


def _identity_of(file: File) -> tuple[int, int] | None:
    descriptor = file.fileno()
    if descriptor is None:
        return None
    status = os.fstat(descriptor)
    return status.st_dev, status.st_ino
