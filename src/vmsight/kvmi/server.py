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
import socket
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Protocol

from vmsight.errors import PhysicalAddressError, VmsightError
from vmsight.kvmi import wire
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

    def __init__(self, guest: Guest, dialect: wire.Dialect = wire.V6) -> None:
        self.guest = guest
        self.dialect = dialect
        self.replies_enabled = True
        self._handlers: dict[int, _Handler] = {
            dialect.command(n).id: getattr(CommandLayer, f"_do_{n.lower()}") for n in self.SERVED}

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
        return wire.encode_error(wire.KVM_EOPNOTSUPP)  # the truth: no event is served yet

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
        with self.vm.paused():
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


class Session:
    """One connection to an introspector: connect, handshake, serve until it hangs up.

    ``secret``: when given, the introspector's cookie hash must be :func:`cookie_hash` of it (as QEMU's
    ``key=``); without one the hash is not checked."""

    def __init__(self, address: str | Address, guest: Guest, hello: wire.GuestHello, *,
                 secret: bytes | None = None, dialect: wire.Dialect = wire.V6, timeout: float = 15.0) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.layer = CommandLayer(guest, dialect)
        self.dialect = dialect
        self.hello = hello
        self.secret = secret
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.commands = 0

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

    def serve(self) -> str:
        """Serve commands until the session ends; returns why (never raises for the peer's behaviour)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        reader = FrameReader(self.sock)
        try:
            while True:
                try:
                    header = wire.decode_header(self.dialect, reader.read(wire.MSG_HDR.size))
                    payload = reader.read(header.size) if header.size else b""
                    out = self.layer.handle(header, payload)
                except PeerClosed as e:
                    if e.got == 0 and e.wanted == wire.MSG_HDR.size:
                        return "the introspector hung up"
                    return f"short message: {e}: session closed"
                except wire.ProtocolError as e:
                    log.warning("KVMi: %s: closing the session", e)
                    return f"protocol error: {e}"
                except OSError as e:
                    return f"connection error: {e.strerror or e}"
                self.commands += 1
                if out:
                    try:
                        self.sock.sendall(out)
                    except OSError as e:
                        return f"connection error: {e.strerror or e}"
        finally:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


__all__ = ["BadMsr", "CommandLayer", "Guest", "Session", "Unsupported", "VmGuest", "cookie_hash",
           "registers_from_hmp", "vm_hello"]
