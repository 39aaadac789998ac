"""KVMi (issue 12, first part) on real TCG guests: the VM side's session (its own attached VM object, as
`vmsight kvmi` will run) connected to :class:`vmsight.kvmi.Introspector` on a unix socket in a private
directory. Ground truth comes from QEMU itself through the test's own monitor (HMP `xp`, `info registers`,
the RAM file) and from inside the guest (its hostname, which lives in kernel memory)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsight.kvmi import CommandError, Introspector, wire
from vmsight.kvmi.server import Session, VmGuest, vm_hello
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM, attach

pytestmark = pytest.mark.guest
PAGE = 4096


@dataclass
class Bridge:
    intro: Introspector
    session: Session
    thread: threading.Thread
    reason: list[str]

    def stop(self) -> str:
        self.intro.close()
        self.thread.join(10.0)
        assert not self.thread.is_alive(), "the session did not end when the introspector hung up"
        return self.reason[0]


@pytest.fixture()
def bridge(guest: VmInstance, vm: VM) -> Iterator[Bridge]:
    """A session on its own VM object (another QMP monitor than the test's ``vm``) serving an Introspector."""
    with attach(guest.dir, purpose="kvmi test") as side:
        intro = Introspector()
        session = Session(str(intro.address), VmGuest(side), vm_hello(side), timeout=10.0)
        connector = threading.Thread(target=session.connect)
        connector.start()
        try:
            intro.accept(10.0)
        finally:
            connector.join(10.0)
        reason: list[str] = []
        thread = threading.Thread(target=lambda: reason.append(session.serve()), daemon=True)
        thread.start()
        b = Bridge(intro, session, thread, reason)
        try:
            yield b
        finally:
            if thread.is_alive():
                b.stop()
            intro.close()
    assert vm.status() == "running"
    assert guest.agent.run("echo alive").check().text == "alive\n", "the guest must run after the session"


def test_handshake_names_the_vm(bridge: Bridge, vm: VM, guest: VmInstance) -> None:
    hello = bridge.intro.hello
    assert hello is not None and hello.struct_size == 96
    assert hello.name == vm.qmp.execute("query-name")["name"]
    assert uuid.UUID(bytes=hello.uuid) == uuid.UUID(vm.qmp.execute("query-uuid")["UUID"])
    # QEMU started before `vm launch` wrote vm.json, at most the boot timeout earlier
    written_ms = os.stat(os.path.join(guest.dir, "vm.json")).st_mtime * 1000
    assert written_ms - 200_000 < hello.start_time_ms <= written_ms + 1000
    assert bridge.intro.get_version() == 1
    assert bridge.intro.get_guest_info() == len(vm.vcpus()) == 2
    assert bridge.intro.get_max_gfn() == (vm.layout.end_gpa - 1) // PAGE
    tsc_hz = vm.qmp.execute("qom-get", path=vm._cpus[1]["qom-path"], property="tsc-frequency")  # noqa: SLF001
    if tsc_hz:
        assert bridge.intro.get_vcpu_info(1) == tsc_hz
    else:  # TCG without tsc-frequency=: QEMU does not know it, so neither does KVMi
        with pytest.raises(CommandError) as ei:
            bridge.intro.get_vcpu_info(1)
        assert ei.value.err == -wire.KVM_EOPNOTSUPP
    # CHECK_COMMAND / CHECK_EVENT tell the truth: no events yet, so no PAUSE_VCPU either
    assert bridge.intro.check_command(17) and bridge.intro.check_command(13)
    assert not bridge.intro.check_command(7) and not bridge.intro.check_command(21)
    assert not any(bridge.intro.check_event(e) for e in range(12))
    with pytest.raises(CommandError) as ei:
        bridge.intro.call("PAUSE_VCPU", vcpu=0, fields={"wait": 1})
    assert ei.value.err == -wire.KVM_EOPNOTSUPP


def _xp(vm: VM, gpa: int, quads: int) -> bytes:
    out = vm.qmp.hmp(f"xp /{quads}gx {gpa:#x}")
    words = [int(w, 16) for line in out.splitlines() for w in line.split(":", 1)[1].split()]
    return b"".join(w.to_bytes(8, "little") for w in words)


def test_read_physical_equals_qemu(bridge: Bridge, vm: VM) -> None:
    rng = random.Random(12)
    with vm.paused():
        rip_gpa = vm.translate(vm.registers(0)["rip"]).gpa
        gpas = [rip_gpa & ~(PAGE - 1), 0x1000000]
        for r in vm.layout:
            gpas += [r.gpa + rng.randrange(r.size // PAGE) * PAGE for _ in range(6)]
        for gpa in gpas:
            page = bridge.intro.read_physical(gpa, PAGE)
            assert page == vm.read_gpa(gpa, PAGE), hex(gpa)
            assert page[:256] == _xp(vm, gpa, 32), hex(gpa)
        assert any(bridge.intro.read_physical(rip_gpa & ~(PAGE - 1), PAGE)), "kernel text is not zeros"
        odd = rip_gpa & ~(PAGE - 1) | 0xFF8
        assert bridge.intro.read_physical(odd, 8) == _xp(vm, odd, 1)
    for gpa, size, err in ((vm.layout.end_gpa, 8, wire.KVM_ENOENT), (0xFEC00000, 8, wire.KVM_ENOENT),
                           (0x1000FF8, 16, wire.KVM_EINVAL), (0x1000000, PAGE + 1, wire.KVM_EINVAL)):
        if err == wire.KVM_ENOENT and vm.layout.find(gpa) is not None:
            continue
        with pytest.raises(CommandError) as ei:
            bridge.intro.read_physical(gpa, size)
        assert ei.value.err == -err, hex(gpa)
    assert vm.status() == "running"


def _find_uts(vm: VM, nodename: bytes) -> int:
    """The gpa of init_uts_ns.name (struct new_utsname: sysname[65] "Linux", then nodename[65])."""
    needle = b"Linux".ljust(65, b"\0") + nodename + b"\0"
    hits = []
    for r in vm.layout:
        for off in range(0, r.size, 16 << 20):
            n = min(16 << 20, r.size - off)
            chunk = vm.read_gpa(r.gpa + off, n + min(len(needle), r.size - off - n))
            i = chunk.find(needle)
            while i >= 0:
                hits.append(r.gpa + off + i)
                i = chunk.find(needle, i + 1)
    assert len(hits) == 1, f"init_uts_ns found {len(hits)} times"
    return hits[0]


def test_write_physical_seen_by_the_guest(bridge: Bridge, vm: VM, guest: VmInstance) -> None:
    """WRITE_PHYSICAL changes the guest kernel's hostname (init_uts_ns, read by /proc/sys/kernel/hostname),
    exactly the bytes asked for, and the original is restored."""
    name = f"kvmi{random.Random().randrange(10**8):08d}".encode()
    guest.agent.run(f"hostname {name.decode()}").check()
    nodename_gpa = _find_uts(vm, name) + 65
    page = nodename_gpa & ~(PAGE - 1)
    other = name.replace(b"kvmi", b"KVMI")
    o = nodename_gpa - page
    try:
        with vm.paused():  # the rest of the page is the kernel's: compare it while nothing runs
            before = vm.read_gpa(page, PAGE)
            bridge.intro.write_physical(nodename_gpa, other)
            after = vm.read_gpa(page, PAGE)
            assert after[:o] == before[:o] and after[o + len(other):] == before[o + len(other):]
            assert after[o:o + len(other)] == other
            assert _xp(vm, nodename_gpa & ~7, 2)[nodename_gpa & 7:][:4] == b"KVMI"
            # straddling a page: refused, nothing written
            edge = vm.read_gpa(page + PAGE - 2, 4) if vm.layout.find(page + PAGE) else None
            with pytest.raises(CommandError) as ei:
                bridge.intro.write_physical(page + PAGE - 2, b"xyz")
            assert ei.value.err == -wire.KVM_EINVAL
            assert edge is None or vm.read_gpa(page + PAGE - 2, 4) == edge
        assert guest.agent.run("cat /proc/sys/kernel/hostname").check().text.strip() == other.decode()
    finally:
        bridge.intro.write_physical(nodename_gpa, name)
    assert vm.read_gpa(nodename_gpa, len(name) + 1) == name + b"\0"
    assert guest.agent.run("cat /proc/sys/kernel/hostname").check().text.strip() == name.decode()


COMPARED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
            "r14", "r15", "rip")


def test_get_registers_equal_hmp(bridge: Bridge, vm: VM) -> None:
    # on a running VM: a consistent snapshot, and the VM runs again afterwards (first: the QMP stop it makes
    # would otherwise land on the gdbstub connection this test opens below)
    r = bridge.intro.get_registers(1)
    assert r.sregs.cr3 and r.mode == 8
    assert vm.status() == "running"
    with vm.paused():
        for cpu in vm.vcpus():
            r = bridge.intro.get_registers(cpu.index, [0xC0000080, 0xC0000101])
            hmp = vm.hmp_registers(cpu.index)
            assert r.mode == 8
            for n in COMPARED:
                assert r.regs[n] == hmp[n], (cpu.index, n)
            assert r.regs["rflags"] == hmp["eflags"]
            for n in ("cr0", "cr2", "cr3", "cr4", "efer"):
                assert getattr(r.sregs, n) == hmp[n], (cpu.index, n)
            for seg in ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt"):
                assert r.sregs.segments[seg]["selector"] == hmp[seg], seg
            assert r.sregs.segments["gs"]["base"] == hmp["gs_base"] == r.msrs[0xC0000101]
            assert r.sregs.segments["tr"]["base"] == hmp["tr_base"]
            assert (r.sregs.gdt["base"], r.sregs.gdt["limit"]) == (hmp["gdtr_base"], hmp["gdtr_limit"])
            assert (r.sregs.idt["base"], r.sregs.idt["limit"]) == (hmp["idtr_base"], hmp["idtr_limit"])
            cs = r.sregs.segments["cs"]
            assert (cs["l"], cs["present"], cs["s"], cs["dpl"], cs["unusable"]) == (1, 1, 1, 0, 0)
            assert r.msrs[0xC0000080] == hmp["efer"]
            assert r.sregs.cr8 == vm.registers(cpu.index)["cr8"]  # TPR[7:4] from `info lapic` = the gdbstub's
        assert vm.status() == "paused", "GET_REGISTERS must leave a paused VM paused"
    with pytest.raises(CommandError) as ei:
        bridge.intro.get_registers(0, [0x10])  # the TSC MSR: not readable through HMP
    assert ei.value.err == -wire.KVM_EINVAL
    with pytest.raises(CommandError) as ei:
        bridge.intro.get_registers(2, [])
    assert ei.value.err == -wire.KVM_EINVAL


def test_bad_message_ends_session_not_vm(bridge: Bridge, vm: VM, guest: VmInstance) -> None:
    bridge.intro.send_raw(wire.MSG_HDR.pack(id=17, size=15, seq=1) + bytes(15))
    bridge.thread.join(10.0)
    assert not bridge.thread.is_alive() and bridge.reason[0].startswith("protocol error")
    assert vm.status() == "running"
    assert guest.agent.run("echo still").check().text == "still\n"


def test_session_ends_when_introspector_hangs_up(bridge: Bridge, vm: VM) -> None:
    with vm.paused():
        bridge.intro.get_registers(0)
        assert bridge.stop() == "the introspector hung up"
        assert vm.status() == "paused", "the run state is left as found"
    t0 = time.monotonic()
    assert vm.status() == "running" and time.monotonic() - t0 < 5


def _cli(guest: VmInstance, *argv: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def test_cli_serves_until_hangup(vm: VM, guest: VmInstance, tmp_path: Path) -> None:
    """`vmsight --vm DIR kvmi ADDRESS` in its own process, with --secret: served, then a hang-up ends it (exit
    0) and the guest runs; a wrong secret is refused with one line and a non-zero exit."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"kvmi-test-secret\n")
    secret.chmod(0o600)
    with Introspector(secret=b"kvmi-test-secret\n") as intro:
        proc = _cli(guest, "kvmi", str(intro.address), "--secret", str(secret))
        try:
            intro.accept(60.0)
            assert intro.get_guest_info() == 2
            with vm.paused():
                assert intro.read_physical(0x1000000, PAGE) == vm.read_gpa(0x1000000, PAGE)
            intro.close()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"the introspector hung up" in out and b"commands served" in out
    assert vm.status() == "running"
    with Introspector(secret=b"wrong") as intro:
        proc = _cli(guest, "kvmi", str(intro.address), "--secret", str(secret))
        try:
            intro.accept(60.0)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode != 0 and b"wrong cookie hash" in err and len(err.decode().strip().splitlines()) == 1
    assert vm.status() == "running"


def test_cli_ends_on_sigterm(vm: VM, guest: VmInstance) -> None:
    with Introspector() as intro:
        proc = _cli(guest, "kvmi", str(intro.address))
        try:
            intro.accept(60.0)
            assert intro.get_version() == 1
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 128 + signal.SIGTERM
        assert intro.sock is not None and intro.sock.recv(1) == b"", "the VM side closed the session"
    assert vm.status() == "running"
    assert guest.agent.run("echo alive").check().text == "alive\n"
