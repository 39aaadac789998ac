"""Event types, filters, formatting and capability checks (no VM needed)."""

from __future__ import annotations

import json

import pytest

from vmsight.events import (
    Access,
    Action,
    Breakpoint,
    CapabilityError,
    ContextSwitch,
    EventExpired,
    ProcessExec,
    Reply,
    Syscall,
    TaskInfo,
)
from vmsight.events.dispatcher import (
    Capabilities,
    Dispatcher,
    WatchHandle,
    _norm_thread,
    accelerator_capabilities,
)
from vmsight.events.linux import PATH_ARGS, Filter, format_syscall


class _Live:
    def __init__(self) -> None:
        self.valid = True
        self.regs = {"rip": 0x1000, "cr3": 0x2000}

    def registers(self) -> dict[str, int]:
        return self.regs

    def set_register(self, name: str, value: int) -> None:
        self.regs[name] = value

    def read(self, gva: int, size: int) -> bytes:
        return bytes(range(size))

    def write(self, gva: int, data: bytes) -> None:
        raise AssertionError("not used")


def test_access_parse() -> None:
    assert Access.parse("r") is Access.READ and Access.parse("write") is Access.WRITE
    assert Access.parse("rw") is Access.ACCESS and Access.parse(Access.READ) is Access.READ
    with pytest.raises(ValueError, match="r, w or rw"):
        Access.parse("x")


def test_reply_defaults_are_independent() -> None:
    a, b = Reply(), Reply(Action.RETRY)
    a.registers["rax"] = 1
    assert b.registers == {} and b.action is Action.RETRY and a.action is Action.CONTINUE


def test_live_accessors_expire_after_resume() -> None:
    live = _Live()
    ev = Breakpoint(vcpu=1, seq=7, gva=0x1000, _live=live)
    assert ev.live and ev.register("rip") == 0x1000 and ev.read(0, 3) == b"\0\1\2"
    assert ev.read_u64(0) == int.from_bytes(bytes(range(8)), "little")
    ev.set_register("rax", 5)
    assert live.regs["rax"] == 5
    regs = ev.registers()
    regs["rip"] = 0  # a copy: the live registers are not changed behind the dispatcher's back
    assert ev.register("rip") == 0x1000
    live.valid = False
    assert not ev.live
    with pytest.raises(EventExpired) as ei:
        ev.registers()
    assert ei.value.seq == 7
    with pytest.raises(EventExpired):
        Breakpoint(vcpu=0, gva=1).read(0, 1)


def test_as_dict_is_versioned_json() -> None:
    ev = Syscall(vcpu=1, seq=3, time_ns=5, nr=257, name="openat", args=(0xFFFFFF9C, 0x1000, 0, 0, 0, 0),
                 pid=10, tid=11, comm="cat", strings={1: "/proc/version"})
    d = ev.as_dict()
    assert d["format_version"] == 1 and d["event"] == "syscall" and "_live" not in d
    assert d["args"] == [0xFFFFFF9C, 0x1000, 0, 0, 0, 0] and d["strings"] == {"1": "/proc/version"}
    json.dumps(d)
    sw = ContextSwitch(vcpu=0, prev=TaskInfo(1, 1, "init", 0xA), next=TaskInfo(2, 3, "sh", 0xB), cr3=0x1000)
    sd = sw.as_dict()
    assert sd["prev"] == {"pid": 1, "tid": 1, "comm": "init", "task_gva": 0xA} and sd["next"]["tid"] == 3
    ex = ProcessExec(vcpu=0, pid=5, tid=5, filename="/proc/self/exe", argv=("cat", "/x"), old_comm="sh")
    assert ex.as_dict()["argv"] == ["cat", "/x"]


def test_format_syscall_shows_decoded_paths() -> None:
    ev = Syscall(vcpu=0, nr=257, name="openat", args=(0xFFFFFF9C, 0x7FF0, 0, 0, 0, 0), pid=42, tid=42,
                 comm="cat", strings={1: "/proc/version"})
    assert format_syscall(ev) == '42 cat openat(0xffffff9c, "/proc/version", 0x0, 0x0, 0x0, 0x0)'
    ev2 = Syscall(vcpu=0, nr=999, name=None, args=(1,), pid=1, tid=1, comm="x")
    assert format_syscall(ev2) == "1 x syscall_999(0x1)"
    assert PATH_ARGS["openat"] == (1,) and PATH_ARGS["execve"] == (0,)


def test_filter_by_pid_tid_and_comm() -> None:
    t = TaskInfo(pid=100, tid=101, comm="cat", task_gva=0)
    assert Filter().match(t)
    assert Filter(pid=100).match(t) and Filter(pid=101).match(t) and not Filter(pid=7).match(t)
    assert Filter(comm="cat").match(t) and not Filter(comm="ca").match(t)
    assert not Filter(pid=100, comm="sh").match(t)
    assert Filter(comm="sh").match(t, TaskInfo(1, 1, "sh", 0))  # either side of a context switch


def test_thread_ids_are_normalised() -> None:
    assert _norm_thread("p01.02") == "p1.2" and _norm_thread("p1.a") == "p1.a" and _norm_thread("1") == "1"


def _bare_dispatcher(caps: Capabilities) -> Dispatcher:
    d = Dispatcher.__new__(Dispatcher)  # capability checks only: no VM behind it
    d._caps = caps
    d._watches = {}
    return d


KVM_CAPS = accelerator_capabilities(kvm=True)


def test_kvm_watch_limits_are_reported_not_silent() -> None:
    d = _bare_dispatcher(KVM_CAPS)
    d._check_watch_caps(0x1000, 8, Access.WRITE)
    with pytest.raises(CapabilityError, match="watch length"):
        d._check_watch_caps(0x1000, 16, Access.WRITE)
    with pytest.raises(CapabilityError, match="alignment"):
        d._check_watch_caps(0x1004, 8, Access.WRITE)
    with pytest.raises(CapabilityError, match="read-only") as ei:
        d._check_watch_caps(0x1000, 4, Access.READ)
    assert ei.value.capability == "read-only watching"
    d._watches = {i: [WatchHandle(i, i, 8, Access.WRITE, None)] for i in range(4)}
    with pytest.raises(CapabilityError, match="number of watchpoints") as ei:
        d._check_watch_caps(0x2000, 8, Access.WRITE)
    assert ei.value.limit == 4


def test_tcg_watch_has_no_such_limits() -> None:
    d = _bare_dispatcher(accelerator_capabilities(kvm=False))
    d._watches = {i: [WatchHandle(i, i, 8, Access.WRITE, None)] for i in range(100)}
    d._check_watch_caps(0x1003, 2 << 20, Access.READ)
    with pytest.raises(Exception, match=">= 1"):
        d._check_watch_caps(0x1000, 0, Access.WRITE)
