"""A lock of our own between idle trackers (flock on a file in a lock directory).

page_idle and DAMON act on machine-wide state (a PFN's idle flag, the kdamond slots), so their locks are global;
clear_refs acts on one process, so its lock is per pid. The kernel offers no such lock: other users of
page_idle/DAMON/clear_refs that are not vmsight are not excluded (the backends warn where they can see them)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from vmsight.idle.errors import TrackerBusy

log = logging.getLogger(__name__)


def default_lock_dir() -> str:
    env = os.environ.get("VMSIGHT_LOCK_DIR")
    if env:
        return env
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return "/run/vmsight"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"vmsight-{os.geteuid()}")


class TrackerLock:
    """Exclusive, non-blocking (unless ``wait``) lock named ``name``; the holder's pid is written into it."""

    def __init__(self, name: str, lock_dir: str | None = None, wait: bool = False) -> None:
        self.dir = lock_dir or default_lock_dir()
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        self.path = os.path.join(self.dir, f"idle-{name}.lock")
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise TrackerBusy(self.path, holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        log.debug("took %s", self.path)

    def _holder(self) -> int | None:
        assert self._fd is not None
        with contextlib.suppress(OSError, ValueError):
            return int(os.pread(self._fd, 32, 0).split()[0])
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
