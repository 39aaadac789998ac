"""The VM side of KVMi (what the patched QEMU + KVM did): a :class:`Session` connects to the introspector,
sends the handshake, then a :class:`CommandLayer` serves its commands against a :class:`Guest`.

Only the commands that need no events are served here; every other command gets the error a v6 kernel
gives for an unsupported one (``-KVM_EOPNOTSUPP``) and CHECK_COMMAND / CHECK_EVENT say so. Guest memory is
reached through the VM's RAM layout only (nothing outside RAM is ever touched, at most the one page asked
for). A short or malformed message ends the session, never the VM, and the VM's run state is left as it
was found (registers are read inside ``vm.paused()``, which resumes only a VM that was running)."""

from __future__ import annotations

import hmac
import logging
import os
import re
import select
import signal
import socket
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any, Protocol

from vmsight.errors import PhysicalAddressError, VmsightError
from vmsight.events.dispatcher import BreakpointHandle, Dispatcher
from vmsight.events.errors import DispatcherClosed
from vmsight.events.types import Action, Event, VcpuPause
from vmsight.kvmi import wire
from vmsight.kvmi.int3 import SessionBreakpoints
from vmsight.kvmi.pages import SessionPages
from vmsight.kvmi.sites import WriteSite, decode_site, find_write_sites
from vmsight.kvmi.transport import Address, FrameReader, PeerClosed, TransportError, parse_address, recv_exact
from vmsight.kvmi.wire import cookie_hash
from vmsight.memory.layout import RamLayout
from vmsight.runtime import proc_start_time
from vmsight.vm import VM, parse_info_registers

log = logging.getLogger(__name__)

MSR_EFER, MSR_FS_BASE, MSR_GS_BASE = 0xC000_0080, 0xC000_0100, 0xC000_0101


class Unsupported(VmsightError):
    """This VM cannot do what a command asks (the command is then answered ``-KVM_EOPNOTSUPP``)."""


