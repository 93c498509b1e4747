"""POSIX shared-memory objects as Triton's system shared-memory extension names them, mapped safely.

A client names an object by its ``shm_open`` key (``/input0``: one leading slash, which glibc strips, as
it strips any number of them) and a window of it. Only objects directly under ``/dev/shm`` can be
mapped: a key holding a path separator, a NUL, ``.``/``..``, or naming a symbolic link or anything but a
regular file is refused, so a client can never make a server map an arbitrary file.

Free of grpc and generated code: the gateway's core and the inference worker both use it.

A mapped object can be truncated by its owner while mapped; touching a page past the new end raises
SIGBUS, which would kill the process. :meth:`SharedMemoryFile.window` therefore checks the object's
current size (one ``fstat``) before every use of a window; what remains is the race of a truncation
during the copy itself, which only the object's owner can cause (Triton has the same exposure).
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

from shared.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = ["SHM_ROOT", "FileIdentity", "SharedMemoryFile", "object_name"]

#: Where POSIX shared-memory objects live on Linux (``shm_open`` creates ``/dev/shm/<name>``).
SHM_ROOT = "/dev/shm"
# NAME_MAX of Linux file names.
_NAME_MAX = 255


def object_name(key: str) -> str:
    """The file name under ``/dev/shm`` that ``shm_open(key)`` opens.

    Raises:
        InvalidArgument: The key is empty, too long, or could name anything outside ``/dev/shm``.
    """
    name = key.lstrip("/")
    if not name:
        raise InvalidArgument.field("key", "must name a shared-memory object (e.g. '/input0')")
    if len(name.encode()) > _NAME_MAX:
        raise InvalidArgument.field("key", f"is longer than {_NAME_MAX} bytes")
    if "/" in name or "\x00" in name or ".." in name or name == ".":
        raise InvalidArgument.field(
            "key", "must be a plain shared-memory object name: no '/' after the leading one, no '..', no NUL"
        )
    return name


@dataclass(frozen=True)
class FileIdentity:
    """What tells two openings of an object apart from a new object under the same name."""

    device: int
    inode: int


class SharedMemoryFile:
    """One POSIX shared-memory object mapped read-write from its start to ``limit`` bytes.

    Args:
        key: The ``shm_open`` key.
        limit: Bytes to map (the end of the last window used); the object must hold at least that many.
            None: the whole object.
        root: Directory of the objects (``/dev/shm``; a test may point elsewhere).

    Raises:
        NotFound: No object has that key.
        InvalidArgument: The key is not a plain object name, names a link or a non-regular file, or the
            object holds fewer than ``limit`` bytes.
        FailedPrecondition: The server may not open it (permissions).
    """

    def __init__(self, key: str, limit: int | None, root: str = SHM_ROOT) -> None:
        name = object_name(key)
        path = os.path.join(root, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise NotFound(f"shared-memory object '{key}' does not exist") from None
        except PermissionError:
            raise FailedPrecondition(f"shared-memory object '{key}' cannot be opened by the server") from None
        except OSError as exc:  # ELOOP (a symbolic link), EISDIR, ENXIO (a socket or a FIFO), ...
            raise InvalidArgument.field("key", f"'{key}' is not a shared-memory object ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument.field("key", f"'{key}' is not a shared-memory object")
            if limit is None:
                limit = info.st_size
            if limit <= 0:
                raise InvalidArgument.field("byte_size", "must be > 0")
            if info.st_size < limit:
                raise InvalidArgument(
                    f"shared-memory object '{key}' holds {info.st_size} bytes; offset + byte_size needs {limit}"
                )
            self._map = mmap.mmap(fd, limit, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.key = key
        self.limit = limit
        self.identity = FileIdentity(info.st_dev, info.st_ino)
        # Kept open: every use re-checks the size through it (see the module's note on truncation).
        self._fd: int | None = fd
        self._view = memoryview(self._map)

    def window(self, offset: int, byte_size: int) -> memoryview:
        """Bytes ``[offset, offset + byte_size)`` of the mapping, writable, without a copy.

        Raises:
            FailedPrecondition: The object was truncated below the mapped size, or this file was closed.
        """
        if self._fd is None:
            raise FailedPrecondition(f"shared-memory object '{self.key}' is no longer registered")
        if not 0 <= offset <= offset + byte_size <= self.limit:  # guaranteed by the callers; kept as a last stop
            raise InvalidArgument(f"window [{offset}, {offset + byte_size}) is outside the mapped {self.limit} bytes")
        size = os.fstat(self._fd).st_size
        if size < self.limit:
            raise FailedPrecondition(
                f"shared-memory object '{self.key}' was truncated to {size} bytes; {self.limit} were registered"
            )
        return self._view[offset : offset + byte_size]

    def close(self) -> None:
        """Closes the object. A window still in use keeps its pages mapped until it is released."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a request still holds a window: the mapping goes when the last window does
