"""Introspection events (KVMi-style): breakpoints, single steps, page accesses, vCPU pauses and VM
lifecycle events from :class:`Dispatcher`; OS-level events (system calls, context switches, exec, exit)
from :mod:`vmsight.events.linux`, built on breakpoints plus the guest's kallsyms and BTF."""

from vmsight.events.dispatcher import BreakpointHandle, Dispatcher, Stats, WatchHandle
from vmsight.events.errors import CapabilityError, DispatcherClosed, EventError, EventExpired, WatchAliasError
from vmsight.events.types import (
    Access,
    Action,
    Breakpoint,
    ContextSwitch,
    Event,
    Lifecycle,
    PageAccess,
    ProcessExec,
    ProcessExit,
    Reply,
    SingleStep,
    Syscall,
    TaskInfo,
    VcpuPause,
    VmLifecycle,
)

__all__ = [
    "Access", "Action", "Breakpoint", "BreakpointHandle", "CapabilityError", "ContextSwitch", "Dispatcher",
    "DispatcherClosed", "Event", "EventError", "EventExpired", "Lifecycle", "PageAccess", "ProcessExec",
    "ProcessExit", "Reply", "SingleStep", "Stats", "Syscall", "TaskInfo", "VcpuPause", "VmLifecycle",
    "WatchAliasError", "WatchHandle",
]