class BadMsr(VmsightError):
    """An MSR this VM cannot read (a v6 kernel answered an unreadable MSR with ``-KVM_EINVAL``)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"MSR {index:#x} cannot be read on this VM")
        self.index = index


class Guest(Protocol):
    """What the command layer needs from the VM: its RAM (layout + access) and vCPU state."""

    layout: RamLayout

    def vcpu_count(self) -> int: ...

    def read_gpa(self, gpa: int, size: int) -> bytes: ...

    def write_gpa(self, gpa: int, data: bytes) -> None: ...

    def tsc_speed(self, vcpu: int) -> int:
        """TSC frequency in Hz; raises :class:`Unsupported` when unknown."""
        ...

    def registers(self, vcpu: int, msrs: list[int]) -> wire.Registers:
        """A consistent snapshot of one vCPU; :class:`BadMsr` / :class:`Unsupported` when it cannot."""
        ...


# --- the command layer -------------------------------------------------------------------------------------

_Handler = Callable[["CommandLayer", wire.Request], bytes]


class CommandLayer:
    """Turns one framed command into the bytes to send back (possibly none: CONTROL_CMD_RESPONSE can
    suppress replies). Raises :class:`wire.MalformedMessage` (and only :class:`wire.ProtocolError`) for a
    message after which the session must close."""

    SERVED = ("GET_VERSION", "CHECK_COMMAND", "CHECK_EVENT", "GET_GUEST_INFO", "GET_VCPU_INFO", "GET_MAX_GFN",
              "READ_PHYSICAL", "WRITE_PHYSICAL", "GET_REGISTERS", "CONTROL_CMD_RESPONSE")

    EVENT_COMMANDS = ("PAUSE_VCPU", "CONTROL_EVENTS", "CONTROL_VM_EVENTS", "CONTROL_CR", "CONTROL_MSR",
                      "SET_REGISTERS")

    PAGE_COMMANDS = ("GET_PAGE_ACCESS", "SET_PAGE_ACCESS")

    def __init__(self, guest: Guest, dialect: wire.Dialect = wire.V6, events: EventControl | None = None,
                 pages: SessionPages | None = None) -> None:
        self.guest = guest
        self.dialect = dialect
        self.events = events
        self.pages = pages
        self.replies_enabled = True
        names = self.SERVED + (self.EVENT_COMMANDS if events is not None else ()) + (
            self.PAGE_COMMANDS if pages is not None else ())
        self._handlers: dict[int, _Handler] = {
            dialect.command(n).id: getattr(CommandLayer, f"_do_{n.lower()}") for n in names}

    def supported(self, command_id: int) -> bool:
        return command_id in self._handlers

    def handle(self, header: wire.Header, payload: bytes) -> bytes:
        """The framed reply to command ``header`` (b"" when replies are suppressed)."""
        d = self.dialect
        if header.id in (d.event_reply_id, d.event_id):
            # No events are sent yet, so no reply can be expected; an EVENT from the introspector never is.
            raise wire.MalformedMessage(f"unexpected message id {header.id} (seq {header.seq}): no event is "
                                        "outstanding", what="kvmi_msg_hdr", field="id", value=header.id,
                                        msg_id=header.id, seq=header.seq)
        if len(payload) != header.size:
            raise wire.MalformedMessage(f"message {header.id} declares {header.size} bytes, {len(payload)} came",
                                        msg_id=header.id, seq=header.seq)
        spec = d.commands.get(header.id)
        handler = self._handlers.get(header.id)
        enabled_before = self.replies_enabled
        now: int | None = None  # CONTROL_CMD_RESPONSE's 'now', once it succeeded
        if spec is None or handler is None:
            body = wire.encode_error(wire.KVM_EOPNOTSUPP)
        else:
            try:
                req = wire.decode_request(spec, payload)
            except wire.MalformedMessage as e:
                e.msg_id, e.seq = header.id, header.seq
                raise
            except wire.InvalidField:
                body = wire.encode_error(wire.KVM_EINVAL)
            else:
                if req.vcpu is not None and req.vcpu >= self.guest.vcpu_count():
                    body = wire.encode_error(wire.KVM_EINVAL)
                else:
                    body = handler(self, req)
                    if spec.name == "CONTROL_CMD_RESPONSE" and body == wire.encode_error(0):
                        now = req.fields["now"]
        # 'now': the new setting already applies to CONTROL_CMD_RESPONSE's own reply
        send = enabled_before if now == 0 else self.replies_enabled
        return wire.encode_message(d, header.id, header.seq, body) if send else b""

    @staticmethod
    def _ok(spec: wire.CommandSpec, data: bytes = b"", **fields: int) -> bytes:
        out = wire.encode_error(0)
        if spec.reply is not None:
            out += spec.reply.pack(fields)
        return out + data

    # --- handlers: each returns an error code, then reply data when the code is 0

    def _do_get_version(self, req: wire.Request) -> bytes:
        return self._ok(req.spec, version=self.dialect.version)

    def _do_check_command(self, req: wire.Request) -> bytes:
        return wire.encode_error(0 if self.supported(req.fields["id"]) else wire.KVM_EOPNOTSUPP)

    def _do_check_event(self, req: wire.Request) -> bytes:
        if req.fields["id"] not in self.dialect.events:
            return wire.encode_error(wire.KVM_EINVAL)
        ok = self.events is not None and self.events.event_supported(req.fields["id"])
        return wire.encode_error(0 if ok else wire.KVM_EOPNOTSUPP)

    def _do_get_guest_info(self, req: wire.Request) -> bytes:
        return self._ok(req.spec, vcpu_count=self.guest.vcpu_count())

    def _do_get_vcpu_info(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None
        try:
            return self._ok(req.spec, tsc_speed=self.guest.tsc_speed(req.vcpu))
        except Unsupported:
            return wire.encode_error(wire.KVM_EOPNOTSUPP)

    def _do_get_max_gfn(self, req: wire.Request) -> bytes:
        end = self.guest.layout.end_gpa
        return self._ok(req.spec, gfn=(end - 1) // wire.PAGE_SIZE if end else 0)  # the highest RAM gfn

    def _page_range_error(self, gpa: int, size: int) -> int:
        """0 when [gpa, gpa+size) is 1..4096 bytes inside one page and all RAM; else the v6 error."""
        if not 0 < size <= wire.PAGE_SIZE or gpa % wire.PAGE_SIZE + size > wire.PAGE_SIZE:
            return wire.KVM_EINVAL
        try:
            self.guest.layout.check(gpa, size)
        except PhysicalAddressError:
            return wire.KVM_ENOENT
        return 0

    def _do_read_physical(self, req: wire.Request) -> bytes:
        gpa, size = req.fields["gpa"], req.fields["size"]
        err = self._page_range_error(gpa, size)
        if err:
            return wire.encode_error(err)
        try:
            data = self.guest.read_gpa(gpa, size)
        except PhysicalAddressError:
            return wire.encode_error(wire.KVM_ENOENT)
        return self._ok(req.spec, data)

    def _do_write_physical(self, req: wire.Request) -> bytes:
        gpa, data = req.fields["gpa"], bytes(req.items)  # decode_request checked len(data) == size
        err = self._page_range_error(gpa, len(data))
        if err:
            return wire.encode_error(err)
        try:
            self.guest.write_gpa(gpa, data)
        except PhysicalAddressError:
            return wire.encode_error(wire.KVM_ENOENT)
        return self._ok(req.spec)

    def _do_get_registers(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None
        msrs = list(req.items)
        fixed = (wire.ERROR_CODE.size + wire.GET_REGISTERS_REPLY_HEAD.size + wire.KVM_REGS.size
                 + wire.Sregs.SIZE + wire.KVM_MSRS.size)
        if fixed + len(msrs) * wire.KVM_MSR_ENTRY.size > self.dialect.max_message:
            return wire.encode_error(wire.KVM_E2BIG)
        try:
            regs = self.guest.registers(req.vcpu, msrs)
        except BadMsr:
            return wire.encode_error(wire.KVM_EINVAL)
        except Unsupported:
            return wire.encode_error(wire.KVM_EOPNOTSUPP)
        return wire.encode_error(0) + wire.encode_registers_reply(regs)

    def _do_control_cmd_response(self, req: wire.Request) -> bytes:
        if req.fields["enable"] not in (0, 1) or req.fields["now"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        self.replies_enabled = bool(req.fields["enable"])
        return wire.encode_error(0)

    # --- event commands (only with an EventControl): each returns 0 or a negative v6 error

    def _do_pause_vcpu(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None and self.events is not None
        if req.fields["wait"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        return wire.encode_error(self.events.pause_vcpu(req.vcpu, bool(req.fields["wait"])))

    def _do_control_events(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None and self.events is not None
        f = req.fields
        spec = self.dialect.events.get(f["event_id"])
        if spec is None or spec.vm_event or f["enable"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        return wire.encode_error(self.events.control_event(req.vcpu, spec.id, bool(f["enable"])))

    def _do_control_vm_events(self, req: wire.Request) -> bytes:
        assert self.events is not None
        f = req.fields
        spec = self.dialect.events.get(f["event_id"])
        if spec is None or not spec.vm_event or f["enable"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        return wire.encode_error(self.events.control_event(None, spec.id, bool(f["enable"])))

    def _do_control_cr(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None and self.events is not None
        f = req.fields
        if f["cr"] not in (0, 3, 4) or f["enable"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        return wire.encode_error(self.events.control_cr(req.vcpu, f["cr"], bool(f["enable"])))

    def _do_control_msr(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None and self.events is not None
        f = req.fields
        if not (f["msr"] <= 0x1FFF or 0xC000_0000 <= f["msr"] <= 0xC000_1FFF) or f["enable"] not in (0, 1):
            return wire.encode_error(wire.KVM_EINVAL)
        return wire.encode_error(self.events.control_msr(req.vcpu, f["msr"], bool(f["enable"])))

    def _do_set_registers(self, req: wire.Request) -> bytes:
        assert req.vcpu is not None and self.events is not None
        return wire.encode_error(self.events.set_registers(req.vcpu, dict(req.fields)))

    # --- page access (vmsight.kvmi.pages): only with a dispatcher

    def _do_get_page_access(self, req: wire.Request) -> bytes:
        assert self.pages is not None
        err, rights = self.pages.get_page_access(req.fields["view"], [int(g) for g in req.items])
        return wire.encode_error(err) + (bytes(rights) if not err else b"")

    def _do_set_page_access(self, req: wire.Request) -> bytes:
        assert self.pages is not None
        entries = [(int(e["gpa"]), int(e["access"])) for e in req.items]   # type: ignore[index]
        return wire.encode_error(self.pages.set_page_access(req.fields["view"], entries))


class EventControl(Protocol):
    """The event side of a session, as the command layer drives it (each returns 0 or a negative error)."""

    def event_supported(self, event_id: int) -> bool: ...

    def pause_vcpu(self, vcpu: int, wait: bool) -> int: ...

    def control_event(self, vcpu: int | None, event_id: int, enable: bool) -> int:
        """``vcpu`` None: a VM event (CONTROL_VM_EVENTS)."""
        ...

    def control_cr(self, vcpu: int, cr: int, enable: bool) -> int: ...

    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int: ...

    def set_registers(self, vcpu: int, regs: dict[str, int]) -> int: ...


# --- the VM behind it --------------------------------------------------------------------------------------

_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=\s*([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", re.M)
_TBL = re.compile(r"^(GDT|IDT)\s*=\s*([0-9a-f]+) ([0-9a-f]+)", re.M)
_TPR = re.compile(r"\bTPR 0x([0-9a-f]+)")


def kvm_segment(selector: int, base: int, limit: int, flags: int) -> dict[str, int]:
    """A ``kvm_segment`` from QEMU's cached descriptor (``flags`` is the descriptor's high dword, as HMP
    prints it); QEMU's own KVM code marks a not-present segment unusable the same way."""
    present = flags >> 15 & 1
    return {"base": base, "limit": limit, "selector": selector, "type": flags >> 8 & 0xF, "present": present,
            "dpl": flags >> 13 & 3, "db": flags >> 22 & 1, "s": flags >> 12 & 1, "l": flags >> 21 & 1,
            "g": flags >> 23 & 1, "avl": flags >> 20 & 1, "unusable": 0 if present else 1}


