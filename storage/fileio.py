"""The small file interface every byte of the storage layer goes through.

Two implementations: `OsFileSystem` (the real one, used by the log) and the simulated
crash layer in nodi.storage.simfs (tests), which drops or garbles writes that were not
yet fsynced. Keeping the interface this small is what makes that substitution honest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, OSError, ValueError):
        value = -1
    return value if value > 0 else 1024


# Buffers one pwritev call may take (Linux: 1024); more fail with EINVAL.
IOV_MAX = _iov_max()


class File(Protocol):
    path: str

    def pread(self, size: int, position: int) -> bytes: ...

    def pwritev(self, buffers: Sequence[Buffer], position: int) -> int: ...

    def size(self) -> int: ...

    def truncate(self, size: int) -> None: ...

    def sync(self) -> None:
        """fdatasync: data plus the metadata needed to read it back (size)."""

    def fileno(self) -> int | None:
        """A real descriptor for sendfile, or None when there is none."""

    def close(self) -> None: ...


class FileSystem(Protocol):
    def open(self, path: str, *, create: bool = False) -> File: ...

    def list_directory(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def rename(self, source: str, destination: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def make_directory(self, path: str) -> None: ...

    def remove_directory(self, path: str) -> None:
        """Remove an empty directory (a partition's, once its files are unlinked)."""

    def sync_directory(self, path: str) -> None: ...


class OsFile:
    __slots__ = ("path", "_fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def pread(self, size: int, position: int) -> bytes:
        chunks = []
        while size > 0:
            chunk = os.pread(self._fd, size, position)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            position += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pwritev(self, buffers: Sequence[Buffer], position: int) -> int:
        """Write every buffer, in order, from `position`: in calls of at most IOV_MAX
        buffers, each finished after a short write."""
        written = 0
        for start in range(0, len(buffers), IOV_MAX):
            written += self._pwritev_all(buffers[start : start + IOV_MAX], position + written)
        return written

    def _pwritev_all(self, buffers: Sequence[Buffer], position: int) -> int:
        total = sum(len(buffer) for buffer in buffers)
        written = os.pwritev(self._fd, buffers, position)
        if written == total:
            return written
        # A short write (rare: signals, nearly full disk): finish it from one buffer.
        rest = b"".join(bytes(buffer) for buffer in buffers)[written:]
        while rest:
            count = os.pwrite(self._fd, rest, position + written)
            written += count
            rest = rest[count:]
        return written

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # Readers may still hold a slice of a segment that retention deleted; the
        # descriptor closes when the last reference goes.
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass


class OsFileSystem:
    def open(self, path: str, *, create: bool = False) -> OsFile:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return OsFile(path, os.open(path, flags, 0o644))

    def list_directory(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def rename(self, source: str, destination: str) -> None:
        os.rename(source, destination)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def make_directory(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove_directory(self, path: str) -> None:
        os.rmdir(path)

    def sync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS_FILE_SYSTEM = OsFileSystem()


def write_file_atomically(fs: FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old or the new file (I11):
    write a .tmp, fsync it, rename it over `path`, fsync the directory."""
    temporary = path + ".tmp"
    file = fs.open(temporary, create=True)
    try:
        file.truncate(0)
        file.pwritev([data], 0)
        file.sync()
    finally:
        file.close()
    fs.rename(temporary, path)
    fs.sync_directory(os.path.dirname(path) or ".")


def read_whole_file(fs: FileSystem, path: str) -> bytes | None:
    if not fs.exists(path):
        return None
    file = fs.open(path)
    try:
        return file.pread(file.size(), 0)
    finally:
        file.close()
