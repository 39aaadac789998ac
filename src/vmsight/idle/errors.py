"""Idle-tracking errors. Each carries the data a caller needs (pid, backend, kernel option, path)."""

from __future__ import annotations

from vmsight.errors import PermissionDenied, ProcessNotFound, UnsupportedKernel, VmsightError


class ProcessGone(ProcessNotFound):
    """The tracked process exited (or became a zombie) before or during a scan."""

    def __init__(self, pid: int, phase: str = "") -> None:
        super().__init__(pid)
        self.args = (f"process {pid} exited" + (f" during {phase}" if phase else "")
                     + "; its idle state cannot be read",)
        self.phase = phase


class PidReused(ProcessGone):
    """The pid now names a different process (start time changed since the tracker attached)."""

    def __init__(self, pid: int, old_start_boottime_ns: int, new_start_boottime_ns: int) -> None:
        super().__init__(pid)
        self.args = (f"pid {pid} was reused: the tracked process (started {old_start_boottime_ns / 1e9:.3f} s "
                     f"after boot) exited and a new one (started {new_start_boottime_ns / 1e9:.3f} s after boot) "
                     "took its pid",)
        self.old_start_boottime_ns = old_start_boottime_ns
        self.new_start_boottime_ns = new_start_boottime_ns


class KernelThread(VmsightError):
    """The pid is a kernel thread: it has no mm, so it has no user pages to track."""

    def __init__(self, pid: int, comm: str) -> None:
        super().__init__(f"pid {pid} ({comm}) is a kernel thread: it has no user address space to track")
        self.pid = pid
        self.comm = comm


class BackendUnavailable(UnsupportedKernel):
    """An idle-tracking backend cannot run here. ``option`` names the kernel config option (or capability)
    that is missing; ``reasons`` holds every backend's reason when ``auto`` found none."""

    def __init__(self, backend: str, reason: str, option: str = "",
                 reasons: dict[str, str] | None = None) -> None:
        super().__init__(f"idle backend {backend!r}", reason)
        self.backend = backend
        self.reason = reason
        self.option = option
        self.reasons = reasons or {backend: reason}


class AccessDenied(PermissionDenied):
    """A kernel interface refused us (EACCES/EPERM), or hides data (pagemap PFNs without CAP_SYS_ADMIN)."""

    def __init__(self, path: str, need: str) -> None:
        super().__init__(f"{path}: {need}")
        self.path = path
        self.need = need


class TrackerBusy(VmsightError):
    """Another tracker holds our lock for this backend (their marks would corrupt our reads)."""

    def __init__(self, lock_path: str, holder_pid: int | None) -> None:
        who = f"pid {holder_pid}" if holder_pid else "another process"
        super().__init__(f"another idle tracker ({who}) holds {lock_path}; concurrent trackers would "
                         "clear each other's accessed bits — wait for it or stop it")
        self.lock_path = lock_path
        self.holder_pid = holder_pid


class BadRange(VmsightError):
    """A range spec did not name a mapped range (unknown VMA name, empty or inverted interval)."""

    def __init__(self, spec: str, known: list[str] | None = None) -> None:
        hint = f"; mapped names: {', '.join(known[:12])}" if known else ""
        super().__init__(f"bad range {spec}{hint}")
        self.spec = spec
        self.known = known or []