def registers_from_hmp(text: str, vcpu: int, tpr: int | None) -> wire.Registers:
    """kvm_regs / kvm_sregs of one vCPU from HMP ``info registers -a`` (and the local APIC's TPR for CR8)."""
    blocks = re.split(r"^CPU#(\d+)\s*$", text, flags=re.M)
    body = next((blocks[i + 1] for i in range(1, len(blocks) - 1, 2) if int(blocks[i]) == vcpu), None)
    if body is None:
        raise Unsupported(f"HMP `info registers -a` has no CPU#{vcpu}")
    r = parse_info_registers(text, vcpu)  # the one parser of the GPR/CR lines
    try:
        regs = {n: r["eflags" if n == "rflags" else n] for n in wire.REGS_NAMES}
    except KeyError as e:
        raise Unsupported(f"HMP `info registers` lacks {e.args[0]}") from None
    sregs = wire.Sregs()
    for m in _SEG.finditer(body):
        sregs.segments[m.group(1).lower()] = kvm_segment(*(int(m.group(i), 16) for i in range(2, 6)))
    for m in _TBL.finditer(body):
        setattr(sregs, m.group(1).lower(), {"base": int(m.group(2), 16), "limit": int(m.group(3), 16)})
    missing = [n for n in wire.SEGMENT_NAMES if not sregs.segments.get(n)] + [
        n for n in ("gdt", "idt") if not getattr(sregs, n)]
    if missing:
        raise Unsupported(f"HMP `info registers` lacks {missing[0]}")
    for n in ("cr0", "cr2", "cr3", "cr4", "efer"):
        setattr(sregs, n, r.get(n, 0))
    sregs.cr8 = (tpr >> 4) if tpr is not None else 0  # CR8 is TPR[7:4]
    # apic_base (an MSR) and the pending-interrupt bitmap are not shown by HMP: they stay 0.
    cs = sregs.segments["cs"]
    if not sregs.cr0 & 1:
        mode = 2
    elif sregs.efer & (1 << 10) and cs["l"]:
        mode = 8
    else:
        mode = 4 if cs["db"] else 2
    return wire.Registers(mode, regs, sregs)


