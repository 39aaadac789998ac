"""KVMi events (issue 12, events core) on a real 2-vCPU TCG guest: a Session with the event dispatcher on its
own VM object serves :class:`vmsight.kvmi.Introspector`. hookguest's exact sequence first, then CR3 write
events, SET_REGISTERS, RETRY/CONTINUE, CRASH. Ground truth: QEMU's HMP on the test's own monitor (taken while
an event holds the VM stopped), guest RAM, and the guest agent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmsight.events.dispatcher import Dispatcher
from vmsight.kvmi import CommandError, Introspector, wire
from vmsight.kvmi.server import Session, VmGuest, vm_hello
from vmsight.linux.kernel import Kernel, kernel_of
from vmsight.linux.tasks import for_each_task
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM, attach, parse_info_registers

pytestmark = pytest.mark.guest
STAR = 0xC000_0081
CR, MSR, PF = 1, 2, 6


@dataclass
class Bridge:
    intro: Introspector
    thread: threading.Thread
    out: dict[str, object]

    def end(self) -> str:
        self.intro.close()
        self.thread.join(20.0)
        assert not self.thread.is_alive(), "the session did not end when the introspector hung up"
        return str(self.out["reason"])


@pytest.fixture()
def bridge(guest: VmInstance, vm: VM) -> Iterator[Bridge]:
    intro = Introspector()
    out: dict[str, object] = {}

    def side() -> None:
        try:
            with attach(guest.dir, purpose="kvmi events test") as svm, Dispatcher(svm, handle_signals=False) as d:
                s = Session(str(intro.address), VmGuest(svm), vm_hello(svm), timeout=10.0, dispatcher=d)
                out["session"] = s
                s.connect()
                out["reason"] = s.serve()
                out["bps"] = dict(d._bps)  # noqa: SLF001 - what close left behind
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["reason"] = f"exception {e!r}"

    thread = threading.Thread(target=side, daemon=True)
    thread.start()
    intro.accept(20.0)
    b = Bridge(intro, thread, out)
    try:
        yield b
    finally:
        if thread.is_alive():
            b.end()
        intro.close()
    assert out.get("bps") == {}, "every breakpoint is removed when the session ends"
    # a breakpoint left on a CR3 write site would stop the VM at the first context switch, with nobody
    # to resume it: the processes below would hang and the status be "debug"
    guest.agent.run("for i in $(seq 20); do /bin/true; done").check()
    assert vm.status() == "running"
    assert guest.agent.run("echo alive").check().text == "alive\n", "the guest runs after the session"


def _hmp_regs(vm: VM, index: int) -> dict[str, int]:
    return parse_info_registers(vm.qmp.hmp("info registers -a"), index)


def _hookguest_start(b: Bridge, vm: VM) -> list[wire.Event]:
    """hookguest's exact opening; returns the two PAUSE_VCPU events (answered CONTINUE)."""
    intro = b.intro
    assert intro.get_version() == 1
    n = intro.get_guest_info()
    assert n == 2
    frames = [intro.frame("CONTROL_CMD_RESPONSE", fields={"enable": 0, "now": 1})]
    frames += [intro.frame("PAUSE_VCPU", vcpu=i, fields={"wait": 1}) for i in range(n)]
    frames.append(intro.frame("CONTROL_CMD_RESPONSE", fields={"enable": 1, "now": 1}))
    intro.send_raw(b"".join(m for _, m in frames))
    assert intro.wait_reply(frames[-1][0], 10.0) == b""  # only the last is answered (an error raises)
    intro.get_max_gfn()  # hookguest exits if this fails; the first PAUSE event may arrive meanwhile
    seen = []
    for _ in range(n):
        ev = intro.wait_event(20.0)
        assert ev.spec.name == "PAUSE_VCPU"
        assert vm.status() != "running", "the VM stays stopped while an event is unanswered"
        index = vm.vcpus()[ev.vcpu].index
        hmp = _hmp_regs(vm, index)
        assert ev.arch.sregs.cr3 == hmp["cr3"] != 0 and ev.arch.regs["rip"] == hmp["rip"]
        assert ev.arch.mode == 8 and ev.arch.msrs["efer"] == hmp["efer"]
        # while it is unanswered: CONTROL_EVENTS CR/MSR(/PF), CONTROL_CR 3 (vCPU 0) and 4, CONTROL_MSR STAR
        intro.call("CONTROL_EVENTS", vcpu=ev.vcpu, fields={"event_id": CR, "enable": 1})
        intro.call("CONTROL_EVENTS", vcpu=ev.vcpu, fields={"event_id": MSR, "enable": 1})
        if intro.check_event(PF):
            intro.call("CONTROL_EVENTS", vcpu=ev.vcpu, fields={"event_id": PF, "enable": 1})
        else:
            with pytest.raises(CommandError):
                intro.call("CONTROL_EVENTS", vcpu=ev.vcpu, fields={"event_id": PF, "enable": 1})
        if ev.vcpu == 0:
            intro.call("CONTROL_CR", vcpu=ev.vcpu, fields={"enable": 1, "cr": 3})
        intro.call("CONTROL_CR", vcpu=ev.vcpu, fields={"enable": 1, "cr": 4})
        intro.call("CONTROL_MSR", vcpu=ev.vcpu, fields={"enable": 1, "msr": STAR})
        seen.append(ev)
        intro.reply_event(ev)
    assert sorted(e.vcpu for e in seen) == [0, 1]
    assert len({e.seq for e in seen}) == 2
    return seen


