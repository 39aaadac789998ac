"""Introspection events on real guests (both Debian kernels, 2 vCPUs), checked against the guest agent.

The guest command runs in a thread while the test listens: every system call of the guest stops the VM
while a syscall breakpoint is set, so the agent only gets its answer out while someone handles events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from vmsight.errors import VmsightError
from vmsight.events import (
    Action,
    ContextSwitch,
    Dispatcher,
    Event,
    Lifecycle,
    PageAccess,
    ProcessExec,
    ProcessExit,
    Reply,
    SingleStep,
    Syscall,
    VcpuPause,
    VmLifecycle,
)
from vmsight.events.linux import LinuxEvents
from vmsight.linux.tasks import Task
from vmsight.qemu.agent import AgentResult
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM

pytestmark = pytest.mark.guest


class Bg:
    """A guest command running in a thread."""

    def __init__(self, guest: VmInstance, cmd: str, timeout: float = 120) -> None:
        self.result: AgentResult | None = None
        self.error: BaseException | None = None

        def go() -> None:
            try:
                self.result = guest.agent.run(cmd, timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                self.error = e

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def done(self) -> AgentResult:
        self.thread.join(5)
        if self.error:
            raise self.error
        assert self.result is not None, "guest command did not finish"
        return self.result.check()


def collect(d: Dispatcher, bg: Bg, limit_s: float = 240, tail_s: float = 0.3) -> list[Event]:
    """Events until the guest command finished (plus a short tail)."""
    out: list[Event] = []
    deadline = time.monotonic() + limit_s
    while bg.thread.is_alive() and time.monotonic() < deadline:
        ev = d.listen(0.2)
        if ev is not None:
            out.append(ev)
    out += list(d.events(timeout=tail_s))
    return out


def _alive(guest: VmInstance, vm: VM) -> None:
    """The VM runs and no breakpoint is left: a command making hundreds of syscalls completes."""
    assert vm.status() == "running"
    assert guest.agent.run("ls /proc > /dev/null; cat /proc/version", timeout=30).check().text.startswith("Linux")
    assert vm.status() == "running"


def test_syscalls_of_cat(guest: VmInstance, vm: VM) -> None:
    with Dispatcher(vm) as d:
        LinuxEvents(d).syscalls(comm="cat")
        bg = Bg(guest, "sh -c 'echo $$; exec cat /proc/version'")
        events = collect(d, bg)
    res = bg.done()
    pid = int(res.text.split()[0])
    calls = [e for e in events if isinstance(e, Syscall)]
    assert calls and all(e.pid == pid and e.comm == "cat" for e in calls), [(e.pid, e.comm) for e in calls]
    names = [e.name for e in calls]
    opened = [i for i, e in enumerate(calls)
              if e.name in ("open", "openat") and "/proc/version" in e.strings.values()]
    assert opened, names
    i = opened[0]
    rest = names[i + 1:]
    # The file is copied to stdout (busybox cat: sendfile, or read+write), closed, and the process exits:
    # in this order and nothing else.
    assert rest[-2:] == ["close", "exit_group"], names
    copy = rest[:-2]
    assert copy and set(copy) <= {"sendfile64", "sendfile", "read", "write"}, names
    out = [e for e in calls[i + 1:] if e.name in ("sendfile64", "sendfile", "write")]
    assert out[0].args[0] == 1, out[0].args   # to stdout
    _alive(guest, vm)


def test_shell_write_loop_counts(guest: VmInstance, vm: VM) -> None:
    n = 25
    with Dispatcher(vm) as d:
        LinuxEvents(d).syscalls(names=["write"])
        loop = " ".join(str(i) for i in range(n))
        bg = Bg(guest, f"echo $$; for i in {loop}; do echo x; done > /dev/null")
        events = collect(d, bg)
    pid = int(bg.done().text.split()[0])
    mine = [e for e in events if isinstance(e, Syscall) and e.pid == pid and e.args[0] == 1 and e.args[2] == 2]
    assert len(mine) == n
    assert all(e.name == "write" and e.nr == 1 for e in mine)
    _alive(guest, vm)


def test_exec_events_match_commands(guest: VmInstance, vm: VM) -> None:
    with Dispatcher(vm) as d:
        LinuxEvents(d).execs()
        bg = Bg(guest, "/bin/cat /proc/version > /dev/null; /bin/uname -r > /dev/null; /bin/ls / > /dev/null")
        events = collect(d, bg)
    bg.done()
    execs = [e for e in events if isinstance(e, ProcessExec)]
    # busybox re-executes itself as /proc/self/exe with the applet in argv[0]
    applets = [e.argv[0].rsplit("/", 1)[-1] for e in execs if e.argv]
    seq = [a for a in applets if a in ("cat", "uname", "ls")]
    assert seq == ["cat", "uname", "ls"], [(e.filename, e.argv) for e in execs]
    byname = {e.argv[0].rsplit("/", 1)[-1]: e for e in execs if e.argv}
    assert byname["cat"].argv[1:] == ("/proc/version",)
    assert len({byname[a].pid for a in ("cat", "uname", "ls")}) == 3
    _alive(guest, vm)


def test_watch_kernel_variable_fires(guest: VmInstance, vm: VM) -> None:
    with Dispatcher(vm) as d:
        k = d.kernel
        gva = k.symbol("total_forks")
        before = k.read_u64(gva)
        seen: list[tuple[int, str]] = []

        def grab(ev: Any) -> None:
            seen.append((ev.read_u64(ev.gva), k.symbolize(ev.rip)))

        w = d.add_watchpoint(gva, 8, "w", grab)
        bg = Bg(guest, "/bin/true; /bin/true; echo done")
        events = collect(d, bg)
        bg.done()
        hits = [e for e in events if isinstance(e, PageAccess)]
        assert hits and w.hits == len(hits)
        assert all(e.gva == gva and e.access.value == "w" for e in hits)
        # The guest's own counter went up, and the writer is the fork path.
        assert seen[-1][0] >= before + 2 and seen[0][0] > before
        assert any(sym.startswith(("copy_process", "kernel_clone")) for _, sym in seen), seen
    _alive(guest, vm)


def test_gpa_watch_maps_to_kernel_aliases(guest: VmInstance, vm: VM) -> None:
    with Dispatcher(vm) as d:
        k = d.kernel
        gva = k.symbol("total_forks")
        gpa = k.gva_to_gpa(gva)
        handles = d.watch_gpa(gpa, 8, "w")
        assert {h.gva for h in handles} == {gva, k.page_offset_base + gpa}
        assert d.capabilities().user_aliases_covered is False
        bg = Bg(guest, "/bin/true; echo ok")
        events = collect(d, bg)
        bg.done()
        hits = [e for e in events if isinstance(e, PageAccess)]
        # Linux writes the variable through its image address: only that alias fires.
        assert hits and {e.gva for e in hits} == {gva}
    _alive(guest, vm)


def test_pause_and_single_step_know_their_vcpu(guest: VmInstance, vm: VM) -> None:
    # a busy vCPU 0 (a halted one has nothing to step); killed by pid (the agent itself runs under timeout)
    spin = int(guest.agent.run("taskset 1 sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $!",
                               timeout=30).check().text)
    try:
        with Dispatcher(vm) as d:
            d.pause_vcpus()
            pauses = [e for e in d.events(timeout=5, count=2)]
            assert sorted(e.vcpu for e in pauses if isinstance(e, VcpuPause)) == [0, 1]
            d.single_step(0)
            steps: list[SingleStep] = []
            for ev in d.events(timeout=10):
                if isinstance(ev, SingleStep):
                    steps.append(ev)
                if len(steps) == 20:
                    break
            d.single_step(0, False)
            assert len(steps) == 20 and {e.vcpu for e in steps} == {0}
            assert len({e.rip for e in steps}) > 1
    finally:
        guest.agent.run(f"kill {spin}; true", timeout=30)
    _alive(guest, vm)


def test_handler_reply_emulates_a_syscall(guest: VmInstance, vm: VM) -> None:
    """A reply with register changes: getuid/geteuid of `id` return 4242 without running (rip = return
    address, as if the function had returned); every other process keeps its real uid."""
    with Dispatcher(vm) as d:
        lx = LinuxEvents(d)

        def emulate(ev: Any) -> Reply | None:
            if lx.current(ev).comm != "id":
                return None
            regs = ev.registers()
            ret = ev.read_u64(regs["rsp"])
            return Reply(Action.CONTINUE, registers={"rax": 4242, "rip": ret, "rsp": regs["rsp"] + 8})

        d.add_breakpoint("__x64_sys_geteuid", emulate)
        d.add_breakpoint("__x64_sys_getuid", emulate)
        bg = Bg(guest, "id -u; id")
        collect(d, bg)
        assert bg.done().text.split("\n")[:2] == ["4242", "uid=4242 gid=0(root)"]
    assert guest.agent.run("id -u", timeout=30).check().text.strip() == "0"
    _alive(guest, vm)


def test_handler_exception_detaches_cleanly(guest: VmInstance, vm: VM) -> None:
    d = Dispatcher(vm)

    def boom(ev: Event) -> None:
        raise RuntimeError("handler failed")

    d.add_breakpoint("do_syscall_64", boom)
    bg = Bg(guest, "echo hi")
    with pytest.raises(RuntimeError, match="handler failed"):
        while bg.thread.is_alive():
            d.listen(0.5)
    assert d._closed and not d._bps
    assert bg.done().text.strip() == "hi"
    _alive(guest, vm)


def test_capabilities_under_tcg(vm: VM) -> None:
    need(vm.qmp.execute("query-kvm").get("enabled") is False, "guest runs under KVM")
    with Dispatcher(vm, supervise=False) as d:
        caps = d.capabilities()
    assert caps.accelerator == "tcg" and caps.watchpoints is None and caps.read_watch is True


def test_context_switches_to_a_process(guest: VmInstance, vm: VM) -> None:
    # Started before tracing (every switch of the guest stops the VM while the breakpoint is set): the
    # sleeper is switched in when its timer fires and out when it exits.
    pid = int(guest.agent.run("sleep 1 & echo $!", timeout=30).check().text)
    with Dispatcher(vm) as d:
        k = d.kernel
        LinuxEvents(d).context_switches(pid=pid)
        dtbs: dict[int, int] = {}

        def remember(ev: Any) -> None:
            if ev.next.pid == pid:
                dtbs[ev.seq] = Task(k, ev.next.task_gva).kernel_dtb

        d.on(ContextSwitch, remember)
        sw: list[ContextSwitch] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (any(e.next.pid == pid for e in sw)
                                                   and any(e.prev.pid == pid for e in sw)):
            ev = d.listen(0.5)
            if isinstance(ev, ContextSwitch):
                sw.append(ev)
    into = [e for e in sw if e.next.pid == pid]
    assert into and all(e.next.comm == "sleep" for e in into)
    assert any(e.prev.pid == pid and e.prev.comm == "sleep" for e in sw)
    # CR3 at __switch_to is already the next task's page table (switch_mm ran first)
    assert all(e.cr3 & ~0xFFF == dtbs[e.seq] for e in into), [(hex(e.cr3), hex(dtbs[e.seq])) for e in into]
    _alive(guest, vm)


def test_exit_events_carry_pid_and_code(guest: VmInstance, vm: VM) -> None:
    with Dispatcher(vm) as d:
        LinuxEvents(d).exits(comm="sh")
        bg = Bg(guest, "sh -c 'echo $$; exit 3'; true")
        events = collect(d, bg)
    pid = int(bg.done().text.split()[0])
    mine = [e for e in events if isinstance(e, ProcessExit) and e.pid == pid]
    assert len(mine) == 1 and mine[0].exit_code == 3 << 8 and mine[0].thread_group_leader


def test_external_stop_and_resume_are_lifecycle_events(vm: VM) -> None:
    with Dispatcher(vm, supervise=False) as d:
        assert d.listen(0.3) is None
        vm.qmp.execute("stop")  # someone else pauses the VM (QMP pushes a T02 to the gdb client)
        ev = d.listen(3)
        assert isinstance(ev, VmLifecycle) and ev.what is Lifecycle.STOP
        assert d.listen(0.3) is None and vm.status() == "paused"  # the dispatcher does not resume it
        vm.qmp.execute("cont")
        ev = d.listen(3)
        assert isinstance(ev, VmLifecycle) and ev.what is Lifecycle.RESUME
    assert vm.status() == "running"


def test_cli_trace_exec_json_and_watch(guest: VmInstance, vm: VM, tmp_path: Path) -> None:
    vm.close()  # the CLI attaches on its own (one QMP client at a time)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "--json"]
    tr = subprocess.Popen([*cli, "trace", "exec", "--comm", "uname", "--count", "1", "--duration", "120"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert tr.stderr is not None and b"tracing" in tr.stderr.readline()
    res = guest.agent.run("/bin/uname -r", timeout=120).check()
    out, err = tr.communicate(timeout=60)
    assert tr.returncode == 0, err
    rec = json.loads(out.splitlines()[0])
    assert rec["format_version"] == 1 and rec["event"] == "process_exec" and rec["argv"][0].endswith("uname")
    assert res.text.strip()
    w = subprocess.Popen([*cli, "watch", "total_forks", "8", "--count", "1", "--duration", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert w.stderr is not None and b"watching" in w.stderr.readline()
    guest.agent.run("/bin/true", timeout=120).check()
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    rec = json.loads(out.splitlines()[0])
    assert rec["event"] == "page_access" and rec["access"] == "w" and rec["length"] == 8
    assert rec["rip_symbol"].startswith(("copy_process", "kernel_clone")) and len(rec["value_hex"]) == 16


def test_handler_reply_changes_user_memory(guest: VmInstance, vm: VM) -> None:
    """A reply with a memory change in the vCPU's own address space: the buffer `echo` passes to write()
    is rewritten before the kernel copies it."""
    with Dispatcher(vm) as d:
        lx = LinuxEvents(d)

        def shout(ev: Any) -> Reply | None:
            if lx.current(ev).comm != "echo":
                return None
            pt_regs = ev.registers()["rdi"]
            buf, count = ev.read_u64(pt_regs + 104), ev.read_u64(pt_regs + 96)  # si, dx
            data = ev.read(buf, count)
            return Reply(memory={buf: data.upper()})

        d.add_breakpoint("__x64_sys_write", shout)
        bg = Bg(guest, "/bin/echo hello vmsight")
        collect(d, bg)
        assert bg.done().text == "HELLO VMSIGHT\n"
    assert guest.agent.run("/bin/echo hello", timeout=30).check().text == "hello\n"


@pytest.mark.parametrize("access", ["r", "rw"])
def test_read_and_access_watch_on_jiffies(guest: VmInstance, vm: VM, access: str) -> None:
    with Dispatcher(vm) as d:
        gva = d.kernel.symbol("jiffies_64")  # read by every timer tick and timeout computation
        w = d.add_watchpoint(gva, 8, access)
        hits = [e for e in d.events(timeout=10, count=3) if isinstance(e, PageAccess)]
        assert len(hits) == 3 and all(e.watch_id == w.id and e.access.value == access for e in hits)
    _alive(guest, vm)


def test_one_dispatcher_per_vm(vm: VM) -> None:
    with Dispatcher(vm, supervise=False) as d:
        with pytest.raises(VmsightError, match="already has an open event dispatcher"):
            Dispatcher(vm, supervise=False)
        d.add_breakpoint("do_exit")
    with Dispatcher(vm, supervise=False) as d2:  # the first one closed: a new one may run
        assert d2.listen(0.2) is None  # no breakpoints: nothing to report
        assert not d._bps and not d2._bps
    assert vm.status() == "running"


def test_paused_vm_stays_paused_under_trace_and_dispatcher(guest: VmInstance, vm: VM) -> None:
    """Item 7 of issue 10: `trace` resumed a VM that was paused before it. Now neither the CLI nor the
    library resumes it: not while listening, not on close, not on the VM's detach."""
    vm.close()  # the CLI attaches on its own (one QMP client at a time)
    from vmsight.qemu.qmp import Qmp
    from vmsight.vm import attach

    def status() -> str:
        with Qmp(guest.qmp) as q:
            return q.status()

    with Qmp(guest.qmp) as q:
        q.execute("stop")
    try:
        cli = [sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir]
        r = subprocess.run([*cli, "trace", "exec", "--duration", "1.5"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert "the VM is paused and stays so" in r.stderr
        assert status() == "paused"
        with attach(guest.dir) as v, Dispatcher(v) as d:
            d.add_breakpoint("do_exit")
            assert d.listen(0.5) is None and v.status() == "paused"
        assert status() == "paused"
    finally:
        with Qmp(guest.qmp) as q:
            q.execute("cont")
    with attach(guest.dir) as v:
        _alive(guest, v)


def test_resume_drops_the_vms_translation_caches(guest: VmInstance, vm: VM) -> None:
    """Issue 11: Dispatcher._resume dropped only its own address spaces; vm.address_space() ones stayed stale
    across resumes (the guest may have changed its page tables meanwhile)."""
    with vm.paused():
        regs = vm.registers(0)
    space = vm.address_space(regs["cr3"])
    with Dispatcher(vm) as d:
        bp = d.add_breakpoint("__x64_sys_getpid")
        bg = Bg(guest, "for i in 1 2 3; do sh -c 'echo $$' > /dev/null; done")
        ev = None
        deadline = time.monotonic() + 60
        while ev is None and time.monotonic() < deadline:
            ev = d.listen(0.5)
        assert ev is not None
        space.read(regs["rip"], 8)              # stopped at the hit: a translation is cached
        assert space.cached_pages > 0
        d.listen(0.2)                           # the dispatcher resumes the VM
        assert space.cached_pages == 0
        d.remove(bp)
        while bg.thread.is_alive():
            d.listen(0.2)
    bg.done()
