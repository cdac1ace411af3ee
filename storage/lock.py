"""The data directory's owner: one process at a time writes a data directory.

    DATA_DIR/nodi.lock     flock(2)ed exclusively by the owner for as long as it runs;
                           holds the owner's PID in decimal and a newline (advisory: for
                           the message a refused process prints)

The broker (Store.open) and every offline tool that writes (segments recover, offline
compact) take the lock before they read or change anything else, and keep it until they
are done. A second one is refused with DataDirectoryLockedError naming the holder's PID,
having touched nothing. Read-only tools (segments list, dump, verify) take no lock; they
ask `lock_holder` and warn that they are reading a live directory.

flock(2) locks belong to an open file description: they are released when the owner
closes the file or dies (kill -9 included), so a stale lock file never blocks a restart,
and a second open of the same file in the same process is refused like another process.
The file is never deleted (deleting it would let two processes lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .errors import DataDirectoryLockedError

LOCK_FILE = "nodi.lock"
# A read-only tool's probe holds a shared lock for a moment; an owner that meets it waits
# this long before it gives up.
ACQUIRE_WAIT_MS = 500
_ACQUIRE_POLL_S = 0.02
_PID_BYTES_MAX = 32


def lock_path(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), LOCK_FILE)


class DataDirectoryLock:
    """Held exclusive lock on a data directory. Use DataDirectoryLock.acquire()."""

    def __init__(self, data_dir: str, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: str | os.PathLike[str], *, wait_ms: int = ACQUIRE_WAIT_MS) -> DataDirectoryLock:
        """Lock DATA_DIR (created when missing) and write this process's PID into the
        lock file. DataDirectoryLockedError when another process (or another open in
        this one) holds it."""
        data_dir = os.fspath(data_dir)
        if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
            raise NotADirectoryError(errno.ENOTDIR, "the data directory is not a directory", data_dir)
        os.makedirs(data_dir, exist_ok=True)
        fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + wait_ms / 1000
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise DataDirectoryLockedError(os.path.abspath(data_dir), _read_pid(fd)) from None
                    time.sleep(_ACQUIRE_POLL_S)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(data_dir, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go (the file stays). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file releases the flock

    def __enter__(self) -> DataDirectoryLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_holder(data_dir: str | os.PathLike[str]) -> int | None:
    """For read-only tools: the PID holding DATA_DIR's lock (0 when it holds it but its
    PID cannot be read), or None when no process holds it. Changes nothing on disk."""
    try:
        fd = os.open(lock_path(data_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return _read_pid(fd) or 0
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, _PID_BYTES_MAX, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
