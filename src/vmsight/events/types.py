"""Event types, actions and replies (the KVMi event model: a vCPU that raises an event waits for the
handler's reply; the reply is an action plus optional register and memory changes).

Every event has a snapshot (``vcpu``, ``seq``, ``time_ns`` and its own fields) that stays valid forever,
and live accessors (:meth:`Event.registers`, :meth:`Event.read`, :meth:`Event.set_register`,
:meth:`Event.write`) that work only while its vCPU waits, i.e. inside a handler; afterwards they raise
:class:`~vmsight.events.errors.EventExpired`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from vmsight.events.errors import EventExpired

FORMAT_VERSION = 1


class Action(enum.Enum):
    """What the waiting vCPU does next.

    CONTINUE: resume; a breakpoint the vCPU sits on is stepped over transparently (unless the handler
    moved ``rip``). RETRY: re-enter the guest at the current ``rip`` without stepping over, so the
    instruction runs again (and a breakpoint still there is hit again: remove it or change ``rip`` first).
    For page-access events the access already happened (traps come after it): RETRY acts as CONTINUE."""

    CONTINUE = "continue"
    RETRY = "retry"


@dataclass
class Reply:
    """A handler's reply: an action plus register (gdbstub names) and memory changes. Memory is written
    through the vCPU's own address space (``gva -> bytes``), applied before registers."""

    action: Action = Action.CONTINUE
    registers: dict[str, int] = field(default_factory=dict)
    memory: dict[int, bytes] = field(default_factory=dict)


class Access(enum.Enum):
    """Watched access kind; the value is the CLI spelling."""

    READ = "r"
    WRITE = "w"
    ACCESS = "rw"

    @classmethod
    def parse(cls, text: str | Access) -> Access:
        if isinstance(text, Access):
            return text
        try:
            return {"r": cls.READ, "read": cls.READ, "w": cls.WRITE, "write": cls.WRITE, "rw": cls.ACCESS,
                    "wr": cls.ACCESS, "a": cls.ACCESS, "access": cls.ACCESS}[text.lower()]
        except KeyError:
            raise ValueError(f"bad access kind {text!r}: use r, w or rw") from None


class Lifecycle(enum.Enum):
    """VM lifecycle event kinds (QMP events; STOP/RESUME only when someone other than the dispatcher
    stopped or resumed the VM)."""

    STOP = "STOP"
    RESUME = "RESUME"
    SHUTDOWN = "SHUTDOWN"
    RESET = "RESET"
    PANIC = "GUEST_PANICKED"
    POWERDOWN = "POWERDOWN"


class LiveVcpu(Protocol):
    """What the dispatcher offers a waiting vCPU's event (implemented by the dispatcher)."""

    valid: bool

    def registers(self) -> dict[str, int]: ...
    def set_register(self, name: str, value: int) -> None: ...
    def read(self, gva: int, size: int) -> bytes: ...
    def write(self, gva: int, data: bytes) -> None: ...


@dataclass(kw_only=True, eq=False)
class Event:
    """Base of all events. ``vcpu`` is the QEMU cpu-index that raised it (-1: VM-wide)."""

    kind: ClassVar[str] = "event"
    vcpu: int
    seq: int = 0
    time_ns: int = 0
    _live: LiveVcpu | None = field(default=None, repr=False)

    # --- live accessors (only while the vCPU waits) ---

    def _ctx(self) -> LiveVcpu:
        if self._live is None or not self._live.valid:
            raise EventExpired(self.seq)
        return self._live

    @property
    def live(self) -> bool:
        return self._live is not None and self._live.valid

    def registers(self) -> dict[str, int]:
        """All registers of the vCPU (gdbstub names: rax.., rip, eflags, cs.., fs_base, gs_base, cr3...)."""
        return dict(self._ctx().registers())

    def register(self, name: str) -> int:
        return self._ctx().registers()[name]

    def set_register(self, name: str, value: int) -> None:
        self._ctx().set_register(name, value)

    def read(self, gva: int, size: int) -> bytes:
        """Guest-virtual memory in this vCPU's address space (its CR3)."""
        return self._ctx().read(gva, size)

    def read_u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def write(self, gva: int, data: bytes) -> None:
        """Write guest-virtual memory through the gdbstub (so QEMU drops translated code it covers)."""
        self._ctx().write(gva, data)

    # --- snapshot ---

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly record: ``format_version``, ``event`` (kind) and the snapshot fields."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "event": self.kind}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, TaskInfo):
        return {"pid": v.pid, "tid": v.tid, "comm": v.comm, "task_gva": v.task_gva}
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class TaskInfo:
    """A guest task as seen at the event: ``pid`` is the thread-group id (what ps shows), ``tid`` the
    thread id (task_struct.pid)."""

    pid: int
    tid: int
    comm: str
    task_gva: int


