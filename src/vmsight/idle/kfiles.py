"""The I/O chokepoint for each kernel interface the idle tracker uses.

Every byte read from or written to procfs and sysfs goes through one :class:`KernelFiles` instance (one for
``/proc``, one for ``/sys``). Tests point ``root`` at a directory of synthetic files, or subclass it to record the
exact traffic (e.g. page_idle bitmap words written at ``pfn // 64 * 8``). Errors become vmsight exceptions:
ENOENT/ESRCH -> :class:`FileNotFoundError` (callers turn it into ProcessGone / BackendUnavailable),
EACCES/EPERM -> :class:`AccessDenied`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from vmsight.idle.errors import AccessDenied

log = logging.getLogger(__name__)


class KernelFiles:
    """Files of one pseudo-filesystem under ``root`` (``/proc`` or ``/sys``), addressed by relative path.

    Binary files (pagemap, kpageflags, page_idle/bitmap) use cached descriptors: ``pread``/``pwrite`` at an
    offset, each call one syscall. Holding /proc/PID/pagemap open pins that process's mm: after the process
    exits, reads return EOF rather than another process's data (even if the pid is reused)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self._fds: dict[tuple[str, int], int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    # --- text files ---------------------------------------------------------------------------------
    def read_text(self, rel: str) -> str:
        try:
            with open(self.path(rel), "rb", buffering=0) as f:
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            raise self._translate(e, rel, "read") from e

    def write_text(self, rel: str, text: str) -> None:
        try:
            fd = os.open(self.path(rel), os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise self._translate(e, rel, "write") from e

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except OSError as e:
            raise self._translate(e, rel, "list") from e

    # --- binary files -------------------------------------------------------------------------------
    def pread(self, rel: str, offset: int, size: int) -> bytes:
        fd = self._fd(rel, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        except OSError as e:
            raise self._translate(e, rel, "read") from e

    def pwrite(self, rel: str, offset: int, data: bytes) -> int:
        fd = self._fd(rel, os.O_RDWR)
        try:
            return os.pwrite(fd, data, offset)
        except OSError as e:
            raise self._translate(e, rel, "write") from e

    def ioctl(self, rel: str, request: int, arg: bytearray) -> int:
        """ioctl on the cached read-only descriptor of ``rel``; ``arg`` is passed by address and updated."""
        fd = self._fd(rel, os.O_RDONLY)
        try:
            return int(fcntl.ioctl(fd, request, arg))
        except OSError as e:
            raise self._translate(e, rel, "ioctl") from e

    def open_binary(self, rel: str, write: bool = False) -> None:
        """Open (and cache) a binary file now, e.g. to pin a process's mm before scanning it."""
        self._fd(rel, os.O_RDWR if write else os.O_RDONLY)

    def forget(self, prefix: str) -> None:
        """Close cached descriptors whose path starts with ``prefix``."""
        for key in [k for k in self._fds if k[0].startswith(prefix)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def _fd(self, rel: str, flags: int) -> int:
        key = (rel, flags)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(self.path(rel), flags | os.O_CLOEXEC)
            except OSError as e:
                raise self._translate(e, rel, "open") from e
            self._fds[key] = fd
        return fd

    def _translate(self, e: OSError, rel: str, what: str) -> Exception:
        if e.errno in (errno.EACCES, errno.EPERM):
            return AccessDenied(self.path(rel), f"permission denied ({what}); run as root")
        if e.errno in (errno.ENOENT, errno.ESRCH):
            return FileNotFoundError(e.errno, f"{self.path(rel)}: {os.strerror(e.errno or 0)}", self.path(rel))
        return e

    def __repr__(self) -> str:
        return f"KernelFiles({self.root!r})"