class VmGuest:
    """A :class:`Guest` over an attached :class:`vmsight.vm.VM`: memory through its RAM backend (live, as
    KVM reads it), vCPU state from HMP inside ``vm.paused()``."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.layout = vm.layout
        self.pause_for_registers = True
        self._apic_ids: dict[int, int | None] = {}
        self._qom_paths = {int(c["cpu-index"]): str(c.get("qom-path", "")) for c in vm.qmp.execute("query-cpus-fast")}

    def vcpu_count(self) -> int:
        return len(self.vm.vcpus())

    def read_gpa(self, gpa: int, size: int) -> bytes:
        self.layout.check(gpa, size)
        return self.vm.read_gpa(gpa, size)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.layout.check(gpa, len(data))
        self.vm.write_gpa(gpa, data)

    def _qom_path(self, vcpu: int) -> str:
        return self._qom_paths[self.vm.vcpus()[vcpu].index]

    def tsc_speed(self, vcpu: int) -> int:
        try:
            hz = int(self.vm.qmp.execute("qom-get", path=self._qom_path(vcpu), property="tsc-frequency"))
        except (VmsightError, KeyError, IndexError, ValueError, TypeError):
            hz = 0
        if hz <= 0:  # TCG without tsc-frequency=: QEMU does not know it either
            raise Unsupported("QEMU does not know this vCPU's TSC frequency")
        return hz

    def _tpr(self, vcpu: int) -> int | None:
        if vcpu not in self._apic_ids:
            try:
                self._apic_ids[vcpu] = int(self.vm.qmp.execute("qom-get", path=self._qom_path(vcpu),
                                                               property="apic-id"))
            except (VmsightError, KeyError, IndexError, ValueError, TypeError):
                self._apic_ids[vcpu] = None
        apic = self._apic_ids[vcpu]
        if apic is None:
            return None
        m = _TPR.search(self.vm.qmp.hmp(f"info lapic {apic}"))
        return int(m.group(1), 16) if m else None

    def registers(self, vcpu: int, msrs: list[int]) -> wire.Registers:
        if self.pause_for_registers:
            with self.vm.paused():
                text = self.vm.qmp.hmp("info registers -a")
                tpr = self._tpr(vcpu)
        else:  # an event dispatcher owns the run state (stopped during events, live otherwise)
            text = self.vm.qmp.hmp("info registers -a")
            tpr = self._tpr(vcpu)
        out = registers_from_hmp(text, self.vm.vcpus()[vcpu].index, tpr)  # KVMi numbers vCPUs 0..n-1
        known = {MSR_EFER: out.sregs.efer, MSR_FS_BASE: out.sregs.segments["fs"]["base"],
                 MSR_GS_BASE: out.sregs.segments["gs"]["base"]}
        for index in msrs:
            if index not in known:
                raise BadMsr(index)
            out.msrs[index] = known[index]
        return out


def vm_hello(vm: VM) -> wire.GuestHello:
    """The handshake for ``vm``: its UUID and name from QMP and its start time (QEMU's process start, which
    the patched QEMU sent as the VM's)."""
    try:
        raw = uuid_mod.UUID(str(vm.qmp.execute("query-uuid")["UUID"])).bytes
    except (VmsightError, KeyError, ValueError, TypeError):
        raw = bytes(16)
    try:
        name = str(vm.qmp.execute("query-name").get("name", ""))
    except (VmsightError, AttributeError):
        name = ""
    start_ms = int(time.time() * 1000)
    if vm.pid is not None:
        ticks = proc_start_time(vm.pid)
        boot = _boot_time()
        if ticks is not None and boot is not None:
            start_ms = int((boot + ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    return wire.GuestHello(raw, start_ms, name)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# --- the session ------------------------------------------------------------------------------------------


class SessionEnded(VmsightError):
    """Raised inside an event handler to end the session (CRASH, a bad reply, a hang-up, a signal); the
    dispatcher then detaches cleanly and :meth:`Session.serve` returns ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_GDB_OF_KVM = {"rflags": "eflags"}   # kvm_regs names that differ from the gdbstub's
UNHOOK_LINGER = 5.0                  # after UNHOOK: serve commands this long while the introspector cleans up


class Session:
    """One connection to an introspector: connect, handshake, serve until it hangs up.

    ``secret``: when given, the introspector's cookie hash must be :func:`cookie_hash` of it (as QEMU's
    ``key=``); without one the hash is not checked.

    ``dispatcher`` (a :class:`vmsight.events.dispatcher.Dispatcher` on the same VM, made with
    ``handle_signals=False``): enables events. The VM is then all-stop: while any event is unanswered the
    whole VM stays stopped (the handler that sent it waits, serving commands meanwhile), and it runs again
    when none is outstanding. Other event sources (page access, breakpoints) plug in with :meth:`send_event`
    from a dispatcher handler, :meth:`event_enabled`, and :attr:`event_providers` (event id -> a callable
    ``(vcpu, enable) -> error``, called by CONTROL_EVENTS before the event is marked enabled)."""

    def __init__(self, address: str | Address, guest: Guest, hello: wire.GuestHello, *,
                 secret: bytes | None = None, dialect: wire.Dialect = wire.V6, timeout: float = 15.0,
                 dispatcher: Dispatcher | None = None) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.dispatcher = dispatcher
        self.layer = CommandLayer(guest, dialect, _EventSide(self) if dispatcher is not None else None,
                                  SessionPages(self) if dispatcher is not None else None)
        self.arch_override: dict[str, int] | None = None   # BREAKPOINT: the registers at the int3
        self.guest = guest
        self.dialect = dialect
        self.hello = hello
        self.secret = secret
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self.commands = 0
        self.events_sent = 0
        self.event_providers: dict[int, Callable[[int, bool], int]] = {}
        n = guest.vcpu_count()
        self._enabled: list[set[int]] = [set() for _ in range(n)]   # per vCPU: enabled event ids
        self._vm_enabled: set[int] = set()
        self._crs: list[set[int]] = [set() for _ in range(n)]
        self._msrs: list[set[int]] = [set() for _ in range(n)]
        self._pause_pending = [0] * n
        self._delayed_regs: dict[int, dict[str, int]] = {}
        self._outstanding: tuple[int, int, int] | None = None       # (seq, vcpu, event id) awaiting a reply
        self._seq = 0
        self._signal: int | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._sites: CrMsrSites | None = None
        if dispatcher is not None:
            self._vcpu_of_index = {v.index: i for i, v in enumerate(dispatcher.vm.vcpus())}
            dispatcher.on(VcpuPause, self._on_vcpu_pause)
            self.breakpoints = SessionBreakpoints(self)
            self.event_providers[dialect.event("BREAKPOINT").id] = self.breakpoints.control
            self.event_providers[dialect.event("PF").id] = lambda vcpu, enable: 0  # hits of SET_PAGE_ACCESS
            if isinstance(guest, VmGuest):
                guest.pause_for_registers = False  # the dispatcher owns the run state: never QMP stop/cont

    # --- connection

    def connect(self) -> None:
        s = socket.socket(self.address.family, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.address.sockaddr)
            s.sendall(wire.encode_hello(self.hello))
            got = wire.decode_intro_reply(recv_exact(s, wire.INTROSPECTOR2QEMU.size))
        except (OSError, TransportError, wire.ProtocolError) as e:
            s.close()
            raise TransportError(f"KVMi handshake with {self.address} failed: {e}") from None
        if self.secret is not None and not hmac.compare_digest(got, cookie_hash(self.secret)):
            s.close()
            raise TransportError(f"the introspector at {self.address} sent a wrong cookie hash: it does not "
                                 "know the secret (--secret)")
        s.settimeout(None)  # commands come when the introspector wants; a hang-up ends the wait
        self.sock = s
        self._reader = FrameReader(s)

    def _frames(self) -> FrameReader:
        assert self.sock is not None
        if self._reader is None or self._reader.sock is not self.sock:
            self._reader = FrameReader(self.sock)
        return self._reader

    def _read_message(self) -> tuple[wire.Header, bytes]:
        self._frames()
        assert self._reader is not None
        header = wire.decode_header(self.dialect, self._reader.read(wire.MSG_HDR.size))
        return header, self._reader.read(header.size) if header.size else b""

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise SessionEnded(f"connection error: {e.strerror or e}") from None

    def _serve_message(self, header: wire.Header, payload: bytes) -> None:
        out = self.layer.handle(header, payload)
        self.commands += 1
        if out:
            self._send(out)

    def _readable(self, timeout: float) -> bool:
        assert self.sock is not None
        if self._frames()._buf:
            return True
        return bool(select.select([self.sock], [], [], timeout)[0])

    def _end_reason(self, e: BaseException) -> str:
        if isinstance(e, SessionEnded):
            return e.reason
        if isinstance(e, PeerClosed):
            if e.got == 0 and e.wanted == wire.MSG_HDR.size:
                return "the introspector hung up"
            return f"short message: {e}: session closed"
        if isinstance(e, wire.ProtocolError):
            log.warning("KVMi: %s: closing the session", e)
            return f"protocol error: {e}"
        if isinstance(e, OSError):
            return f"connection error: {e.strerror or e}"
        raise e

    # --- serving

    def serve(self) -> str:
        """Serve commands (and events, with a dispatcher) until the session ends; returns why (never raises
        for the peer's behaviour). With a dispatcher this must run in the thread that owns it."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        if self.dispatcher is not None:
            return self._serve_events()
        try:
            while True:
                try:
                    header, payload = self._read_message()
                    self._serve_message(header, payload)
                except (PeerClosed, wire.ProtocolError, OSError, SessionEnded) as e:
                    return self._end_reason(e)
        finally:
            self.close()

    @property
    def ended_by_signal(self) -> int | None:
        """The signal that ended the session (:meth:`request_unhook`), or None."""
        return self._signal

    def request_unhook(self, signum: int = signal.SIGTERM) -> None:
        """Ask the session to end with UNHOOK (thread-safe and signal-safe: SIGINT/SIGTERM handlers call it)."""
        self._signal = signum
        if self.dispatcher is not None:
            self.dispatcher.stop()

    def _watch_socket(self) -> None:
        # The run loop blocks in the dispatcher; a command arriving wakes it (stop() is thread-safe).
        assert self.sock is not None and self.dispatcher is not None
        while not self._done.is_set():
            try:
                ready = select.select([self.sock], [], [], 0.2)[0]
            except (OSError, ValueError):
                return
            if ready and self._outstanding is None:
                self._wake.clear()
                self.dispatcher.stop()
                self._wake.wait(0.5)

    def _serve_events(self) -> str:
        d = self.dispatcher
        assert d is not None
        watcher = threading.Thread(target=self._watch_socket, name="kvmi-socket", daemon=True)
        watcher.start()
        reason = "closed"
        try:
            while True:
                if self._signal is not None:
                    reason = f"signal {self._signal}"
                    break
                while self._readable(0.0):
                    self._serve_message(*self._read_message())
                self._wake.set()
                if any(self._pause_pending):
                    d.pause_vcpus()
                d.listen(None)
        except DispatcherClosed as e:
            reason = f"the event dispatcher closed: {e}"
        except (PeerClosed, wire.ProtocolError, OSError, SessionEnded) as e:
            reason = self._end_reason(e)
        finally:
            self._done.set()
            self._wake.set()
            d.close()  # every breakpoint removed, the VM running as before
            watcher.join(1.0)
        if self._signal is not None:
            reason += self._unhook()
        self.close()
        return reason

    def _unhook(self) -> str:
        """UNHOOK (when enabled, as the kernel did), then serve commands until the introspector closes (it
        may undo its changes first) or UNHOOK_LINGER passes. Events are over: the dispatcher is closed.
        Returns what happened, for the session's end reason."""
        if self.sock is None:
            return ""
        spec = self.dialect.event("UNHOOK")
        sent = spec.id in self._vm_enabled
        try:
            if sent:
                self._send_event_message(0, spec, None, {})
            deadline = time.monotonic() + UNHOOK_LINGER
            while (left := deadline - time.monotonic()) > 0:
                if self._readable(left):
                    self._serve_message(*self._read_message())
        except (PeerClosed, wire.ProtocolError, OSError, SessionEnded, TransportError):
            return ": UNHOOK sent, the introspector closed" if sent else ": the introspector closed"
        return f": UNHOOK sent, closed after {UNHOOK_LINGER:.0f} s" if sent else (
            f": UNHOOK not enabled, closed after {UNHOOK_LINGER:.0f} s")

    # --- events

    def event_enabled(self, vcpu: int, event_id: int) -> bool:
        return event_id in self._enabled[vcpu]

    def kvmi_vcpu(self, index: int) -> int:
        """The KVMi vCPU number (0..n-1) of a QEMU cpu-index (what dispatcher events carry)."""
        return self._vcpu_of_index[index]

    def _arch(self, vcpu: int, live: Event | None) -> wire.EventArch:
        r = self.guest.registers(vcpu, [])   # the VM is stopped: HMP's view is this instant's
        for name, value in (self.arch_override or {}).items():
            if name in ("cs", "ss"):
                seg = r.sregs.segments[name]
                seg.update(selector=value, dpl=value & 3)
            else:
                r.regs[name] = value
        msrs = dict.fromkeys(wire.EVENT_MSR_NAMES, 0)
        msrs["efer"] = r.sregs.efer
        if live is not None:
            msrs["shadow_gs"] = live.registers().get("k_gs_base", 0)
        # sysenter_*, star, lstar, cstar and pat are not readable through the gdbstub or HMP: sent as 0
        return wire.EventArch(r.mode, r.regs, r.sregs, msrs)

    def _send_event_message(self, vcpu: int, spec: wire.EventSpec, live: Event | None,
                            data: dict[str, Any]) -> int:
        arch = self._arch(vcpu, live) if live is not None or not spec.vm_event else None
        if arch is None:
            r = self.guest.registers(0, [])
            arch = wire.EventArch(r.mode, r.regs, r.sregs, dict.fromkeys(wire.EVENT_MSR_NAMES, 0))
        self._seq = (self._seq + 1) & 0xFFFF_FFFF
        self._send(wire.encode_message(self.dialect, self.dialect.event_id, self._seq,
                                       wire.encode_event(self.dialect, spec, vcpu, arch, data)))
        self.events_sent += 1
        return self._seq

    def send_event(self, ev: Event, name: str, data: dict[str, Any] | None = None) -> wire.EventReply:
        """Send event ``name`` for the vCPU of dispatcher event ``ev`` (call from its handler: the VM is
        stopped) and wait for its reply, serving commands meanwhile. Returns the reply (CONTINUE or RETRY;
        the reply data is the event's reply struct). SET_REGISTERS sent meanwhile is applied to ``ev``'s
        vCPU before returning; PAUSE_VCPU requests made meanwhile get their events right after. CRASH, a
        bad reply, a hang-up or a signal raise :class:`SessionEnded` (the dispatcher detaches cleanly)."""
        vcpu = self.kvmi_vcpu(ev.vcpu)
        reply = self._event_round_trip(vcpu, self.dialect.event(name), ev, data or {})
        self._drain_pauses(vcpu, ev)
        return reply

    def _event_round_trip(self, vcpu: int, spec: wire.EventSpec, ev: Event, data: dict[str, Any]) -> wire.EventReply:
        if self._outstanding is not None:
            raise VmsightError("one KVMi event at a time (all-stop): an event is already outstanding")
        seq = self._send_event_message(vcpu, spec, ev, data)
        self._outstanding = (seq, vcpu, spec.id)
        try:
            while True:
                while not self._readable(0.1):
                    if self._signal is not None:
                        raise SessionEnded(f"signal {self._signal}")
                header, payload = self._read_message()
                if header.id != self.dialect.event_reply_id:
                    self._serve_message(header, payload)
                    continue
                reply = wire.decode_event_reply(self.dialect, payload)
                if header.seq != seq or reply.vcpu != vcpu or reply.event != spec.id:
                    raise SessionEnded(f"protocol error: reply seq {header.seq} vCPU {reply.vcpu} event "
                                       f"{reply.event} does not match the outstanding {spec.name} event "
                                       f"(seq {seq}, vCPU {vcpu})")
                break
        except (PeerClosed, wire.ProtocolError, OSError) as e:
            raise SessionEnded(self._end_reason(e)) from None
        finally:
            self._outstanding = None
        if reply.action == wire.ACTION_CRASH:
            raise SessionEnded(f"the introspector answered CRASH to {spec.name} on vCPU {vcpu}: detached")
        regs = self._delayed_regs.pop(vcpu, None)
        if regs:
            for name, value in regs.items():
                ev.set_register(_GDB_OF_KVM.get(name, name), value)
        return reply

    def _drain_pauses(self, vcpu: int, ev: Event) -> None:
        # One PAUSE_VCPU event per successful command, after the vCPU's other events. Other vCPUs' pauses
        # come with the next stop (the run loop asks for one).
        while self._pause_pending[vcpu]:
            self._pause_pending[vcpu] -= 1
            self._event_round_trip(vcpu, self.dialect.event("PAUSE_VCPU"), ev, {})

    def _on_vcpu_pause(self, ev: Event) -> None:
        self._drain_pauses(self.kvmi_vcpu(ev.vcpu), ev)

    def _cr_msr_sites(self) -> CrMsrSites:
        if self._sites is None:
            assert self.dispatcher is not None
            self._sites = CrMsrSites(self, self.dispatcher)
        return self._sites

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class CrMsrSites:
    """CR and MSR write events on a stock QEMU: a breakpoint on every guest write site of a controlled
    register (found once in kernel text by :mod:`vmsight.kvmi.sites`), armed on the first CONTROL_CR /
    CONTROL_MSR that needs it. A hit of a register nobody controls continues silently (the dispatcher
    steps over it). The reply's ``new_val`` is what gets written: for a CR, through the gdbstub (QEMU's
    own CR update path) with rip moved past the mov, so no register changes; for wrmsr of FS/GS/kernel-GS
    base likewise; for other MSRs edx:eax are set to it before the step (they then hold new_val
    afterwards: the gdbstub cannot write those MSRs)."""

    def __init__(self, session: Session, dispatcher: Dispatcher) -> None:
        self.s = session
        self.d = dispatcher
        self.sites: list[WriteSite] | None = None
        self.armed: dict[int, BreakpointHandle] = {}
        self._last_msr: dict[int, int] = {}   # MSR -> last value seen written (old_value where unreadable)

    def _find(self) -> list[WriteSite]:
        if self.sites is None:
            k = self.d.kernel
            text, etext = k.symbols.get("_text"), k.symbols.get("_etext")
            if text is None or etext is None or not 0 < etext - text <= 256 << 20:
                raise Unsupported("kallsyms lacks _text/_etext: the write sites cannot be found")
            t0 = time.monotonic()
            code = self.d.vm.read_gpa(k.text_gpa, etext - text)

            def symbol_start(gva: int) -> int | None:
                hit = k.symbols.lookup(gva)
                return None if hit is None else gva - hit[1]

            self.sites = find_write_sites(code, text, symbol_start)
            log.info("KVMi: %d CR/MSR write sites in %d MiB of kernel text (%.2f s)", len(self.sites),
                     (etext - text) >> 20, time.monotonic() - t0)
        return self.sites

    def _arm(self, site: WriteSite) -> None:
        if site.gva in self.armed:
            return
        # validated again in the live guest: the text must still hold this instruction (no alternatives
        # patched over it since it was decoded)
        if decode_site(self.d.kernel.read(site.gva, 16), site.gva) != WriteSite(site.gva, site.length, site.cr,
                                                                                  site.reg, None):
            log.warning("KVMi: write site %#x no longer decodes as found: not armed", site.gva)
            return
        def handler(ev: Event) -> Action | None:
            return self._hit(ev, site)

        self.armed[site.gva] = self.d.add_breakpoint(site.gva, handler)

    def want_cr(self, cr: int) -> int:
        try:
            for site in self._find():
                if site.cr == cr:
                    self._arm(site)
        except (Unsupported, VmsightError) as e:
            log.warning("KVMi: CR%d writes cannot be caught: %s", cr, e)
            return wire.KVM_EOPNOTSUPP
        return 0

    def want_msr(self, msr: int) -> int:
        try:
            for site in self._find():
                if site.cr is None and (site.msr is None or site.msr == msr):
                    self._arm(site)
        except (Unsupported, VmsightError) as e:
            log.warning("KVMi: MSR %#x writes cannot be caught: %s", msr, e)
            return wire.KVM_EOPNOTSUPP
        return 0

    def _hit(self, ev: Event, site: WriteSite) -> Action | None:
        """A vCPU at a write site. Writes are emulated through the gdbstub where it can write the target
        register (CR0/3/4, FS/GS/kernel-GS base: the same QEMU update paths as the instructions) and rip
        is moved past the instruction: no single step, which under TCG flushes every translated block
        (~40 ms a hit). Other MSRs are stepped over by the dispatcher."""
        s = self.s
        vcpu = s.kvmi_vcpu(ev.vcpu)
        regs = ev.registers()
        if site.cr is not None and site.reg is not None:
            new = regs[site.reg]
            value = new
            if site.cr in s._crs[vcpu] and s.event_enabled(vcpu, s.dialect.event("CR").id):
                reply = s.send_event(ev, "CR", {"cr": site.cr, "old_value": regs.get(f"cr{site.cr}", 0),
                                                "new_value": new})
                if reply.action == wire.ACTION_RETRY:
                    return Action.RETRY
                value = reply.data["new_val"]
            ev.set_register(f"cr{site.cr}", value)
            ev.set_register("rip", site.gva + site.length)
            return None
        msr = regs["rcx"] & 0xFFFF_FFFF
        new = (regs["rdx"] & 0xFFFF_FFFF) << 32 | regs["rax"] & 0xFFFF_FFFF
        value = new
        gdb_name = _GDB_MSRS.get(msr)
        if msr in s._msrs[vcpu] and s.event_enabled(vcpu, s.dialect.event("MSR").id):
            old = regs.get(gdb_name or "", self._last_msr.get(msr, 0))
            reply = s.send_event(ev, "MSR", {"msr": msr, "old_value": old, "new_value": new})
            if reply.action == wire.ACTION_RETRY:
                return Action.RETRY
            value = reply.data["new_val"]
            self._last_msr[msr] = value
        if gdb_name is not None and gdb_name in regs:
            ev.set_register(gdb_name, value)
            ev.set_register("rip", site.gva + site.length)
        elif value != new:  # stepped by the dispatcher: wrmsr takes edx:eax
            ev.set_register("rax", value & 0xFFFF_FFFF)
            ev.set_register("rdx", value >> 32)
        return None


# MSRs the gdbstub writes through QEMU's own wrmsr paths (context switches write these: emulated, not stepped)
_GDB_MSRS = {MSR_FS_BASE: "fs_base", MSR_GS_BASE: "gs_base", 0xC000_0102: "k_gs_base"}


class _EventSide:
    """:class:`EventControl` for a session with a dispatcher."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def event_supported(self, event_id: int) -> bool:
        name = self.s.dialect.events[event_id].name
        return name in ("PAUSE_VCPU", "UNHOOK", "CR", "MSR") or event_id in self.s.event_providers

    def pause_vcpu(self, vcpu: int, wait: bool) -> int:
        # wait=1 waited for the vCPU to take the kick; here the stop is requested at once and the event
        # follows at the next stop (the introspector must be free to answer it: the reply cannot wait).
        self.s._pause_pending[vcpu] += 1
        if self.s._outstanding is None and self.s.dispatcher is not None:
            self.s.dispatcher.pause_vcpus()
        return 0

    def control_event(self, vcpu: int | None, event_id: int, enable: bool) -> int:
        if not self.event_supported(event_id):
            return wire.KVM_EOPNOTSUPP
        if vcpu is None:
            (self.s._vm_enabled.add if enable else self.s._vm_enabled.discard)(event_id)
            return 0
        if event_id == self.s.dialect.event("PAUSE_VCPU").id:
            return 0 if enable else wire.KVM_EINVAL  # cannot be disabled
        provider = self.s.event_providers.get(event_id)
        if provider is not None:
            err = provider(vcpu, enable)
            if err:
                return err
        (self.s._enabled[vcpu].add if enable else self.s._enabled[vcpu].discard)(event_id)
        return 0

    def control_cr(self, vcpu: int, cr: int, enable: bool) -> int:
        if enable:
            err = self.s._cr_msr_sites().want_cr(cr)
            if err:
                return err
        (self.s._crs[vcpu].add if enable else self.s._crs[vcpu].discard)(cr)
        return 0

    def control_msr(self, vcpu: int, msr: int, enable: bool) -> int:
        if enable:
            err = self.s._cr_msr_sites().want_msr(msr)
            if err:
                return err
        (self.s._msrs[vcpu].add if enable else self.s._msrs[vcpu].discard)(msr)
        return 0

    def set_registers(self, vcpu: int, regs: dict[str, int]) -> int:
        o = self.s._outstanding
        if o is None or o[1] != vcpu:
            return wire.KVM_EOPNOTSUPP  # applied when the vCPU's event is answered: it must have one
        self.s._delayed_regs[vcpu] = regs
        return 0


__all__ = ["BadMsr", "CommandLayer", "EventControl", "Guest", "Session", "SessionEnded", "Unsupported", "VmGuest", "cookie_hash",
           "registers_from_hmp", "vm_hello"]
