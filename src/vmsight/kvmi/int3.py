"""KVMi BREAKPOINT events on a stock QEMU: the guest's own #BP, caught at the entry of its #BP handler.

The introspector writes 0xCC with WRITE_PHYSICAL and enables the event. KVM intercepted #BP; here a gdbstub
breakpoint sits on the handler of IDT vector 3 (read from each vCPU's IDTR, HMP ``info registers``, and the
16-byte gate descriptor). At the handler's first instruction nothing but the CPU's exception delivery has
run, so the registers at the int3 are the current ones with rip/cs/rflags/rsp/ss taken from the hardware
frame at ``rsp`` (SDM vol. 3 6.14.2: in 64-bit mode the CPU always pushes SS, RSP, RFLAGS, CS, RIP; #BP pushes
no error code), rip moved back over the int3 (KVM reported the int3's own address).

Relied on, checked at :meth:`Int3Engine.enable` on the running kernel (both Debian kernels, 6.1 and 6.12):
vector 3 is a present 64-bit interrupt/trap gate with IST 0 (Linux: ``SYSG(X86_TRAP_BP, asm_exc_int3)`` in
arch/x86/kernel/idt.c; #BP left the IST with commit d8ba61ba58c8 "x86/entry/64: Don't use IST entry for #BP
stack") whose target is ``asm_exc_int3``; every vCPU has the same IDT; at the handler's first instruction
HMP's rsp + 40 is the frame's rsp rounded down to 16 (kernel-mode int3; the CPU aligns before pushing). The
guest tests check each on 6.1 and 6.12. Under FRED (v6.9+, CPUs with FRED) the IDT is not used: a kernel
that enabled it has no gate to break on (not handled: no TCG CPU model offers FRED in QEMU 7.2).

CONTINUE gives the #BP to the guest (the vCPU goes on in its handler, as a re-injected #BP would: the
kernel's do_int3, which oopses on an int3 it does not own, or SIGTRAP for user space). RETRY undoes the
delivery (rip = the int3's address, rsp, rflags, cs, ss from the frame) so the instruction runs again: the
introspector restores the original byte first (the same 0xCC again is the next event)."""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmsight.errors import MemoryAccessError, VmsightError
from vmsight.events.types import Action, Breakpoint, Reply
from vmsight.memory.paging import gva_to_gpa, kernel_pgd

if TYPE_CHECKING:
    from vmsight.events.dispatcher import BreakpointHandle, Dispatcher
    from vmsight.kvmi.server import Session
    from vmsight.linux.kernel import Kernel

log = logging.getLogger(__name__)

BP_VECTOR = 3
_IDT = re.compile(r"^IDT\s*=\s*([0-9a-f]+) ([0-9a-f]+)", re.M)
_FRAME = struct.Struct("<5Q")     # rip, cs, rflags, rsp, ss (lowest address first)
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


class Int3Unsupported(VmsightError):
    """The guest's #BP cannot be caught this way (no IDT gate to break on, an IST, FRED...)."""


@dataclass(frozen=True)
class Gate:
    """An x86-64 IDT gate descriptor (SDM vol. 3 figure 6-8)."""

    offset: int
    selector: int
    ist: int
    type: int
    dpl: int
    present: bool

    @classmethod
    def decode(cls, raw: bytes) -> Gate:
        if len(raw) != 16:
            raise ValueError("an IDT gate is 16 bytes")
        lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", raw)
        return cls(lo | mid << 16 | hi << 32, sel, ist & 7, attr & 0xF, attr >> 5 & 3, bool(attr & 0x80))


@dataclass(frozen=True)
class Frame:
    """The exception frame the CPU pushed (at the handler's rsp)."""

    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    @classmethod
    def decode(cls, raw: bytes) -> Frame:
        rip, cs, rflags, rsp, ss = _FRAME.unpack(raw)
        return cls(rip, cs & 0xFFFF, rflags, rsp, ss & 0xFFFF)


def idt_bases(hmp_info_registers: str) -> list[int]:
    """IDTR base of every vCPU in HMP ``info registers -a``."""
    return [int(m.group(1), 16) for m in _IDT.finditer(hmp_info_registers)]


@dataclass
class BreakpointHit:
    """What the KVMi BREAKPOINT event carries: the registers at the int3 (gdbstub names), the int3's gpa
    and length, and the dispatcher event (live while the callback runs)."""

    vcpu: int
    gpa: int
    insn_len: int
    registers: dict[str, int]
    frame: Frame
    event: Breakpoint


BreakpointCallback = Callable[[BreakpointHit], Action]


