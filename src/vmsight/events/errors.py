"""Event errors. Each carries the data a caller needs (address, capability, limit)."""

from __future__ import annotations

from vmsight.errors import VmsightError


class EventError(VmsightError):
    """Base for introspection-event errors."""


class DispatcherClosed(EventError):
    """The dispatcher was closed (explicitly, by a signal, a handler exception or QEMU exiting)."""

    def __init__(self, reason: str = "closed") -> None:
        super().__init__(f"the event dispatcher is {reason}: create a new one to listen again")
        self.reason = reason


class EventExpired(EventError):
    """An event's live accessors (registers, memory) were used after its vCPU was resumed."""

    def __init__(self, seq: int) -> None:
        super().__init__(f"event #{seq} is no longer live: its vCPU was resumed; read registers and memory "
                         "inside the handler, or use the event's snapshot fields")
        self.seq = seq


class CapabilityError(EventError):
    """The accelerator cannot provide the requested breakpoint or watchpoint (KVM: 4 debug registers,
    lengths 1/2/4/8 aligned, no read-only watch). Raised instead of failing silently."""

    def __init__(self, what: str, capability: str, limit: object) -> None:
        super().__init__(f"cannot {what}: {capability} is limited to {limit} on this accelerator "
                         "(see Dispatcher.capabilities())")
        self.what = what
        self.capability = capability
        self.limit = limit


class WatchAliasError(EventError):
    """A guest-physical watch range has no kernel alias vmsight can watch."""

    def __init__(self, gpa: int, size: int, reason: str) -> None:
        super().__init__(f"cannot watch gpa {gpa:#x}+{size:#x}: {reason}")
        self.gpa = gpa
        self.size = size
