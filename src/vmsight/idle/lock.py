"""A lock of our own between idle trackers (flock on a file in a lock directory).

page_idle and DAMON act on machine-wide state (a PFN's idle flag, the kdamond slots), so their locks are global;
clear_refs acts on one process, so its lock is per pid. The kernel offers no such lock: other users of
page_idle/DAMON/clear_refs that are not vmsight are not excluded (the backends warn where they can see them).

The lock directory is private and verified (:mod:`vmsight.runtime`): another local user must not be able to
plant a symlink that makes vmsight, often root, follow it or truncate its target."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat

from vmsight.idle.errors import TrackerBusy
from vmsight.runtime import UnsafePath, open_private_dir, runtime_dir

log = logging.getLogger(__name__)

_PID_WIDTH = 20  # the holder's pid, space padded: rewritten in place, so the file is never truncated


def default_lock_dir() -> str:
    """VMSIGHT_LOCK_DIR if set, else this user's runtime directory; either is made 0700 if missing and must be
    this user's own, not a symlink, and writable by nobody else."""
    env = os.environ.get("VMSIGHT_LOCK_DIR")
    if env:
        os.close(open_private_dir(env, hint="VMSIGHT_LOCK_DIR must name a private directory of yours"))
        return env
    return runtime_dir()


class TrackerLock:
    """Exclusive, non-blocking (unless ``wait``) lock named ``name``; the holder's pid is written into it."""

    def __init__(self, name: str, lock_dir: str | None = None, wait: bool = False) -> None:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad lock name {name!r}")
        self.dir = lock_dir or default_lock_dir()
        fname = f"idle-{name}.lock"
        self.path = os.path.join(self.dir, fname)
        dfd = open_private_dir(self.dir, hint="VMSIGHT_LOCK_DIR must name a private directory of yours")
        try:
            # openat in the verified directory; O_NOFOLLOW: a symlink there is refused, never followed.
            self._fd: int | None = os.open(fname, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                           dir_fd=dfd)
        except OSError as e:
            raise UnsafePath(f"cannot open lock file {self.path}: {e.strerror}; remove it") from None
        finally:
            os.close(dfd)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(self._fd)
            self._fd = None
            raise UnsafePath(f"lock file {self.path} is not a plain file of yours: remove it")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise TrackerBusy(self.path, holder) from None
        os.pwrite(self._fd, f"{os.getpid():<{_PID_WIDTH - 1}}\n".encode(), 0)
        log.debug("took %s", self.path)

    def _holder(self) -> int | None:
        assert self._fd is not None
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(os.pread(self._fd, 32, 0).split()[0])
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, b" " * (_PID_WIDTH - 1) + b"\n", 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