CR3_ROOT = 0x000F_FFFF_FFFF_F000   # the root's address bits (no PCID, no no-flush bit 63)


def _page_table_roots(k: Kernel) -> set[int]:
    """gpas of every live task's mm->pgd (and its PTI user copy) plus init_mm's (kernel threads)."""
    k.invalidate()
    roots = {k.gva_to_gpa(k.symbols.address("init_top_pgt"))}
    for t in for_each_task(k):
        if t.mm:
            roots |= {t.kernel_dtb, t.dtb}
    return roots


@pytest.fixture()
def kernel(vm: VM) -> Kernel:
    return kernel_of(vm)  # found before the session takes the gdbstub


def test_hookguest_sequence_then_cr3_events(kernel: Kernel, bridge: Bridge, vm: VM, guest: VmInstance) -> None:
    intro = bridge.intro
    pauses = _hookguest_start(bridge, vm)
    assert intro.check_event(wire.V6.event("CR").id) and intro.check_event(10)
    assert not intro.check_event(wire.V6.event("CREATE_VCPU").id)
    # the guest agent runs while CR3 write events flow (context switches on vCPU 0)
    agent: list[str] = []
    t = threading.Thread(target=lambda: agent.append(guest.agent.run("echo during").check().text))
    t.start()
    crs: list[wire.Event] = []
    while t.is_alive() or len(crs) < 5:
        ev = intro.wait_event(20.0)
        assert ev.spec.name == "CR", ev.spec.name
        if ev.data["cr"] == 3:
            assert ev.vcpu == 0, "CR3 is controlled on vCPU 0 only"
            hmp = _hmp_regs(vm, vm.vcpus()[0].index)
            assert ev.data["old_value"] == hmp["cr3"] == ev.arch.sregs.cr3
            if len(crs) < 8:  # the new value is a real task's page-table root (the VM is stopped now)
                assert ev.data["new_value"] & CR3_ROOT in _page_table_roots(kernel), hex(ev.data["new_value"])
            crs.append(ev)
        intro.reply_event(ev, data={"new_val": ev.data["new_value"]})
        if len(crs) > 200:
            break
    t.join(30.0)
    assert agent == ["during\n"]
    assert pauses[0].arch.sregs.cr3 & CR3_ROOT in _page_table_roots(kernel)
    assert any(ev.data["new_value"] & ~0xFFF != ev.data["old_value"] & ~0xFFF for ev in crs)
    assert bridge.end() == "the introspector hung up"