class Int3Engine:
    """BREAKPOINT events over a :class:`~vmsight.events.dispatcher.Dispatcher`."""

    def __init__(self, dispatcher: Dispatcher, kernel: Kernel, on_breakpoint: BreakpointCallback) -> None:
        self.d = dispatcher
        self.kernel = kernel
        self.on_breakpoint = on_breakpoint
        self.handler_gva: int | None = None
        self._bp: BreakpointHandle | None = None
        self.hits = 0

    def find_handler(self) -> int:
        """gva of the #BP handler, checked on every vCPU's IDT (raises :class:`Int3Unsupported`)."""
        bases = idt_bases(self.d.vm.qmp.hmp("info registers -a"))
        if not bases:
            raise Int3Unsupported("HMP info registers shows no IDTR")
        targets = set()
        for base in bases:
            try:
                gate = Gate.decode(self.kernel.read(base + BP_VECTOR * 16, 16))
            except MemoryAccessError as e:
                raise Int3Unsupported(f"the IDT at {base:#x} is unreadable: {e}") from None
            if not gate.present or gate.type not in (GATE_INTERRUPT, GATE_TRAP):
                raise Int3Unsupported(f"IDT vector 3 at {base:#x} is not a present 64-bit gate ({gate})")
            if gate.ist:
                # an IST changes nothing in the frame, but a nested #BP would reuse the stack: not relied on
                raise Int3Unsupported(f"IDT vector 3 uses IST {gate.ist}; this engine expects IST 0")
            targets.add(gate.offset)
        if len(targets) != 1:
            raise Int3Unsupported(f"the vCPUs' #BP handlers differ: {sorted(map(hex, targets))}")
        return targets.pop()

    def enable(self) -> None:
        if self._bp is not None:
            return
        self.handler_gva = self.find_handler()
        self._bp = self.d.add_breakpoint(self.handler_gva, self._on_entry, with_registers=True)
        log.debug("BREAKPOINT events: break at the #BP handler %#x (%s)", self.handler_gva,
                  self.kernel.symbolize(self.handler_gva))

    def disable(self) -> None:
        if self._bp is not None:
            self.d.remove(self._bp)
            self._bp = None

    @property
    def enabled(self) -> bool:
        return self._bp is not None

    def _on_entry(self, ev: Breakpoint) -> Reply | None:
        regs = ev.registers()
        frame = Frame.decode(ev.read(regs["rsp"], _FRAME.size))
        insn_len = 1
        try:
            if ev.read(frame.rip - 1, 1) != b"\xcc" and ev.read(frame.rip - 2, 2) == b"\xcd\x03":
                insn_len = 2       # int $3 (a 0xCC that went away since is still reported as 1 byte)
        except MemoryAccessError:
            pass
        at = frame.rip - insn_len
        try:
            gpa = gva_to_gpa(self.kernel.phys, kernel_pgd(regs["cr3"]), at, la57=self.kernel.la57)
        except MemoryAccessError:
            gpa = -1
        at_int3 = dict(regs, rip=at, eflags=frame.rflags, rsp=frame.rsp, cs=frame.cs, ss=frame.ss)
        self.hits += 1
        action = self.on_breakpoint(BreakpointHit(ev.vcpu, gpa, insn_len, at_int3, frame, ev))
        if action is Action.RETRY:
            # undo the delivery: the vCPU re-executes at the int3's address in its own mode
            return Reply(Action.RETRY, registers={"ss": frame.ss, "cs": frame.cs, "rsp": frame.rsp,
                                                  "eflags": frame.rflags, "rip": at})
        return None   # CONTINUE: the guest's handler runs




# --- KVMi session glue -------------------------------------------------------------------------------

class SessionBreakpoints:
    """BREAKPOINT events of a :class:`vmsight.kvmi.server.Session`: the handler breakpoint is in place
    while any vCPU has the event enabled (CONTROL_EVENTS). A #BP of a vCPU without it goes to the guest."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.engine: Int3Engine | None = None
        self._on: set[int] = set()

    def control(self, vcpu: int, enable: bool) -> int:
        """The session's event provider for BREAKPOINT: 0 or a positive v6 error."""
        d = self.s.dispatcher
        assert d is not None
        try:
            if enable and self.engine is None:
                self.engine = Int3Engine(d, d.kernel, self._on_hit)
            if enable:
                self.engine.enable()        # type: ignore[union-attr]
                self._on.add(vcpu)
            else:
                self._on.discard(vcpu)
                if not self._on and self.engine is not None:
                    self.engine.disable()
        except VmsightError as e:
            log.warning("KVMi BREAKPOINT events: %s", e)
            return 95    # KVM_EOPNOTSUPP
        return 0

    def _on_hit(self, hit: BreakpointHit) -> Action:
        from vmsight.kvmi import wire

        s = self.s
        vcpu = s.kvmi_vcpu(hit.vcpu)
        if vcpu not in self._on or not s.event_enabled(vcpu, s.dialect.event("BREAKPOINT").id):
            return Action.CONTINUE
        r = hit.registers
        s.arch_override = {"rip": r["rip"], "rsp": r["rsp"], "rflags": r["eflags"], "cs": r["cs"], "ss": r["ss"]}
        try:
            reply = s.send_event(hit.event, "BREAKPOINT", {"gpa": max(hit.gpa, 0), "insn_len": hit.insn_len})
        finally:
            s.arch_override = None
        return Action.RETRY if reply.action == wire.ACTION_RETRY else Action.CONTINUE

    def close(self) -> None:
        if self.engine is not None:
            self.engine.disable()


__all__ = ["BreakpointHit", "Frame", "Gate", "Int3Engine", "Int3Unsupported", "SessionBreakpoints", "idt_bases"]
