"""KVMi page restrictions (PF) and BREAKPOINT events on real TCG guests (both Debian kernels), driving the
engines (vmsight.kvmi.pages, vmsight.kvmi.int3) directly through the dispatcher. Ground truth: the guest's own
/proc/PID/pagemap and the writer's printed addresses, HMP `info registers`, the guest's hostname and exit codes,
and the RAM file afterwards.

The writer (built here, no libc) increments the u64 at offset 0x918 of a 4 KiB-aligned page in a tight loop
(`spin: incq 0x918(%rdi); jmp spin`) and prints the page's and spin's addresses."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from vmsight.events import Action, Dispatcher, VcpuPause
from vmsight.events.types import Event
from vmsight.kvmi import Introspector
from vmsight.kvmi.int3 import BreakpointHit, Int3Engine
from vmsight.kvmi.pages import ACCESS_ALL, ACCESS_R, ACCESS_W, ACCESS_X, PageRestrictions, PfHit
from vmsight.linux.tasks import find_task
from vmsight.memory.paging import translate
from vmsight.qemu.agent import AgentResult
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM, parse_info_registers

pytestmark = pytest.mark.guest
PAGE = 4096
OFF = 0x918

WRITER_C = r"""
static volatile unsigned long page[1024] __attribute__((aligned(4096)));
extern void spin(volatile unsigned long *p);
__asm__(".globl spin\n.p2align 4\nspin: incq 0x918(%rdi)\n jmp spin\n");
static long sys_write(int fd, const char *b, unsigned long n) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "0"(1L), "D"((long)fd), "S"(b), "d"(n) : "rcx", "r11", "memory");
    return r;
}
static int hex(char *o, unsigned long v) {
    int n = 0; char t[16];
    do { t[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    for (int i = 0; i < n; i++) o[i] = t[n - 1 - i];
    return n;
}
void _start(void) {
    char b[64]; int n = 0;
    page[0x123] = 1;
    n += hex(b + n, (unsigned long)page); b[n++] = ' ';
    n += hex(b + n, (unsigned long)spin); b[n++] = '\n';
    sys_write(1, b, n);
    spin(page);
}
"""


@pytest.fixture(scope="module")
def writer_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    need(shutil.which("gcc") is not None, "gcc not installed (scripts/setup.sh)")
    d = tmp_path_factory.mktemp("writer")
    (d / "w.c").write_text(WRITER_C)
    subprocess.run(["gcc", "-static", "-nostdlib", "-Os", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none",
                    "-s", "-o", str(d / "w"), str(d / "w.c")], check=True, capture_output=True)
    return Path(d / "w").read_bytes()


class Writer:
    _n = 0

    def __init__(self, guest: VmInstance, binary: bytes) -> None:
        Writer._n += 1
        self.guest = guest
        self.name = name = f"/tmp/kw{Writer._n}"
        b64 = base64.b64encode(binary).decode()
        guest.agent.run(f"rm -f {name}.b64").check()
        for i in range(0, len(b64), 3000):
            guest.agent.run(f"echo -n '{b64[i:i + 3000]}' >> {name}.b64").check()
        guest.agent.run(f"base64 -d {name}.b64 > {name} && chmod +x {name}").check()
        guest.agent.run(f"({name} > {name}.out; echo $? > {name}.rc) >/dev/null 2>&1 &").check()
        for _ in range(100):
            out = guest.agent.run(f"cat {name}.out; pidof kw{Writer._n}").text.split()
            if len(out) == 3:
                break
            time.sleep(0.1)
        self.page_gva, self.spin_gva, self.pid = int(out[0], 16), int(out[1], 16), int(out[2])
        self.page_gpa = self.gpa_of(self.page_gva)

    def gpa_of(self, gva: int) -> int:
        r = self.guest.agent.run(f"dd if=/proc/{self.pid}/pagemap bs=8 skip={gva // PAGE} count=1 2>/dev/null"
                                 " | od -An -tx8").check()
        entry = int(r.text.strip(), 16)
        assert entry >> 63, f"gva {gva:#x} not present in the writer"
        return (entry & ((1 << 55) - 1)) * PAGE

    def rc(self) -> str:
        return self.guest.agent.run(f"cat {self.name}.rc 2>/dev/null").text.strip()

    def kill(self) -> None:
        self.guest.agent.run(f"kill {self.pid} 2>/dev/null; while [ -e /proc/{self.pid} ]; do usleep 20000; done; "
                             f"rm -f {self.name}*")


class Bg:
    """A guest command in a thread (the VM stops at every event until someone listens)."""

    def __init__(self, guest: VmInstance, cmd: str) -> None:
        self.result: AgentResult | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", guest.agent.run(cmd)), daemon=True)
        self.thread.start()

    def wait(self, d: Dispatcher, limit_s: float = 30.0) -> AgentResult:
        deadline = time.monotonic() + limit_s
        while self.thread.is_alive() and time.monotonic() < deadline:
            d.listen(0.1)
        self.thread.join(1)
        assert self.result is not None, "the guest command did not finish"
        return self.result


def listen_until(d: Dispatcher, done: Callable[[], bool], limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not done() and time.monotonic() < deadline:
        d.listen(0.1)
    assert done(), "timed out waiting for events"


class CodeWriter:
    """Writes guest code through the gdbstub (direct-map alias) inside a VcpuPause, so TCG drops the
    translations of that page (a write through the RAM file alone is not seen by already translated code)."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.todo: list[tuple[int, bytes]] = []
        d.on(VcpuPause, self._on_pause)

    def _on_pause(self, ev: Event) -> None:
        while self.todo:
            gpa, data = self.todo.pop()
            ev.write(self.d.kernel.page_offset_base + gpa, data)

    def write(self, gpa: int, data: bytes) -> None:
        self.todo.append((gpa, data))
        self.d.pause_vcpus()
        listen_until(self.d, lambda: not self.todo)


@pytest.fixture()
def writer(guest: VmInstance, writer_binary: bytes) -> Iterator[Writer]:
    w = Writer(guest, writer_binary)
    yield w
    w.kill()


@pytest.fixture()
def disp(vm: VM, guest: VmInstance) -> Iterator[Dispatcher]:
    d = Dispatcher(vm, handle_signals=False)
    try:
        yield d
    finally:
        d.close()
    assert guest.agent.run("echo alive").check().text == "alive\n"


def _no_points_left(d: Dispatcher) -> None:
    assert not d._bps and not d._watches  # noqa: SLF001 - the dispatcher's own record of what is inserted


def test_pf_write_on_a_user_page(writer: Writer, disp: Dispatcher, vm: VM, guest: VmInstance) -> None:
    k = disp.kernel
    mm_dtb = find_task(k, writer.pid).kernel_dtb
    hits: list[PfHit] = []
    give_back_after = 300

    def on_pf(hit: PfHit) -> Action:
        hits.append(hit)
        if len(hits) == give_back_after:
            assert pr.set_page_access([(writer.page_gpa, ACCESS_ALL)]) == 0
            return Action.RETRY
        return Action.CONTINUE

    pr = PageRestrictions(disp, k, on_pf)
    before = vm.read_gpa(writer.page_gpa, PAGE)
    assert pr.set_page_access([(writer.page_gpa, ACCESS_R | ACCESS_X)]) == 0
    assert pr.get_page_access([writer.page_gpa, writer.page_gpa + PAGE]) == [ACCESS_R | ACCESS_X, ACCESS_ALL]
    aliases = {(a.gva, a.dtb) for a in pr.last.aliases[writer.page_gpa]}
    # the writer's own mapping (its printed address, its mm) and the direct map
    assert (writer.page_gva, mm_dtb) in aliases and (k.page_offset_base + writer.page_gpa, None) in aliases
    assert pr.watched() == sorted((g & ~(PAGE - 1), "w") for g, _ in aliases)
    for gva, dtb in aliases:
        if dtb is None:
            assert _gva2gpa(vm, gva) == writer.page_gpa, hex(gva)
    t0 = time.monotonic()
    listen_until(disp, lambda: len(hits) >= give_back_after)
    rate = len(hits) / (time.monotonic() - t0)
    print(f"PF events/s on a page written in a loop ({k.release}): {rate:.0f}")
    bad = [(hex(h.gva), hex(h.gpa), h.access) for h in hits if (h.gva, h.gpa, h.access) != (
        writer.page_gva + OFF, writer.page_gpa + OFF, ACCESS_W)]
    assert not bad, (bad[:5], len(bad), hex(writer.page_gva), hex(writer.page_gpa))
    assert {h.vcpu for h in hits} <= {v.index for v in vm.vcpus()}
    # W given back and RETRY: no more events, the writer writes on (the counter keeps rising)
    assert pr.watched() == []
    for _ in range(5):
        disp.listen(0.1)
    assert len(hits) == give_back_after
    n1 = int.from_bytes(vm.read_gpa(writer.page_gpa + OFF, 8), "little")
    time.sleep(0.2)
    assert int.from_bytes(vm.read_gpa(writer.page_gpa + OFF, 8), "little") > n1 > int.from_bytes(
        before[OFF:OFF + 8], "little")
    # execute restrictions cannot be caught: the v6 error, nothing changed; rwx of a free page is fine
    assert pr.set_page_access([(writer.page_gpa, ACCESS_R | ACCESS_W)]) == 95
    assert pr.set_page_access([(writer.page_gpa + PAGE, ACCESS_ALL), (1 << 50, ACCESS_R)]) == 2   # ENOENT
    assert pr.get_page_access([writer.page_gpa]) == [ACCESS_ALL] and pr.watched() == []
    pr.close()
    _no_points_left(disp)


def test_pf_write_on_a_page_table_page(writer: Writer, disp: Dispatcher, vm: VM, guest: VmInstance) -> None:
    k = disp.kernel
    mm_dtb = find_task(k, writer.pid).kernel_dtb
    pte = translate(k.phys, mm_dtb, writer.page_gva, la57=k.la57).entries[-1]
    assert pte.level == 1
    pt_gpa = pte.entry_gpa & ~(PAGE - 1)
    present = {pt_gpa + i * 8 for i in range(512)
               if int.from_bytes(vm.read_gpa(pt_gpa + i * 8, 8), "little") & 1}
    hits: list[PfHit] = []

    def on_pf(hit: PfHit) -> Action:
        hits.append(hit)
        assert pr.set_page_access([(pt_gpa, ACCESS_ALL)]) == 0   # give W back, retry
        return Action.RETRY

    pr = PageRestrictions(disp, k, on_pf)
    assert pr.set_page_access([(pt_gpa, ACCESS_R | ACCESS_X)]) == 0
    aliases = pr.last.aliases[pt_gpa]
    assert (k.page_offset_base + pt_gpa, None) in {(a.gva, a.dtb) for a in aliases}
    for a in aliases:   # every kernel alias found really maps the page (QEMU's own walk)
        assert a.dtb is None and _gva2gpa(vm, a.gva) == pt_gpa, hex(a.gva)
    bg = Bg(guest, f"kill {writer.pid}; sleep 0.3; cat /proc/{writer.pid}/status 2>&1 | head -1")
    listen_until(disp, lambda: bool(hits))
    assert "No such file" in bg.wait(disp).text
    h = hits[0]
    # the exit path zaps the writer's PTEs through the direct map
    assert h.access == ACCESS_W and h.gva == k.page_offset_base + h.gpa and (h.gpa & ~7) in present, h
    assert len(hits) == 1 and pr.watched() == []
    pr.close()
    _no_points_left(disp)


def _gva2gpa(vm: VM, gva: int) -> int:
    out = vm.qmp.hmp(f"gva2gpa {gva:#x}")   # vCPU 0's CR3: the kernel half is the same in every mm
    return int(out.split("gpa:")[1].split()[0], 16)


def _hmp_regs(vm: VM, vcpu: int) -> dict[str, int]:
    return parse_info_registers(vm.qmp.hmp("info registers -a"), vcpu)


def test_breakpoint_retry_in_a_kernel_function(disp: Dispatcher, vm: VM, guest: VmInstance) -> None:
    k = disp.kernel
    fn = k.symbol("__x64_sys_sethostname")
    gpa = k.gva_to_gpa(fn)
    page_before = vm.read_gpa(gpa & ~(PAGE - 1), PAGE)
    orig = page_before[gpa % PAGE:gpa % PAGE + 1]
    old_name = guest.agent.run("hostname").check().text.strip()
    seen: list[tuple[BreakpointHit, dict[str, int]]] = []
    ret: list[int] = []

    def on_bp(hit: BreakpointHit) -> Action:
        if hit.gpa != gpa:
            return Action.CONTINUE           # another int3 of the guest (text_poke): its own
        seen.append((hit, _hmp_regs(vm, hit.vcpu)))
        ret.append(int.from_bytes(hit.event.read(hit.registers["rsp"], 8), "little"))
        hit.event.write(k.page_offset_base + gpa, orig)   # the introspector restores the byte, then RETRY
        return Action.RETRY

    eng = Int3Engine(disp, k, on_bp)
    eng.enable()
    assert eng.handler_gva is not None and k.symbolize(eng.handler_gva) == "asm_exc_int3"
    cw = CodeWriter(disp)
    cw.write(gpa, b"\xcc")
    assert vm.read_gpa(gpa, 1) == b"\xcc"
    res = Bg(guest, "hostname kvmi-h7 && hostname").wait(disp)
    assert res.check().text.strip() == "kvmi-h7", "RETRY ran the function"
    assert len(seen) == 1
    hit, hmp = seen[0]
    regs = hit.registers
    assert (regs["rip"], hit.insn_len, regs["cs"]) == (fn, 1, 0x10)
    # at the handler's first instruction HMP shows the delivery: rip = handler, rsp = the frame
    assert hmp["rip"] == eng.handler_gva and hmp["rsp"] + 40 == (regs["rsp"] & ~15) + 0
    for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        assert regs[r] == hmp[r], r
    assert not hmp["eflags"] & 0x200 and regs["eflags"] & 0x2
    assert k.text_gva <= ret[0] < k.text_gva + k.image_size, "[rsp] at the int3 is the syscall dispatcher's return"
    eng.disable()
    _no_points_left(disp)
    assert vm.read_gpa(gpa & ~(PAGE - 1), PAGE) == page_before
    Bg(guest, f"hostname {old_name}").wait(disp).check()


def test_breakpoint_continue_gives_the_guest_its_int3(writer: Writer, disp: Dispatcher, vm: VM,
                                                      guest: VmInstance) -> None:
    k = disp.kernel
    code_gpa = writer.gpa_of(writer.spin_gva) + writer.spin_gva % PAGE
    page_before = vm.read_gpa(code_gpa & ~(PAGE - 1), PAGE)
    seen: list[BreakpointHit] = []

    def on_bp(hit: BreakpointHit) -> Action:
        if hit.gpa == code_gpa:
            seen.append(hit)
        return Action.CONTINUE

    eng = Int3Engine(disp, k, on_bp)
    eng.enable()
    cw = CodeWriter(disp)
    cw.write(code_gpa, b"\xcc")
    listen_until(disp, lambda: bool(seen))
    hit = seen[0]
    assert (hit.registers["rip"], hit.registers["cs"] & 3, hit.registers["ss"] & 3) == (writer.spin_gva, 3, 3)
    assert hit.registers["rdi"] == writer.page_gva - 0 and hit.frame.cs == 0x33
    cw.write(code_gpa, page_before[code_gpa % PAGE:code_gpa % PAGE + 1])
    eng.disable()
    for _ in range(30):
        if writer.rc():
            break
        time.sleep(0.1)
    assert writer.rc() == str(128 + 5), "the guest got its #BP: SIGTRAP"
    _no_points_left(disp)
    assert vm.read_gpa(code_gpa & ~(PAGE - 1), PAGE) == page_before


def _serve_in_thread(guest: VmInstance, intro: Introspector, out: dict[str, object], purpose: str) -> threading.Thread:
    """The VM side of a KVMi session in a thread (its own VM object and dispatcher), serving ``intro`` until
    it hangs up; ``out`` gets the end reason and the points the dispatcher still held when it closed."""
    from vmsight.kvmi.server import Session, VmGuest, vm_hello
    from vmsight.vm import attach

    def side() -> None:
        try:
            with attach(guest.dir, purpose=purpose) as svm, Dispatcher(svm, handle_signals=False) as d:
                s = Session(str(intro.address), VmGuest(svm), vm_hello(svm), timeout=10.0, dispatcher=d)
                s.connect()
                out["reason"] = s.serve()
                out["points"] = (dict(d._bps), dict(d._watches))  # noqa: SLF001 - what close left behind
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["reason"] = f"exception {e!r}"

    thread = threading.Thread(target=side, daemon=True)
    thread.start()
    return thread


def test_session_pf_events_through_the_introspector(writer: Writer, vm: VM, guest: VmInstance) -> None:
    """The same user page through vmsight.kvmi.Introspector and the Session (SET_PAGE_ACCESS, PF events,
    W given back while the event is outstanding, RETRY with a zeroed pf reply), as hookguest does."""
    from vmsight.kvmi import CommandError, wire

    intro = Introspector()
    out: dict[str, object] = {}

    thread = _serve_in_thread(guest, intro, out, "kvmi pages test")
    try:
        intro.accept(20.0)
        pf = wire.V6.event("PF").id
        assert intro.check_event(pf) and intro.check_command(21) and intro.check_command(20)
        for v in range(intro.get_guest_info()):
            intro.call("CONTROL_EVENTS", vcpu=v, fields={"event_id": pf, "enable": 1})
        g = writer.page_gpa
        intro.call("SET_PAGE_ACCESS", fields={"view": 0, "count": 1}, items=[{"gpa": g, "access": 5}])
        assert intro.call("GET_PAGE_ACCESS", fields={"view": 0, "count": 2}, items=[g, g + PAGE]) == bytes([5, 7])
        with pytest.raises(CommandError) as ei:   # execute: the v6 error, not a pretence
            intro.call("SET_PAGE_ACCESS", fields={"view": 0, "count": 1}, items=[{"gpa": g, "access": 3}])
        assert ei.value.err == -wire.KVM_EOPNOTSUPP
        events = []
        t0 = time.monotonic()
        for _ in range(100):
            ev = intro.wait_event(20.0)
            assert ev.spec.name == "PF"
            events.append(ev)
            if len(events) < 100:
                intro.reply_event(ev, wire.ACTION_CONTINUE, {})
        rate = len(events) / (time.monotonic() - t0)
        print(f"KVMi PF events/s through the Introspector: {rate:.0f}")
        assert all((e.data["gva"], e.data["gpa"], e.data["access"]) == (writer.page_gva + OFF, g + OFF, 2)
                   for e in events)
        hmp = parse_info_registers(vm.qmp.hmp("info registers -a"), vm.vcpus()[events[-1].vcpu].index)
        assert events[-1].arch.sregs.cr3 == hmp["cr3"] and events[-1].arch.regs["rip"] == hmp["rip"]
        intro.call("SET_PAGE_ACCESS", fields={"view": 0, "count": 1}, items=[{"gpa": g, "access": 7}])
        intro.reply_event(events[-1], wire.ACTION_RETRY, {})
        n1 = int.from_bytes(intro.read_physical(g + OFF, 8), "little")
        time.sleep(0.2)
        assert int.from_bytes(intro.read_physical(g + OFF, 8), "little") > n1, "the writer runs on"
    finally:
        intro.close()
        thread.join(20.0)
    assert out.get("reason") == "the introspector hung up", out
    assert out.get("points") == ({}, {})
    assert guest.agent.run("echo alive").check().text == "alive\n"


def test_session_breakpoint_event_retry(vm: VM, guest: VmInstance) -> None:
    """BREAKPOINT through the Introspector: 0xCC written with WRITE_PHYSICAL at __x64_sys_ioprio_get (which
    `ionice -p 1` calls and nothing else here: its code is not translated yet, see the report on TCG and
    WRITE_PHYSICAL), the event's gpa/insn_len and arch block = the registers at the int3, the byte restored
    with WRITE_PHYSICAL while the event is outstanding, RETRY: the syscall runs and answers."""
    from vmsight.kvmi import wire
    from vmsight.linux.kernel import kernel_of

    k = kernel_of(vm)
    fn = k.symbol("__x64_sys_ioprio_get")
    gpa = k.gva_to_gpa(fn)
    page_before = vm.read_gpa(gpa & ~(PAGE - 1), PAGE)
    intro = Introspector()
    out: dict[str, object] = {}

    thread = _serve_in_thread(guest, intro, out, "kvmi int3 test")
    bg: threading.Thread | None = None
    res: list[AgentResult] = []
    try:
        intro.accept(20.0)
        bp = wire.V6.event("BREAKPOINT").id
        assert intro.check_event(bp)
        for v in range(intro.get_guest_info()):
            intro.call("CONTROL_EVENTS", vcpu=v, fields={"event_id": bp, "enable": 1})
        intro.write_physical(gpa, b"\xcc")
        bg = threading.Thread(target=lambda: res.append(guest.agent.run("ionice -p 1")), daemon=True)
        bg.start()
        while True:
            ev = intro.wait_event(30.0)
            assert ev.spec.name == "BREAKPOINT"
            if ev.data["gpa"] == gpa:
                break
            intro.reply_event(ev, wire.ACTION_CONTINUE)   # a guest int3 of its own (text_poke)
        assert ev.data["insn_len"] == 1
        hmp = parse_info_registers(vm.qmp.hmp("info registers -a"), vm.vcpus()[ev.vcpu].index)
        regs, cs = ev.arch.regs, ev.arch.sregs.segments["cs"]
        assert regs["rip"] == fn and cs["selector"] == 0x10 and ev.arch.sregs.cr3 == hmp["cr3"]
        assert k.symbolize(hmp["rip"]) == "asm_exc_int3" and hmp["rsp"] + 40 == regs["rsp"] & ~15
        assert all(regs[r] == hmp[r] for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r15"))
        intro.write_physical(gpa, page_before[gpa % PAGE:gpa % PAGE + 1])
        intro.reply_event(ev, wire.ACTION_RETRY)
        bg.join(30.0)
        assert res and res[0].check().text.strip(), "RETRY ran the syscall: ionice answered"
        assert intro.read_physical(gpa & ~(PAGE - 1), PAGE) == page_before
    finally:
        intro.close()
        thread.join(20.0)
        if bg is not None:
            bg.join(30.0)
    assert out.get("reason") == "the introspector hung up", out
    assert out.get("points") == ({}, {})
    assert vm.read_gpa(gpa & ~(PAGE - 1), PAGE) == page_before
    assert guest.agent.run("echo alive").check().text == "alive\n"