def test_retry_set_registers_and_crash(bridge: Bridge, vm: VM, guest: VmInstance) -> None:
    intro = bridge.intro
    _hookguest_start(bridge, vm)
    busy = threading.Thread(target=lambda: guest.agent.run("for i in $(seq 20); do /bin/true; done"), daemon=True)
    busy.start()  # an idle guest writes no CR3 (lazy TLB): processes make it switch
    ev = intro.wait_event(20.0)
    while not (ev.spec.name == "CR" and ev.data["cr"] == 3):
        intro.reply_event(ev, data={"new_val": ev.data["new_value"]})
        ev = intro.wait_event(20.0)
    # RETRY: the write is not done; the vCPU runs the same mov again and the same event comes back
    intro.reply_event(ev, wire.ACTION_RETRY, data={"new_val": ev.data["new_value"]})
    again = intro.wait_event(20.0)
    assert (again.spec.name, again.vcpu, again.data, again.arch.regs["rip"]) == (
        "CR", ev.vcpu, ev.data, ev.arch.regs["rip"])
    assert again.seq != ev.seq
    # SET_REGISTERS is applied when the event is answered: a PAUSE_VCPU asked meanwhile follows in the
    # same stop and shows it; its own SET_REGISTERS puts the value back
    rbx = again.arch.regs["rbx"]
    regs = dict(again.arch.regs, rbx=rbx ^ 0x5A5A)
    intro.call("SET_REGISTERS", vcpu=again.vcpu, fields=regs)
    intro.call("PAUSE_VCPU", vcpu=again.vcpu, fields={"wait": 0})
    assert _hmp_regs(vm, vm.vcpus()[again.vcpu].index)["rbx"] == rbx, "not applied before the reply"
    intro.reply_event(again, data={"new_val": again.data["new_value"]})
    pause = intro.wait_event(20.0)
    assert pause.spec.name == "PAUSE_VCPU" and pause.vcpu == again.vcpu
    assert pause.arch.regs["rbx"] == rbx ^ 0x5A5A == _hmp_regs(vm, vm.vcpus()[pause.vcpu].index)["rbx"]
    assert pause.arch.regs["rip"] == again.arch.regs["rip"], "the same stop: the vCPU did not run"
    intro.call("SET_REGISTERS", vcpu=pause.vcpu, fields=dict(pause.arch.regs, rbx=rbx))
    with pytest.raises(CommandError):  # only a vCPU with an outstanding event takes SET_REGISTERS
        intro.call("SET_REGISTERS", vcpu=1 - pause.vcpu, fields=dict(pause.arch.regs))
    intro.reply_event(pause)
    # CRASH: the session refuses and detaches; the guest runs on as before
    ev = intro.wait_event(20.0)
    intro.reply_event(ev, wire.ACTION_CRASH, data={"new_val": ev.data.get("new_value", 0)})
    bridge.thread.join(20.0)
    busy.join(30.0)
    assert "CRASH" in str(bridge.out["reason"])
    assert guest.agent.run("echo after").check().text == "after\n"


def test_cli_sigterm_sends_unhook(vm: VM, guest: VmInstance) -> None:
    """`vmsight kvmi` with events: SIGTERM while the introspector enabled UNHOOK sends it, commands are still
    served while the introspector cleans up, its hang-up ends the process (128 + SIGTERM), the guest runs."""
    import os
    import signal
    import subprocess
    import sys

    with Introspector() as intro:
        proc = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "kvmi",
                                 str(intro.address)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            intro.accept(60.0)
            intro.call("CONTROL_VM_EVENTS", fields={"event_id": 0, "enable": 1})
            assert intro.check_event(0) and intro.check_event(10)
            proc.send_signal(signal.SIGTERM)
            ev = intro.wait_event(30.0)
            assert (ev.spec.name, ev.vcpu) == ("UNHOOK", 0)
            assert intro.read_physical(0x1000000, 64) == vm.read_gpa(0x1000000, 64)  # still served
            intro.close()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"UNHOOK sent" in out and b"1 events sent" in out
    assert vm.status() == "running"
    assert guest.agent.run("echo alive").check().text == "alive\n"


def test_cli_sigkill_with_armed_sites_leaves_guest_running(vm: VM, guest: VmInstance) -> None:
    """SIGKILL of `vmsight kvmi` while its CR3/CR4/MSR sites are armed and an event is unanswered: the
    watchdog removes every breakpoint and resumes the VM; processes (which write CR3) run afterwards."""
    import os
    import signal
    import subprocess
    import sys

    with Introspector() as intro:
        proc = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "kvmi",
                                 str(intro.address)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            intro.accept(60.0)
            intro.call("PAUSE_VCPU", vcpu=0, fields={"wait": 1})
            ev = intro.wait_event(30.0)
            assert ev.spec.name == "PAUSE_VCPU"
            for vcpu in (0, 1):
                intro.call("CONTROL_EVENTS", vcpu=vcpu, fields={"event_id": CR, "enable": 1})
                intro.call("CONTROL_CR", vcpu=vcpu, fields={"enable": 1, "cr": 3})
                intro.call("CONTROL_MSR", vcpu=vcpu, fields={"enable": 1, "msr": STAR})
            intro.reply_event(ev)
            busy = threading.Thread(target=lambda: guest.agent.run("/bin/true"), daemon=True)
            busy.start()
            ev = intro.wait_event(30.0)   # a CR3 write, unanswered: the VM is stopped at a breakpoint
            assert ev.spec.name == "CR" and vm.status() != "running"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            busy.join(60.0)
            assert not busy.is_alive()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    guest.agent.run("for i in $(seq 20); do /bin/true; done").check()
    assert vm.status() == "running"
