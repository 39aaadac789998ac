"""Sharing one VM between vmsight commands: which QMP monitor each uses, and who controls the run state.

QEMU serves one client per QMP monitor, and a VM launched by vmsight has spare monitors (``qmp_aux`` in
vm.json). A command takes a free one by holding an exclusive ``flock`` on ``<monitor>.lock`` in the VM
directory, so it never waits for a greeting that will not come; the lock dies with the process (SIGKILL
included), so a crashed command frees its monitor.

Run control: a command that stops and resumes the VM on its own schedule (``trace``, ``watch``, ``idle --vm``)
holds ``run-control.lock``. Others then must not pause or resume it (a QMP ``stop`` would show up in the
owner's gdbstub session as a stop it did not ask for, and a ``cont`` would resume a VM held at a breakpoint):
they read it live and say so. Lock files are the VM directory's own: created 0600, never through a
symlink, and a file owned by another user is not trusted."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmsight.errors import TargetError

log = logging.getLogger(__name__)

_T = TypeVar("_T")
RUN_CONTROL = "run-control.lock"
_HOLDER_MAX = 200


def _open_lock(path: Path) -> int | None:
    """Our lock file at ``path`` (created 0600), or None where it cannot be used (a read-only directory: another
    user's VM). Refuses a symlink or a file of another user, which nobody but an attacker plants there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TargetError(f"{path} is a symlink: vmsight does not follow links in a VM directory; remove "
                              "it") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            log.debug("no lock at %s: %s", path, e)
            return None
        raise TargetError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise TargetError(f"{path} is not a private file of this user (uid {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):o}): remove it")
    return fd


def _holder(fd: int) -> str:
    """What the holder wrote into its lock file (escaped: a lock file is data, not trusted text)."""
    try:
        raw = os.pread(fd, _HOLDER_MAX, 0)
    except OSError:
        return "unknown"
    text = raw.decode("ascii", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text) or "unknown"


def _take(fd: int, purpose: str, *, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{purpose} (pid {os.getpid()})\n".encode()[:_HOLDER_MAX], 0)
    return True


class MonitorClaim:
    """A held QMP monitor (``path``) of a VM directory; ``release()`` frees it (process exit does too)."""

    def __init__(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connect_monitor(directory: str, monitors: list[str], purpose: str,
                    connect: Callable[[str], _T]) -> tuple[_T, MonitorClaim]:
    """Connect to the first free monitor of ``directory``: lock it, then ``connect(path)``; a monitor whose
    lock is held is skipped without waiting. A connection that fails although the lock was free (a client
    that is not vmsight) moves on to the next. Raises the last connection error, or a TargetError naming
    the holders when every monitor is held."""
    busy: list[str] = []
    last: TargetError | None = None
    for path in monitors:
        fd = _open_lock(Path(directory) / f"{Path(path).name}.lock")
        if fd is not None and not _take(fd, purpose):
            busy.append(_holder(fd))
            os.close(fd)
            continue
        claim = MonitorClaim(path, fd)
        try:
            return connect(path), claim
        except TargetError as e:
            claim.release()
            last = e
            log.debug("monitor %s: %s", path, e)
    if last is not None and not busy:
        if len(monitors) == 1:
            raise last
        raise TargetError(f"none of the {len(monitors)} QMP monitors of {directory} answered; the last: {last}")
    n = len(monitors)
    raise TargetError(f"all {n} QMP monitor{'s' if n > 1 else ''} of {directory} are in use ("
                      + "; ".join(busy + ([str(last)] if last else [])) + "): wait for one of those commands to end"
                      + ("" if n > 1 else "; this VM has no spare monitor (relaunch it with `vmsight vm launch`)"))


class RunControl:
    """The run-control lock of a VM directory, held by this process."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def take_run_control(directory: str, purpose: str) -> RunControl | None:
    """Hold the VM's run control for ``purpose``; None where the directory cannot hold locks. Raises when
    another command holds it, naming that command."""
    fd = _open_lock(Path(directory) / RUN_CONTROL)
    if fd is None:
        return None
    if not _take(fd, purpose):
        holder = _holder(fd)
        os.close(fd)
        raise TargetError(f"{holder} controls the run state of the VM in {directory}: {purpose} needs it too; "
                          "wait for that command to end")
    return RunControl(fd)


def run_control_owner(directory: str) -> str | None:
    """Who holds the VM's run control (another process), or None."""
    fd = _open_lock(Path(directory) / RUN_CONTROL)
    if fd is None:
        return None
    try:
        if _take(fd, "", shared=True):
            return None
        return _holder(fd)
    finally:
        os.close(fd)   # closing drops our shared lock, if we got one


__all__ = ["MonitorClaim", "RUN_CONTROL", "RunControl", "connect_monitor", "run_control_owner",
           "take_run_control"]
