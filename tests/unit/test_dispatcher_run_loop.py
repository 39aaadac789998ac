"""The dispatcher's run loop against a scripted fake gdbstub over a real socketpair (no QEMU).

The peer plays QEMU's side as FIELD-NOTES describe it (acks required, a stop reply per stop, every byte
sent to a running stub stops it, ^C ignored by a stopped one) with its own framing code, and asserts the
exact sequence of what the dispatcher sends: each packet, each ``+``/``-`` ack, each ``^C``. The real-QEMU
counterparts are tests/guest/test_events.py, test_events_stress.py and test_signals.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from vmsight.errors import GdbStubError
from vmsight.events.dispatcher import Dispatcher, RunState
from vmsight.events.errors import DispatcherClosed, EventExpired
from vmsight.events.types import Action, Breakpoint, Lifecycle, Reply, VcpuPause, VmLifecycle
from vmsight.qemu.rsp import MAX_PACKET, GdbStub, RspConnection, RspProtocolError
from vmsight.vm import Vcpu

BP = 0xFFFFFFFF81000100     # a kernel-half breakpoint
BP2 = 0xFFFFFFFF81000200
CODE = "55488945"           # push %rbp; mov ... : not a nop, so breakpoints are single-stepped off
REGS = ([f"r{n}" for n in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")] + [f"r{n}" for n in range(8, 16)]
        + ["rip"])
REGNUM = {name: i for i, name in enumerate(REGS)}
TARGET_XML = ('<?xml version="1.0"?><target><architecture>i386:x86-64</architecture>'
              '<feature name="org.gnu.gdb.i386.core">'
              + "".join(f'<reg name="{r}" bitsize="64"/>' for r in REGS)
              + '<reg name="eflags" bitsize="32"/><reg name="cr3" bitsize="64"/></feature></target>')
SUPPORTED = "qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386"


def _frame(body: str, *, bad: bool = False) -> bytes:
    raw = body.encode("latin-1")
    return b"$" + raw + b"#" + f"{(sum(raw) + bad) & 0xFF:02x}".encode()


def le(value: int, size: int = 8) -> str:
    return value.to_bytes(size, "little").hex()


def g_reply(regs: dict[str, int]) -> str:
    return "".join(le(regs.get(r, 0)) for r in REGS) + le(regs.get("eflags", 0x2), 4) + le(regs.get("cr3", 0))


class Peer(threading.Thread):
    """QEMU's end of the socketpair, running ``script(peer)``. ``sent`` is every token the dispatcher sent
    ("+", "-", "^C" or a packet's payload); a broken expectation is re-raised by :meth:`finish`."""

    def __init__(self, sock: socket.socket, script: Callable[[Peer], None], *, late_acks: bool = False,
                 dribble: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.script = script
        self.late_acks = late_acks    # our '+' for a request comes after its reply
        self.dribble = dribble        # every byte in its own send
        self.sent: list[str] = []
        self.log: list[str] = []      # shared with the fake VM: tokens and vm.invalidate() calls, in order
        self.running = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.buf = b""
        self.dispatcher: Dispatcher | None = None

    def run(self) -> None:
        try:
            self.script(self)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread by finish()
            self.error = e
            self.sock.close()       # the dispatcher sees a hang-up and stops waiting
        finally:
            self.done.set()

    def finish(self, timeout: float = 10.0) -> None:
        assert self.done.wait(timeout), f"the script did not finish; the dispatcher sent {self.sent}"
        if self.error is not None:
            raise self.error

    # --- what the dispatcher sends ---

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"the dispatcher hung up; it sent {self.sent}")
        self.buf += chunk

    def token(self, timeout: float = 5.0) -> str:
        while not self.buf:
            self._read(timeout)
        b = self.buf[:1]
        if b in (b"+", b"-", b"\x03"):
            self.buf = self.buf[1:]
            tok = "^C" if b == b"\x03" else b.decode()
        else:
            assert b == b"$", f"the dispatcher sent garbage {self.buf[:20]!r} after {self.sent}"
            while b"#" not in self.buf or len(self.buf) < self.buf.index(b"#") + 3:
                self._read(timeout)
            end = self.buf.index(b"#")
            body, cs = self.buf[1:end], self.buf[end + 1:end + 3]
            self.buf = self.buf[end + 3:]
            assert int(cs, 16) == sum(body) & 0xFF, f"bad checksum from the dispatcher: {body!r}"
            tok = body.decode("latin-1")
        if self.running and tok != "^C":
            raise AssertionError(f"the dispatcher sent {tok!r} to a running stub (QEMU would stop the VM and "
                                 f"drop it); before it: {self.sent}")
        self.sent.append(tok)
        self.log.append(tok)
        return tok

    def expect(self, *tokens: str) -> None:
        for want in tokens:
            got = self.token()
            assert got == want, f"the dispatcher sent {got!r} where {want!r} was due; all: {self.sent}"

    def await_state(self, state: RunState, timeout: float = 5.0) -> None:
        """Wait until the dispatcher has acted on what was sent (QMP answers must not change before)."""
        deadline = time.monotonic() + timeout
        while self.dispatcher is None or self.dispatcher.state is not state:
            assert time.monotonic() < deadline, f"the dispatcher never reached {state}"
            time.sleep(0.005)

    # --- what QEMU sends ---

    def push(self, data: bytes) -> None:
        if self.dribble:
            for i in range(len(data)):
                self.sock.sendall(data[i:i + 1])
        else:
            self.sock.sendall(data)

    def reply(self, body: str, *, bad: bool = False) -> None:
        """Send a packet and check the dispatcher's ack (a refusal for a bad checksum)."""
        self.push(_frame(body, bad=bad))
        self.expect("-" if bad else "+")

    def ask(self, request: str, reply: str) -> None:
        """The dispatcher must send ``request`` now; QEMU acks it and answers ``reply``."""
        self.expect(request)
        if self.late_acks:
            self.push(_frame(reply) + b"+")
            self.expect("+")
        else:
            self.push(b"+")
            self.reply(reply)

    def resumed(self, packet: str = "vCont;c") -> None:
        self.expect(packet)
        self.push(b"+")
        self.running = True

    def stop(self, body: str, **kw: Any) -> None:
        """The VM stops: its stop reply."""
        assert self.running, "a stop reply from a stopped VM"
        self.running = False
        self.reply(body, **kw)

    def interrupted(self, body: str = "T02thread:p01.01;") -> None:
        """The dispatcher's ^C must come now; the VM stops with ``body`` (a trap may beat the ^C)."""
        self.expect("^C")
        self.stop(body)

    def handshake(self, *, multiprocess: bool = True) -> None:
        """What GdbStub() does on connect (QEMU stops the VM and pushes a T02; the attach resumes it)."""
        self.push(_frame("T02thread:p01.01;" if multiprocess else "S02"))
        self.expect("+")
        self.ask(SUPPORTED, "PacketSize=1000;qXfer:features:read+" + (";multiprocess+" if multiprocess else ""))
        self.ask("qXfer:features:read:target.xml:0,ffb", "l" + TARGET_XML)
        self.running = True

    def insert(self, gva: int, code: str = CODE, *, running: bool = True) -> None:
        """An add_breakpoint(gva): stop the VM (if running), read the code there, Z0, resume."""
        if running:
            self.interrupted()
        self.ask(f"m{gva:x},4", code)
        self.ask(f"Z0,{gva:x},1", "OK")
        if running:
            self.resumed()

    def hit(self, thread: str, gva: int) -> None:
        """A breakpoint hit on ``thread`` (QEMU makes it the selected thread): the dispatcher reads rip."""
        self.stop(f"T05thread:{thread};swbreak:;")
        self.ask("p10", le(gva))

    def step_off(self, thread: str, gva: int, after: int) -> None:
        """The resume passes the breakpoint: one single step of that vCPU, then its rip is checked."""
        self.expect(f"vCont;s:{thread}")
        self.push(b"+")
        self.reply(f"T05thread:{thread};")
        self.ask("p10", le(after))
        assert after != gva


class FakeQmp:
    remote = False

    def __init__(self) -> None:
        self.state = "running"
        self.events: list[dict[str, Any]] = []

    def execute(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        assert command == "query-kvm", command
        return {"enabled": False, "present": False}

    def status(self) -> str:
        return self.state

    def pull_event(self, timeout: float = 0.0) -> dict[str, Any] | None:
        return self.events.pop(0) if self.events else None


class FakeVM:
    """What the dispatcher asks of a VM: its stub, QMP, vCPUs and translation caches."""

    def __init__(self, stub: GdbStub, log: list[str], ncpus: int) -> None:
        self.gdb = stub
        self.qmp = FakeQmp()
        self.log = log
        self.la57 = False
        self.ncpus = ncpus
        self.invalidations = 0

    def take_run_control(self, purpose: str) -> None:
        pass

    def vcpus(self) -> list[Vcpu]:
        return [Vcpu(i, 1000 + i, f"p1.{i + 1:x}") for i in range(self.ncpus)]

    def status(self) -> str:
        return self.qmp.status()

    def invalidate(self) -> None:
        self.invalidations += 1
        self.log.append("invalidate")


def attach(script: Callable[[Peer], None], *, ncpus: int = 2, multiprocess: bool = True,
           **peer_kw: Any) -> tuple[Dispatcher, FakeVM, Peer]:
    ours, theirs = socket.socketpair()
    peer = Peer(theirs, lambda p: (p.handshake(multiprocess=multiprocess), script(p)), **peer_kw)
    peer.start()
    stub = GdbStub("fake", sock=ours)
    vm = FakeVM(stub, peer.log, ncpus)
    d = Dispatcher(vm, supervise=False, handle_signals=False)  # type: ignore[arg-type]
    peer.dispatcher = d
    return d, vm, peer


def closing(peer: Peer, *points: int, stopped: bool = False, resume: str = "vCont;c") -> None:
    """close(): stop the VM, remove every breakpoint, resume (unless someone else had paused it)."""
    if not stopped:
        peer.interrupted()
    for gva in points:
        peer.ask(f"z0,{gva:x},1", "OK")
    if not stopped:
        peer.resumed(resume)


def test_stop_replies_name_the_vcpu_and_each_hit_is_stepped_off() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.02", BP)                  # vCPU 1 (thread ids as QEMU writes them: zero-padded hex)
        p.ask("g", g_reply({"rip": BP, "rax": 7}))     # the handler's registers(): no Hg, QEMU selected p1.2
        p.step_off("p1.2", BP, BP + 1)
        p.resumed()
        p.hit("p01.01", BP)                  # then vCPU 0: the selection follows the stop reply
        p.step_off("p1.1", BP, BP + 1)
        p.resumed()
        closing(p, BP)

    d, vm, peer = attach(script)
    seen: list[tuple[int, int]] = []
    d.add_breakpoint(BP, lambda ev: seen.append((ev.vcpu, ev.register("rax"))) if ev.vcpu == 1 else None)
    assert d.state is RunState.RUNNING
    first, second = d.listen(5), d.listen(5)
    assert isinstance(first, Breakpoint) and isinstance(second, Breakpoint)
    assert (first.vcpu, second.vcpu) == (1, 0) and first.gva == BP and seen == [(1, 7)]
    assert d.stats.breakpoint_hits == 2 and d.stats.steps == 2 and d.stats.stops == 3  # 3: the insert's ^C
    d.close()
    peer.finish()
    assert d.state is RunState.CLOSED


def test_a_stop_without_a_thread_is_vcpu_0_and_its_registers_are_selected_first() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.01", BP)
        p.step_off("p1.1", BP, BP + 1)
        p.resumed()
        p.stop("S05")                        # no thread: QEMU's selection moved to a vCPU we cannot name
        p.ask("p10", le(BP))
        p.ask("Hgp1.1", "OK")                # so the handler's registers() selects vCPU 0 first
        p.ask("g", g_reply({"rip": BP, "rbx": 5}))
        p.step_off("p1.1", BP, BP + 1)
        p.resumed()
        closing(p, BP)

    d, vm, peer = attach(script)
    d.add_breakpoint(BP, lambda ev: None if ev.seq == 1 else ev.registers() and None)
    assert d.listen(5).vcpu == 0  # type: ignore[union-attr]
    ev = d.listen(5)
    assert isinstance(ev, Breakpoint) and ev.vcpu == 0
    d.close()
    peer.finish()


def test_late_acks_and_dribbled_bytes_change_nothing_the_dispatcher_sends() -> None:
    """QEMU's '+' for a request arriving after its reply (and every byte in its own segment) is skipped;
    above all the dispatcher never acks late itself: a '+' after vCont;c would stop the VM."""
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.02", BP)
        p.step_off("p1.2", BP, BP + 1)
        p.resumed()
        closing(p, BP)

    d, vm, peer = attach(script, late_acks=True, dribble=True)
    d.add_breakpoint(BP)
    ev = d.listen(5)
    assert isinstance(ev, Breakpoint) and ev.vcpu == 1
    d.close()
    peer.finish()


def test_interrupt_racing_a_trap_the_trap_wins_and_the_pause_is_neither_lost_nor_counted_twice() -> None:
    """pause_vcpus() sends ^C while vCPU 1 hits a breakpoint: the trap's stop is the only stop (QEMU drops
    a ^C that reaches a stopped VM). It is reported as the breakpoint, the pause is honoured at that same
    stop, and the interrupt is over: a later T02 is someone else's stop, not the interrupt's."""
    def script(p: Peer) -> None:
        p.insert(BP)
        assert p.dispatcher is not None
        p.dispatcher.pause_vcpus()           # from another thread, while listen() waits
        p.interrupted("T05thread:p01.02;swbreak:;")   # the trap beat the ^C
        p.ask("p10", le(BP))
        p.step_off("p1.2", BP, BP + 1)
        p.resumed()
        vm_qmp.state = "paused"              # someone else's QMP stop: QEMU pushes a T02
        p.stop("T02thread:p01.01;")
        closing(p, BP, stopped=True)         # paused by them: not resumed by the close

    d, vm, peer = attach(script)
    vm_qmp = vm.qmp
    d.add_breakpoint(BP)
    events = [d.listen(5) for _ in range(4)]
    assert [type(e) for e in events] == [Breakpoint, VcpuPause, VcpuPause, VmLifecycle]
    assert [e.vcpu for e in events[:3]] == [1, 0, 1]  # type: ignore[union-attr]
    assert isinstance(events[3], VmLifecycle) and events[3].what is Lifecycle.STOP
    assert d.stats.stops == 3 and d.state is RunState.EXTERNAL
    d.close()
    peer.finish()


def test_a_registration_whose_interrupt_loses_to_a_trap_handles_the_trap_first() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.interrupted("T05thread:p01.01;swbreak:;")   # add_breakpoint(BP2)'s ^C, beaten by a hit on BP
        p.ask("p10", le(BP))
        p.insert(BP2, running=False)                    # then the registration, on the same stop
        p.step_off("p1.1", BP, BP + 1)
        p.resumed()
        closing(p, BP, BP2)

    d, vm, peer = attach(script)
    hits: list[int] = []
    d.add_breakpoint(BP, lambda ev: hits.append(ev.vcpu))
    d.add_breakpoint(BP2)
    assert hits == [0]                                  # the handler ran during the registration
    ev = d.listen(5)                                    # and its event is queued, not lost
    assert isinstance(ev, Breakpoint) and ev.gva == BP
    assert d.stats.stops == 2
    d.close()
    peer.finish()


def test_a_reply_that_changes_registers_is_written_before_the_continue() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.02", BP)
        p.ask(f"P{REGNUM['rax']:x}={le(0x1234)}", "OK")
        p.ask(f"P{REGNUM['rip']:x}={le(BP + 0x10)}", "OK")
        p.resumed()                                     # rip moved: nothing to step over
        p.hit("p01.01", BP)
        p.ask(f"P{REGNUM['rdi']:x}={le(0xFFFFFFFFFFFFFFFF)}", "OK")
        p.resumed()                                     # RETRY: re-enter at the breakpoint, no step
        closing(p, BP)

    d, vm, peer = attach(script)
    replies = iter([Reply(registers={"rax": 0x1234, "rip": BP + 0x10}),
                    Reply(Action.RETRY, registers={"rdi": -1})])
    d.add_breakpoint(BP, lambda ev: next(replies))
    d.listen(5)
    d.listen(5)
    assert d.stats.steps == 0
    d.close()
    peer.finish()


def test_resume_expires_live_views_and_drops_the_vms_translation_caches_first() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.01", BP)
        p.step_off("p1.1", BP, BP + 1)
        p.resumed()
        closing(p, BP)

    d, vm, peer = attach(script)
    kept: list[Breakpoint] = []
    d.add_breakpoint(BP, kept.append)
    ev = d.listen(5)
    assert ev is kept[0] and not ev.live
    with pytest.raises(EventExpired):
        ev.registers()
    d.close()
    peer.finish()
    # every resume drops the caches before the guest runs: before the step off the breakpoint, too
    log = [t for t in peer.log if t != "+"]
    hit = log.index("p10")
    assert log[hit + 1:log.index("vCont;c", hit)] == ["invalidate", "vCont;s:p1.1", "p10"]
    assert log[log.index(f"Z0,{BP:x},1") + 1] == "invalidate"


def test_a_peer_that_hangs_up_mid_packet_ends_the_dispatcher_with_a_shutdown_event() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.push(b"$T05thread:p0")             # QEMU dies mid stop reply
        p.sock.close()

    d, vm, peer = attach(script)
    d.add_breakpoint(BP)
    ev = d.listen(5)
    assert isinstance(ev, VmLifecycle) and ev.what is Lifecycle.SHUTDOWN
    assert "closed the connection" in ev.data["reason"]
    with pytest.raises(DispatcherClosed):
        d.listen(1)
    assert d.state is RunState.CLOSED and d._closed == "closed: the VM is gone"
    peer.finish()
    assert peer.sent[-1] == "vCont;c"        # nothing after the hang-up


def test_a_bad_checksum_is_refused_and_the_retransmission_taken() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.stop("T05thread:p01.02;", bad=True)          # corrupted: '-', and QEMU sends it again
        p.push(b"$T05thread:p01.02;#zz")                # not even hex
        p.expect("-")
        p.reply("T05thread:p01.02;")
        p.expect("p10")
        p.push(b"+")
        p.reply(le(BP), bad=True)                       # a corrupted reply to a request, too
        p.reply(le(BP))
        p.step_off("p1.2", BP, BP + 1)
        p.resumed()
        closing(p, BP)

    d, vm, peer = attach(script)
    d.add_breakpoint(BP)
    ev = d.listen(5)
    assert isinstance(ev, Breakpoint) and ev.vcpu == 1 and d.stats.stops == 2
    d.close()
    peer.finish()


def test_an_oversized_packet_is_refused_without_buffering_it_and_the_session_detaches() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.push(b"$" + b"T" * (MAX_PACKET + 100))   # no end in sight
        p.interrupted()                             # the close that follows still detaches cleanly
        p.ask(f"z0,{BP:x},1", "OK")
        p.resumed()

    d, vm, peer = attach(script)
    d.add_breakpoint(BP)
    with pytest.raises(RspProtocolError, match="longer than"):
        d.listen(5)
    assert d.state is RunState.CLOSED
    peer.finish()


def test_the_framer_keeps_neither_an_oversized_packet_nor_noise() -> None:
    ours, theirs = socket.socketpair()
    conn = RspConnection(ours, timeout=2.0)
    theirs.sendall(b"$" + b"x" * MAX_PACKET + b"#00")
    with pytest.raises(RspProtocolError, match="longer than"):
        conn.recv_packet()
    assert len(conn._buf) == 0
    noise = threading.Thread(target=theirs.sendall, args=(b"+" * (16 * MAX_PACKET),))
    noise.start()                                    # acks and noise outside packets are dropped as read
    with pytest.raises(TimeoutError):
        conn.recv_packet(0.5)
    noise.join()
    assert len(conn._buf) <= 1 << 20
    theirs.sendall(_frame("OK"))
    assert conn.recv_packet() == "OK" and theirs.recv(1) == b"+"


@pytest.mark.parametrize("stop", ["Tzz", "T05watch:nothex;", "W"])
def test_a_malformed_stop_reply_is_a_protocol_error_not_a_crash(stop: str) -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.stop(stop)
        p.expect("^C")                  # the close: the VM is stopped already, so QEMU ignores the ^C
        p.ask(f"z0,{BP:x},1", "OK")
        p.resumed()

    d, vm, peer = attach(script)
    d.add_breakpoint(BP)
    with pytest.raises(GdbStubError):
        d.listen(5)
    assert d.state is RunState.CLOSED
    peer.finish()


def test_capabilities_are_a_frozen_record_from_the_stub_and_query_kvm() -> None:
    def script(p: Peer) -> None:
        closing(p, resume="c")

    d, vm, peer = attach(script, multiprocess=False)
    caps = d.capabilities()
    assert caps.accelerator == "tcg" and caps.watchpoints is None and caps.read_watch and not caps.multiprocess
    assert caps.as_dict()["gpa_watch_aliases"] == ["direct_map", "kernel_image"]
    with pytest.raises(FrozenInstanceError):
        caps.watchpoints = 4  # type: ignore[misc]
    d.close()
    peer.finish()


def test_an_illegal_run_state_transition_is_refused() -> None:
    def script(p: Peer) -> None:
        closing(p)

    d, vm, peer = attach(script)
    with pytest.raises(AssertionError, match="RUNNING -> CLOSED"):
        d._enter(RunState.CLOSED)
    with pytest.raises(AssertionError, match="RUNNING -> RUNNING"):
        d._enter(RunState.RUNNING)
    d.close()
    peer.finish()
    with pytest.raises(AssertionError, match="CLOSED -> RUNNING"):
        d._enter(RunState.RUNNING)


def test_a_peer_that_hangs_up_inside_a_handlers_request_closes_the_dispatcher() -> None:
    def script(p: Peer) -> None:
        p.insert(BP)
        p.hit("p01.01", BP)
        p.expect("g")
        p.push(b"+$" + g_reply({})[:40].encode())
        p.sock.close()

    d, vm, peer = attach(script)
    d.add_breakpoint(BP, lambda ev: ev.registers() and None)
    with pytest.raises(GdbStubError, match="closed the connection"):
        d.listen(5)
    assert d.state is RunState.CLOSED
    peer.finish()


def test_any_stop_ends_an_interrupt_so_a_later_external_stop_is_reported() -> None:
    """pause_vcpus()'s ^C is answered by another stop (QEMU reports an internal error as T06): that stop
    ends the interrupt. Once someone resumes the VM (QMP), their next T02 is a STOP event, not taken as the
    long-gone interrupt's stop."""
    def script(p: Peer) -> None:
        p.insert(BP)
        assert p.dispatcher is not None
        vm_qmp.state = "internal-error"
        p.dispatcher.pause_vcpus()
        p.interrupted("T06thread:p01.01;")
        p.await_state(RunState.EXTERNAL)
        vm_qmp.state = "running"             # someone else: system_reset + cont
        p.running = True
        p.await_state(RunState.RUNNING)      # the dispatcher notices over QMP (it polls while EXTERNAL)
        vm_qmp.state = "paused"              # and someone else's stop
        p.stop("T02thread:p01.02;")
        closing(p, BP, stopped=True)

    d, vm, peer = attach(script)
    vm_qmp = vm.qmp
    d.add_breakpoint(BP)
    events = [d.listen(5) for _ in range(5)]
    kinds = [e.what if isinstance(e, VmLifecycle) else type(e) for e in events]
    assert kinds == [Lifecycle.PANIC, VcpuPause, VcpuPause, Lifecycle.RESUME, Lifecycle.STOP]
    assert d.stats.stops == 3 and d.state is RunState.EXTERNAL
    d.close()
    peer.finish()
