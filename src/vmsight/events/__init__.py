"""Introspection events (KVMi-style): breakpoints, single steps, page accesses, vCPU pauses and VM
lifecycle events from :class:`Dispatcher`; OS-level events (system calls, context switches, exec, exit)
from :mod:`vmsight.events.linux`, built on breakpoints plus the guest's kallsyms and BTF.

Names are loaded on first use (PEP 562): importing :mod:`vmsight.events.watchdog`, which every command
that may pause a VM needs, does not load the dispatcher."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmsight.events.dispatcher import (
        BreakpointHandle,
        Capabilities,
        Dispatcher,
        RunState,
        Stats,
        WatchHandle,
    )
    from vmsight.events.errors import (
        CapabilityError,
        DispatcherClosed,
        EventError,
        EventExpired,
        WatchAliasError,
    )
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

_WHERE = {
    **dict.fromkeys(("BreakpointHandle", "Capabilities", "Dispatcher", "RunState", "Stats", "WatchHandle"),
                    "dispatcher"),
    **dict.fromkeys(("CapabilityError", "DispatcherClosed", "EventError", "EventExpired", "WatchAliasError"),
                    "errors"),
    **dict.fromkeys(("Access", "Action", "Breakpoint", "ContextSwitch", "Event", "Lifecycle", "PageAccess",
                     "ProcessExec", "ProcessExit", "Reply", "SingleStep", "Syscall", "TaskInfo", "VcpuPause",
                     "VmLifecycle"), "types"),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vmsight.events' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vmsight.events.{module}"), name)
    globals()[name] = value
    return value


__all__ = [  # the same names as _WHERE (tests/unit/test_cli_options.py)
    "Access", "Action", "Breakpoint", "BreakpointHandle", "Capabilities", "CapabilityError", "ContextSwitch",
    "Dispatcher", "DispatcherClosed", "Event", "EventError", "EventExpired", "Lifecycle", "PageAccess",
    "ProcessExec", "ProcessExit", "Reply", "RunState", "SingleStep", "Stats", "Syscall", "TaskInfo", "VcpuPause",
    "VmLifecycle",
    "WatchAliasError", "WatchHandle",
]