@dataclass(kw_only=True, eq=False)
class Breakpoint(Event):
    """Execution reached ``gva`` (before the instruction there runs)."""

    kind: ClassVar[str] = "breakpoint"
    gva: int
    symbol: str | None = None


@dataclass(kw_only=True, eq=False)
class SingleStep(Event):
    """The vCPU executed one instruction (single-step mode) and now sits at ``rip``."""

    kind: ClassVar[str] = "singlestep"
    rip: int


@dataclass(kw_only=True, eq=False)
class PageAccess(Event):
    """A watched range was accessed. ``gva``/``length`` are the watch (the stub reports the watch's start,
    not the byte); the trap comes after the access, so ``rip`` is the next instruction."""

    kind: ClassVar[str] = "page_access"
    gva: int
    length: int
    access: Access
    rip: int = 0
    watch_id: int = 0


@dataclass(kw_only=True, eq=False)
class VcpuPause(Event):
    """The vCPU was paused at the introspector's request (:meth:`Dispatcher.pause_vcpus`)."""

    kind: ClassVar[str] = "vcpu_pause"


@dataclass(kw_only=True, eq=False)
class VmLifecycle(Event):
    """A VM lifecycle event (QMP): STOP/RESUME by someone else, SHUTDOWN, RESET, guest panic."""

    kind: ClassVar[str] = "lifecycle"
    what: Lifecycle
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, eq=False)
class Syscall(Event):
    """System call entry (``do_syscall_64``), arguments decoded from the guest's ``struct pt_regs``;
    ``name`` comes from the guest's own ``sys_call_table`` symbols (None when unknown)."""

    kind: ClassVar[str] = "syscall"
    nr: int
    name: str | None
    args: tuple[int, ...]
    pid: int
    tid: int
    comm: str
    strings: dict[int, str] = field(default_factory=dict)   # arg index -> decoded user string (paths)


@dataclass(kw_only=True, eq=False)
class ContextSwitch(Event):
    """``__switch_to(prev, next)``: ``cr3`` is already the next task's (switch_mm runs before)."""

    kind: ClassVar[str] = "context_switch"
    prev: TaskInfo
    next: TaskInfo
    cr3: int


@dataclass(kw_only=True, eq=False)
class ProcessExec(Event):
    """A successful exec past the point of no return (``setup_new_exec``): ``filename`` as passed to
    execve (busybox re-executes itself as ``/proc/self/exe``: ``argv[0]`` names the applet), ``argv``
    (first 64 arguments), ``old_comm`` the name before the exec."""

    kind: ClassVar[str] = "process_exec"
    pid: int
    tid: int
    filename: str
    argv: tuple[str, ...] = ()
    old_comm: str = ""


@dataclass(kw_only=True, eq=False)
class ProcessExit(Event):
    """A task exits (``do_exit``). ``exit_code`` is the kernel's code (status << 8 | signal)."""

    kind: ClassVar[str] = "process_exit"
    pid: int
    tid: int
    comm: str
    exit_code: int

    @property
    def thread_group_leader(self) -> bool:
        return self.pid == self.tid


__all__ = [
    "FORMAT_VERSION", "Access", "Action", "Breakpoint", "ContextSwitch", "Event", "Lifecycle", "LiveVcpu",
    "PageAccess", "ProcessExec", "ProcessExit", "Reply", "SingleStep", "Syscall", "TaskInfo", "VcpuPause",
    "VmLifecycle",
]
