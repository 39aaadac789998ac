"""The KVMi wire format as data: message ids, command and event ids and every struct layout, one table per
dialect (:data:`V6`, the kvmi-v6 proposal that libkvmi's ``kvmi-v6`` branch speaks), with encoders and
decoders that validate everything (sizes, zero padding, value ranges, bounded counts).

This module only turns bytes into values and back; what a command does lives in
:mod:`vmsight.kvmi.server` (the VM side) and :mod:`vmsight.kvmi.client` (the introspector), so a later
dialect (libkvmi master's) is another table, not another protocol engine. Everything is little-endian,
as on the x86-64 hosts KVMi ran on. Two kinds of bad input are told apart: :class:`MalformedMessage` (a
size that does not add up: the peer is out of step and the session must close, as the kernel did) and
:class:`InvalidField` (well framed, but padding is not zero or a value is out of range: the VM side
answers ``-KVM_EINVAL``)."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from vmsight.errors import VmsightError

# --- errors ----------------------------------------------------------------------------------------------


class ProtocolError(VmsightError):
    """A KVMi message or handshake that does not follow the dialect. ``what`` names the struct or
    message, ``field``/``value`` the offending member when there is one."""

    def __init__(self, message: str, *, what: str = "", field: str | None = None, value: Any = None,
                 msg_id: int | None = None, seq: int | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.field = field
        self.value = value
        self.msg_id = msg_id
        self.seq = seq


class MalformedMessage(ProtocolError):
    """Sizes do not add up (short, long, a count the payload does not hold): the stream is out of step."""


class InvalidField(ProtocolError):
    """A well-framed struct with non-zero padding or a value out of range."""


# --- KVM error codes (include/uapi/linux/kvm_para.h): replies carry them negated -----------------------

KVM_EPERM = 1
KVM_ENOENT = 2
KVM_E2BIG = 7
KVM_EAGAIN = 11
KVM_ENOMEM = 12
KVM_EFAULT = 14
KVM_EBUSY = 16
KVM_EINVAL = 22
KVM_EOPNOTSUPP = 95
KVM_ENOSYS = 1000
KVM_ERRORS = {KVM_EPERM: "EPERM", KVM_ENOENT: "ENOENT", KVM_E2BIG: "E2BIG", KVM_EAGAIN: "EAGAIN",
              KVM_ENOMEM: "ENOMEM", KVM_EFAULT: "EFAULT", KVM_EBUSY: "EBUSY", KVM_EINVAL: "EINVAL",
              KVM_EOPNOTSUPP: "EOPNOTSUPP", KVM_ENOSYS: "ENOSYS"}

# --- struct layouts --------------------------------------------------------------------------------------

_INT_RANGE = {"B": (0, 0xFF), "H": (0, 0xFFFF), "I": (0, 0xFFFF_FFFF), "Q": (0, (1 << 64) - 1),
              "b": (-0x80, 0x7F), "h": (-0x8000, 0x7FFF), "i": (-(1 << 31), (1 << 31) - 1),
              "q": (-(1 << 63), (1 << 63) - 1)}


class Layout:
    """A fixed-size C struct: ``(name, struct code)`` members in order. Members named ``pad*`` are
    padding: written as zeros, and refused (:class:`InvalidField`) when a decoded one is not zero.
    ``Ns`` members are byte arrays (shorter values are zero-filled on encoding)."""

    def __init__(self, name: str, *members: tuple[str, str]) -> None:
        self.name = name
        self.members = members
        self._st = struct.Struct("<" + "".join(code for _, code in members))
        self.size = self._st.size
        self.names = tuple(n for n, _ in members if not n.startswith("pad"))
        self._name_set = frozenset(self.names)
        # Precomputed once: the per-message work is one struct call plus the checks (the hot path of P7).
        self._zeros: list[Any] = [bytes(int(c[:-1])) if c.endswith("s") else 0 for _, c in members]
        self._fields = [(i, n, int(c[:-1]) if c.endswith("s") else -1, *_INT_RANGE.get(c, (0, 0)))
                        for i, (n, c) in enumerate(members) if not n.startswith("pad")]
        self._pads = [(i, n) for i, (n, _) in enumerate(members) if n.startswith("pad")]

    def pack(self, values: Mapping[str, Any] | None = None, **kw: Any) -> bytes:
        vals = {**values, **kw} if values else kw
        if not self._name_set.issuperset(vals):
            bad = sorted(set(vals) - self._name_set)[0]
            raise InvalidField(f"{self.name} has no member {bad!r}", what=self.name, field=bad)
        args = self._zeros.copy()
        for i, name, nbytes, lo, hi in self._fields:
            if name not in vals:
                continue
            v = vals[name]
            if nbytes >= 0:
                if not isinstance(v, bytes | bytearray) or len(v) > nbytes:
                    raise InvalidField(f"{self.name}.{name} takes at most {nbytes} bytes", what=self.name,
                                       field=name, value=v)
                args[i] = bytes(v)
            elif not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidField(f"{self.name}.{name} = {v!r} is outside {lo}..{hi:#x}", what=self.name,
                                   field=name, value=v)
            else:
                args[i] = v
        return self._st.pack(*args)

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, Any]:
        """The members at ``offset`` (padding checked, left out); the data must hold the whole struct."""
        if offset < 0 or len(data) - offset < self.size:
            raise MalformedMessage(f"{self.name} needs {self.size} bytes, got {max(0, len(data) - offset)}",
                                   what=self.name, value=len(data) - offset)
        raw = self._st.unpack_from(data, offset)
        for i, name in self._pads:
            v = raw[i]
            if v if isinstance(v, int) else any(v):
                raise InvalidField(f"{self.name}.{name} is not zero", what=self.name, field=name, value=v)
        return {name: raw[i] for i, name, *_ in self._fields}

    def unpack_exact(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        if len(data) != self.size:
            raise MalformedMessage(f"{self.name} is {self.size} bytes, got {len(data)}", what=self.name,
                                   value=len(data))
        return self.unpack(data)


def _l(name: str, spec: str) -> Layout:
    """A layout from ``"name:code name:code ..."``."""
    return Layout(name, *((m.partition(":")[0], m.partition(":")[2]) for m in spec.split()))


MSG_HDR = _l("kvmi_msg_hdr", "id:H size:H seq:I")
ERROR_CODE = _l("kvmi_error_code", "err:i pad:I")
VCPU_HDR = _l("kvmi_vcpu_hdr", "vcpu:H pad1:H pad2:I")
QEMU2INTROSPECTOR = _l("kvmi_qemu2introspector", "struct_size:I uuid:16s pad:I start_time:q name:64s")
INTROSPECTOR2QEMU = _l("kvmi_introspector2qemu", "struct_size:I cookie_hash:20s")

REGS_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15", "rip", "rflags")
KVM_REGS = Layout("kvm_regs", *((n, "Q") for n in REGS_NAMES))
KVM_SEGMENT = _l("kvm_segment", "base:Q limit:I selector:H type:B present:B dpl:B db:B s:B l:B g:B avl:B "
                 "unusable:B pad:B")
KVM_DTABLE = _l("kvm_dtable", "base:Q limit:H pad:6s")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_TAIL = _l("kvm_sregs", "cr0:Q cr2:Q cr3:Q cr4:Q cr8:Q efer:Q apic_base:Q ib0:Q ib1:Q ib2:Q ib3:Q")
KVM_MSRS = _l("kvm_msrs", "nmsrs:I pad:I")
KVM_MSR_ENTRY = _l("kvm_msr_entry", "index:I pad:I data:Q")
EVENT_MSR_NAMES = ("sysenter_cs", "sysenter_esp", "sysenter_eip", "efer", "star", "lstar", "cstar", "pat",
                   "shadow_gs")
EVENT_MSRS = Layout("kvmi_event_arch.msrs", *((n, "Q") for n in EVENT_MSR_NAMES))
EVENT_COMMON = _l("kvmi_event", "size:H vcpu:H event:B pad:3s")
EVENT_ARCH_HEAD = _l("kvmi_event_arch", "mode:B pad:7s")
EVENT_REPLY = _l("kvmi_event_reply", "action:B event:B pad1:H pad2:I")


@dataclass
class Sregs:
    """``struct kvm_sregs`` (312 bytes): eight segments, GDT/IDT, control registers, the pending
    interrupt bitmap (four u64)."""

    segments: dict[str, dict[str, int]] = field(default_factory=lambda: {n: {} for n in SEGMENT_NAMES})
    gdt: dict[str, int] = field(default_factory=dict)
    idt: dict[str, int] = field(default_factory=dict)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    SIZE = 8 * KVM_SEGMENT.size + 2 * KVM_DTABLE.size + SREGS_TAIL.size

    def pack(self) -> bytes:
        parts = [KVM_SEGMENT.pack(self.segments.get(n, {})) for n in SEGMENT_NAMES]
        parts += [KVM_DTABLE.pack(self.gdt), KVM_DTABLE.pack(self.idt)]
        ib = self.interrupt_bitmap
        parts.append(SREGS_TAIL.pack(cr0=self.cr0, cr2=self.cr2, cr3=self.cr3, cr4=self.cr4, cr8=self.cr8,
                                     efer=self.efer, apic_base=self.apic_base, ib0=ib[0], ib1=ib[1], ib2=ib[2],
                                     ib3=ib[3]))
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Sregs:
        segs = {n: KVM_SEGMENT.unpack(data, offset + i * KVM_SEGMENT.size) for i, n in enumerate(SEGMENT_NAMES)}
        o = offset + 8 * KVM_SEGMENT.size
        gdt, idt = KVM_DTABLE.unpack(data, o), KVM_DTABLE.unpack(data, o + KVM_DTABLE.size)
        t = SREGS_TAIL.unpack(data, o + 2 * KVM_DTABLE.size)
        return cls(segs, gdt, idt, t["cr0"], t["cr2"], t["cr3"], t["cr4"], t["cr8"], t["efer"], t["apic_base"],
                   (t["ib0"], t["ib1"], t["ib2"], t["ib3"]))


@dataclass
class Registers:
    """What GET_REGISTERS returns: the CPU mode (2, 4 or 8 bytes), ``kvm_regs``, ``kvm_sregs`` and the
    requested MSRs (index -> value, in request order)."""

    mode: int
    regs: dict[str, int]
    sregs: Sregs
    msrs: dict[int, int] = field(default_factory=dict)


@dataclass
class EventArch:
    """``struct kvmi_event_arch`` (536 bytes): mode, kvm_regs, kvm_sregs, nine MSRs."""

    mode: int
    regs: dict[str, int]
    sregs: Sregs
    msrs: dict[str, int]

    SIZE = EVENT_ARCH_HEAD.size + KVM_REGS.size + Sregs.SIZE + EVENT_MSRS.size

    def pack(self) -> bytes:
        if self.mode not in (2, 4, 8):
            raise InvalidField(f"kvmi_event_arch.mode is {self.mode}, not 2, 4 or 8", what="kvmi_event_arch",
                               field="mode", value=self.mode)
        return (EVENT_ARCH_HEAD.pack(mode=self.mode) + KVM_REGS.pack(self.regs) + self.sregs.pack()
                + EVENT_MSRS.pack(self.msrs))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> EventArch:
        head = EVENT_ARCH_HEAD.unpack(data, offset)
        if head["mode"] not in (2, 4, 8):
            raise InvalidField(f"kvmi_event_arch.mode is {head['mode']}, not 2, 4 or 8", what="kvmi_event_arch",
                               field="mode", value=head["mode"])
        o = offset + EVENT_ARCH_HEAD.size
        regs = KVM_REGS.unpack(data, o)
        sregs = Sregs.unpack(data, o + KVM_REGS.size)
        msrs = EVENT_MSRS.unpack(data, o + KVM_REGS.size + Sregs.SIZE)
        return cls(head["mode"], regs, sregs, msrs)


# --- the dialect table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Array:
    """A variable tail: ``count`` items of ``item`` (a Layout, or a struct code for a plain array), the
    count taken from member ``count_field`` of the fixed part (None: whatever the payload holds, but at
    most ``limit``)."""

    item: Layout | str
    count_field: str | None = None
    limit: int = 1 << 16

    @property
    def item_size(self) -> int:
        return self.item.size if isinstance(self.item, Layout) else struct.calcsize("<" + self.item)


@dataclass(frozen=True)
class CommandSpec:
    """One command: its id, whether it starts with ``kvmi_vcpu_hdr``, its request struct and tail, and
    its reply data struct and tail (None: an error code only)."""

    id: int
    name: str
    vcpu: bool = False
    request: Layout | None = None
    tail: Array | None = None
    reply: Layout | None = None
    reply_tail: Array | None = None


@dataclass(frozen=True)
class EventSpec:
    id: int
    name: str
    data: Layout | None = None      # event-specific payload after kvmi_event
    reply: Layout | None = None     # event-specific reply after kvmi_event_reply
    vm_event: bool = False          # enabled with CONTROL_VM_EVENTS, not per vCPU
    needs_reply: bool = True


@dataclass(frozen=True)
class Dialect:
    name: str
    version: int
    event_reply_id: int
    event_id: int
    max_message: int                  # payload bytes after kvmi_msg_hdr
    handshake_min: int                # bounds on an incoming kvmi_qemu2introspector.struct_size
    handshake_max: int
    commands: Mapping[int, CommandSpec]
    events: Mapping[int, EventSpec]
    event_size: int                   # kvmi_event.size: common header + arch block

    @functools.cached_property
    def _by_name(self) -> dict[str, CommandSpec]:
        return {c.name: c for c in self.commands.values()}

    def command(self, name: str) -> CommandSpec:
        return self._by_name[name]

    def event(self, name: str) -> EventSpec:
        for e in self.events.values():
            if e.name == name:
                return e
        raise KeyError(name)


_EVENT_CONTROL = _l("kvmi_control_events", "event_id:H enable:B pad1:B pad2:I")
_PAGE_ACCESS_HEAD = _l("kvmi_get_page_access", "view:H count:H pad:I")
_PAGE_ACCESS_ENTRY = _l("kvmi_page_access_entry", "gpa:Q access:B pad1:B pad2:H pad3:I")
_WRITE_BITMAP_ENTRY = _l("kvmi_page_write_bitmap_entry", "gpa:Q bitmap:I pad:I")
# GET_REGISTERS reply's fixed part before kvm_regs; kvm_sregs and kvm_msrs follow (see encode/decode below).
GET_REGISTERS_REPLY_HEAD = _l("kvmi_get_registers_reply", "mode:I pad:I")

_V6_COMMANDS = [
    CommandSpec(2, "GET_VERSION", reply=_l("kvmi_get_version_reply", "version:I pad:I")),
    CommandSpec(3, "CHECK_COMMAND", request=_l("kvmi_check_command", "id:H pad1:H pad2:I")),
    CommandSpec(4, "CHECK_EVENT", request=_l("kvmi_check_event", "id:H pad1:H pad2:I")),
    CommandSpec(5, "GET_GUEST_INFO", reply=_l("kvmi_get_guest_info_reply", "vcpu_count:I pad:12s")),
    CommandSpec(6, "GET_VCPU_INFO", vcpu=True, reply=_l("kvmi_get_vcpu_info_reply", "tsc_speed:Q")),
    CommandSpec(7, "PAUSE_VCPU", vcpu=True, request=_l("kvmi_pause_vcpu", "wait:B pad1:B pad2:H pad3:I")),
    CommandSpec(8, "CONTROL_VM_EVENTS", request=_l("kvmi_control_vm_events", "event_id:H enable:B pad1:B pad2:I")),
    CommandSpec(9, "CONTROL_EVENTS", vcpu=True, request=_EVENT_CONTROL),
    CommandSpec(10, "CONTROL_CR", vcpu=True, request=_l("kvmi_control_cr", "enable:B pad1:B pad2:H cr:I")),
    CommandSpec(11, "CONTROL_MSR", vcpu=True, request=_l("kvmi_control_msr", "enable:B pad1:B pad2:H msr:I")),
    CommandSpec(12, "CONTROL_VE", vcpu=True),  # no layout in the v6 UAPI: always unsupported
    CommandSpec(13, "GET_REGISTERS", vcpu=True, request=_l("kvmi_get_registers", "nmsrs:H pad1:H pad2:I"),
                tail=Array("I", "nmsrs"), reply=GET_REGISTERS_REPLY_HEAD),
    CommandSpec(14, "SET_REGISTERS", vcpu=True, request=KVM_REGS),
    CommandSpec(15, "GET_CPUID", vcpu=True, request=_l("kvmi_get_cpuid", "function:I index:I"),
                reply=_l("kvmi_get_cpuid_reply", "eax:I ebx:I ecx:I edx:I")),
    CommandSpec(16, "GET_XSAVE", vcpu=True, reply_tail=Array("I")),
    CommandSpec(17, "READ_PHYSICAL", request=_l("kvmi_read_physical", "gpa:Q size:Q"), reply_tail=Array("B")),
    CommandSpec(18, "WRITE_PHYSICAL", request=_l("kvmi_write_physical", "gpa:Q size:Q"), tail=Array("B", "size")),
    CommandSpec(19, "INJECT_EXCEPTION", vcpu=True, request=_l(
        "kvmi_inject_exception", "nr:B has_error:B pad:H error_code:I address:Q")),
    CommandSpec(20, "GET_PAGE_ACCESS", request=_PAGE_ACCESS_HEAD, tail=Array("Q", "count"),
                reply_tail=Array("B")),
    CommandSpec(21, "SET_PAGE_ACCESS", request=_l("kvmi_set_page_access", "view:H count:H pad:I"),
                tail=Array(_PAGE_ACCESS_ENTRY, "count")),
    CommandSpec(22, "GET_MAP_TOKEN", reply=_l("kvmi_get_map_token_reply", "token:32s")),
    CommandSpec(23, "GET_MTRR_TYPE", vcpu=True, request=_l("kvmi_get_mtrr_type", "gpa:Q"),
                reply=_l("kvmi_get_mtrr_type_reply", "type:B pad:7s")),
    CommandSpec(24, "CONTROL_SPP", request=_l("kvmi_control_spp", "enable:B pad1:B pad2:H pad3:I")),
    CommandSpec(25, "GET_PAGE_WRITE_BITMAP", request=_l("kvmi_get_page_write_bitmap", "view:H count:H pad:I"),
                tail=Array("Q", "count"), reply_tail=Array("I")),
    CommandSpec(26, "SET_PAGE_WRITE_BITMAP", request=_l("kvmi_set_page_write_bitmap", "view:H count:H pad:I"),
                tail=Array(_WRITE_BITMAP_ENTRY, "count")),
    CommandSpec(27, "CONTROL_CMD_RESPONSE", request=_l("kvmi_control_cmd_response",
                                                       "enable:B now:B pad1:H pad2:I")),
    CommandSpec(29, "GET_MAX_GFN", reply=_l("kvmi_get_max_gfn_reply", "gfn:Q")),
]

_V6_EVENTS = [
    EventSpec(0, "UNHOOK", vm_event=True, needs_reply=False),
    EventSpec(1, "CR", _l("kvmi_event_cr", "cr:H pad:6s old_value:Q new_value:Q"),
              _l("kvmi_event_cr_reply", "new_val:Q")),
    EventSpec(2, "MSR", _l("kvmi_event_msr", "msr:I pad:I old_value:Q new_value:Q"),
              _l("kvmi_event_msr_reply", "new_val:Q")),
    EventSpec(3, "XSETBV"),
    EventSpec(4, "BREAKPOINT", _l("kvmi_event_breakpoint", "gpa:Q insn_len:B pad:7s")),
    EventSpec(5, "HYPERCALL"),
    EventSpec(6, "PF", _l("kvmi_event_pf", "gva:Q gpa:Q access:B pad1:B view:H pad2:I"),
              _l("kvmi_event_pf_reply", "ctx_addr:Q ctx_size:I singlestep:B rep_complete:B pad:H "
                                        "ctx_data:256s")),
    EventSpec(7, "TRAP", _l("kvmi_event_trap", "vector:I type:I error_code:I pad:I cr2:Q")),
    EventSpec(8, "DESCRIPTOR", _l("kvmi_event_descriptor", "descriptor:B write:B pad:6s")),
    EventSpec(9, "CREATE_VCPU", vm_event=True),
    EventSpec(10, "PAUSE_VCPU"),
    EventSpec(11, "SINGLESTEP"),
]

V6 = Dialect(
    name="kvmi-v6", version=1, event_reply_id=0, event_id=1,
    # libkvmi kvmi-v6 frames up to 2 pages (a full-page WRITE_PHYSICAL is 16 + 4096 bytes of payload)
    max_message=4096 * 2 - MSG_HDR.size,
    handshake_min=32, handshake_max=64 * 1024,  # libkvmi: offsetof(name) .. 64 KiB, extra bytes skipped
    commands={c.id: c for c in _V6_COMMANDS}, events={e.id: e for e in _V6_EVENTS},
    event_size=EVENT_COMMON.size + EventArch.SIZE,
)

ACTION_CONTINUE, ACTION_RETRY, ACTION_CRASH = 0, 1, 2
PAGE_ACCESS_R, PAGE_ACCESS_W, PAGE_ACCESS_X = 1, 2, 4
PAGE_SIZE = 4096

# --- framing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    id: int
    size: int
    seq: int


_HDR = struct.Struct("<HHI")  # kvmi_msg_hdr, packed directly: every message passes here twice


def encode_message(dialect: Dialect, msg_id: int, seq: int, payload: bytes) -> bytes:
    """``kvmi_msg_hdr`` + payload, refusing a payload over the dialect's limit."""
    if len(payload) > dialect.max_message:
        raise InvalidField(f"a {len(payload)}-byte message is over the {dialect.max_message}-byte limit",
                           what="kvmi_msg_hdr", field="size", value=len(payload), msg_id=msg_id, seq=seq)
    if not 0 <= msg_id <= 0xFFFF or not 0 <= seq <= 0xFFFF_FFFF:
        raise InvalidField(f"message id {msg_id} or seq {seq} out of range", what="kvmi_msg_hdr", msg_id=msg_id,
                           seq=seq)
    return _HDR.pack(msg_id, len(payload), seq) + payload


def decode_header(dialect: Dialect, data: bytes | bytearray | memoryview) -> Header:
    """A ``kvmi_msg_hdr`` (8 bytes); a size over the dialect's limit is malformed (the kernel closed)."""
    if len(data) != _HDR.size:
        raise MalformedMessage(f"kvmi_msg_hdr is 8 bytes, got {len(data)}", what="kvmi_msg_hdr", value=len(data))
    msg_id, size, seq = _HDR.unpack(data)
    if size > dialect.max_message:
        raise MalformedMessage(f"message {msg_id} (seq {seq}) declares {size} bytes, over the "
                               f"{dialect.max_message}-byte limit", what="kvmi_msg_hdr", field="size",
                               value=size, msg_id=msg_id, seq=seq)
    return Header(msg_id, size, seq)


def decode_error(payload: bytes | bytearray | memoryview) -> int:
    """The (negative or zero) code of a command reply's ``kvmi_error_code``; its padding must be zero."""
    if len(payload) < 8:
        raise MalformedMessage(f"a command reply starts with an 8-byte kvmi_error_code, got {len(payload)} bytes",
                               what="kvmi_error_code", value=len(payload))
    err, pad = _ERR.unpack_from(payload)
    if pad:
        raise InvalidField("kvmi_error_code.pad is not zero", what="kvmi_error_code", field="pad", value=pad)
    return int(err)


_ERR = struct.Struct("<iI")


# --- handshake ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestHello:
    """``kvmi_qemu2introspector``: who the VM is."""

    uuid: bytes
    start_time_ms: int
    name: str
    struct_size: int = QEMU2INTROSPECTOR.size


def encode_hello(hello: GuestHello) -> bytes:
    raw_name = hello.name.encode(errors="replace")[:63]  # NUL-terminated in 64 bytes
    if len(hello.uuid) != 16:
        raise InvalidField("the VM UUID is 16 bytes", what=QEMU2INTROSPECTOR.name, field="uuid", value=hello.uuid)
    return QEMU2INTROSPECTOR.pack(struct_size=QEMU2INTROSPECTOR.size, uuid=hello.uuid,
                                  start_time=hello.start_time_ms, name=raw_name)


def hello_size(dialect: Dialect, first4: bytes) -> int:
    """The total size an incoming ``kvmi_qemu2introspector`` declares in its first four bytes."""
    (size,) = struct.unpack("<I", first4)
    if not dialect.handshake_min <= size <= dialect.handshake_max:
        raise MalformedMessage(f"handshake struct_size {size} is outside {dialect.handshake_min}.."
                               f"{dialect.handshake_max}", what=QEMU2INTROSPECTOR.name, field="struct_size",
                               value=size)
    return size


def decode_hello(dialect: Dialect, data: bytes) -> GuestHello:
    """A whole incoming handshake (``hello_size`` bytes); bytes past what v6 knows are skipped and a shorter
    one (libkvmi accepts down to the name's offset) reads as zeros."""
    size = hello_size(dialect, data[:4])
    if len(data) != size:
        raise MalformedMessage(f"handshake declares {size} bytes, got {len(data)}", what=QEMU2INTROSPECTOR.name,
                               value=len(data))
    known = data[:QEMU2INTROSPECTOR.size].ljust(QEMU2INTROSPECTOR.size, b"\0")
    v = QEMU2INTROSPECTOR.unpack(known)
    name = v["name"].split(b"\0", 1)[0].decode(errors="replace")
    return GuestHello(v["uuid"], v["start_time"], name, size)


def cookie_hash(secret: bytes) -> bytes:
    """The 20-byte ``cookie_hash`` for a shared secret. libkvmi leaves the field to the application's
    handshake callback (its hookguest sends zeros); its size is a SHA-1 digest, which is what vmsight's
    two sides put there: SHA-1 over the secret's bytes."""
    return hashlib.sha1(secret).digest()


def encode_intro_reply(digest: bytes = b"") -> bytes:
    return INTROSPECTOR2QEMU.pack(struct_size=INTROSPECTOR2QEMU.size, cookie_hash=digest)


def decode_intro_reply(data: bytes) -> bytes:
    """The cookie hash of a 24-byte ``kvmi_introspector2qemu``."""
    v = INTROSPECTOR2QEMU.unpack_exact(data)
    if v["struct_size"] != INTROSPECTOR2QEMU.size:
        raise MalformedMessage(f"introspector handshake struct_size {v['struct_size']}, expected "
                               f"{INTROSPECTOR2QEMU.size}", what=INTROSPECTOR2QEMU.name, field="struct_size",
                               value=v["struct_size"])
    return bytes(v["cookie_hash"])


# --- commands ----------------------------------------------------------------------------------------------


@dataclass
class Request:
    """A decoded command: ``vcpu`` (vCPU commands), the fixed members, and the tail items (ints, dicts of
    entry members, or bytes for byte arrays)."""

    spec: CommandSpec
    vcpu: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    items: Sequence[Any] | bytes = ()


def _tail_items(arr: Array, data: memoryview, count: int | None, what: str) -> Sequence[Any] | bytes:
    size = arr.item_size
    if count is None:
        if len(data) % size:
            raise MalformedMessage(f"{what}: {len(data)} tail bytes is not a whole number of {size}-byte items",
                                   what=what, value=len(data))
        count = len(data) // size
    if count > arr.limit:
        raise MalformedMessage(f"{what}: {count} items, at most {arr.limit}", what=what, value=count)
    if len(data) != count * size:
        raise MalformedMessage(f"{what}: {count} items need {count * size} bytes, got {len(data)}", what=what,
                               value=len(data))
    if isinstance(arr.item, Layout):
        return [arr.item.unpack(data, i * size) for i in range(count)]
    if arr.item == "B":
        return bytes(data)
    return list(struct.unpack(f"<{count}{arr.item}", data))


def _pack_tail(arr: Array, items: Sequence[Any] | bytes, what: str) -> bytes:
    if len(items) > arr.limit:
        raise InvalidField(f"{what}: {len(items)} items, at most {arr.limit}", what=what, value=len(items))
    if isinstance(arr.item, Layout):
        if isinstance(items, bytes | bytearray):
            raise InvalidField(f"{what}: entries must be mappings", what=what)
        return b"".join(arr.item.pack(e) for e in cast(Sequence[Mapping[str, Any]], items))
    if arr.item == "B":
        return bytes(items)
    lo, hi = _INT_RANGE[arr.item]
    for v in items:
        if not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidField(f"{what}: item {v!r} is outside {lo}..{hi:#x}", what=what, value=v)
    return struct.pack(f"<{len(items)}{arr.item}", *items)


def encode_request(spec: CommandSpec, *, vcpu: int | None = None, fields: Mapping[str, Any] | None = None,
                   items: Sequence[Any] | bytes = ()) -> bytes:
    """A command's payload. A tail's count member is filled from ``items`` unless given."""
    out = b""
    if spec.vcpu:
        out += VCPU_HDR.pack(vcpu=vcpu or 0)
    vals = dict(fields or {})
    if spec.tail is not None and spec.tail.count_field is not None:
        vals.setdefault(spec.tail.count_field, len(items))
    if spec.request is not None:
        out += spec.request.pack(vals)
    if spec.tail is not None:
        out += _pack_tail(spec.tail, items, spec.name)
    return out


def decode_request(spec: CommandSpec, payload: bytes | bytearray | memoryview) -> Request:
    """A command's payload, size first (:class:`MalformedMessage` when it does not add up), then the
    members (:class:`InvalidField` for padding or a range)."""
    data = memoryview(payload)
    fixed = (VCPU_HDR.size if spec.vcpu else 0) + (spec.request.size if spec.request else 0)
    if len(data) < fixed or (spec.tail is None and len(data) != fixed):
        raise MalformedMessage(f"{spec.name} is {fixed}{'+' if spec.tail else ''} bytes, got {len(data)}",
                               what=spec.name, value=len(data), msg_id=spec.id)
    req = Request(spec)
    # Sizes are checked before any member, so a short message is always Malformed, never Invalid.
    if spec.tail is not None:
        count = None
        if spec.tail.count_field is not None:
            assert spec.request is not None
            raw = struct.unpack_from("<" + "".join(c for _, c in spec.request.members), data,
                                     fixed - spec.request.size)
            count = dict(zip((n for n, _ in spec.request.members), raw, strict=True))[spec.tail.count_field]
        req.items = _tail_items(spec.tail, data[fixed:], count, spec.name)
    off = 0
    if spec.vcpu:
        req.vcpu = VCPU_HDR.unpack(data)["vcpu"]
        off = VCPU_HDR.size
    if spec.request is not None:
        req.fields = spec.request.unpack(data, off)
    return req


_ERR_OK = ERROR_CODE.pack(err=0)


def encode_error(err: int) -> bytes:
    """``kvmi_error_code`` with ``-err`` (``err`` is a positive KVM_E* code, or 0)."""
    return _ERR_OK if err == 0 else ERROR_CODE.pack(err=-abs(err))


def encode_registers_reply(r: Registers) -> bytes:
    """GET_REGISTERS reply data: mode, kvm_regs, kvm_sregs, kvm_msrs with its entries."""
    return (GET_REGISTERS_REPLY_HEAD.pack(mode=r.mode) + KVM_REGS.pack(r.regs) + r.sregs.pack()
            + KVM_MSRS.pack(nmsrs=len(r.msrs)) + b"".join(KVM_MSR_ENTRY.pack(index=i, data=v)
                                                          for i, v in r.msrs.items()))


def decode_registers_reply(data: bytes | bytearray | memoryview, nmsrs: int) -> Registers:
    fixed = GET_REGISTERS_REPLY_HEAD.size + KVM_REGS.size + Sregs.SIZE + KVM_MSRS.size
    if len(data) != fixed + nmsrs * KVM_MSR_ENTRY.size:
        raise MalformedMessage(f"GET_REGISTERS reply with {nmsrs} MSRs is "
                               f"{fixed + nmsrs * KVM_MSR_ENTRY.size} bytes, got {len(data)}",
                               what="kvmi_get_registers_reply", value=len(data))
    mode = GET_REGISTERS_REPLY_HEAD.unpack(data)["mode"]
    regs = KVM_REGS.unpack(data, GET_REGISTERS_REPLY_HEAD.size)
    sregs = Sregs.unpack(data, GET_REGISTERS_REPLY_HEAD.size + KVM_REGS.size)
    n = KVM_MSRS.unpack(data, fixed - KVM_MSRS.size)["nmsrs"]
    if n != nmsrs:
        raise InvalidField(f"GET_REGISTERS reply holds {n} MSRs, {nmsrs} were asked for",
                           what="kvm_msrs", field="nmsrs", value=n)
    entries = [KVM_MSR_ENTRY.unpack(data, fixed + i * KVM_MSR_ENTRY.size) for i in range(nmsrs)]
    return Registers(mode, regs, sregs, {e["index"]: e["data"] for e in entries})


# --- events ------------------------------------------------------------------------------------------------


@dataclass
class Event:
    """A decoded ``kvmi_event`` with its arch block and event-specific data; ``seq`` is the message's."""

    spec: EventSpec
    vcpu: int
    arch: EventArch
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0


def encode_event(dialect: Dialect, spec: EventSpec, vcpu: int, arch: EventArch,
                 data: Mapping[str, Any] | None = None) -> bytes:
    common = EVENT_COMMON.pack(size=dialect.event_size, vcpu=vcpu, event=spec.id)
    return common + arch.pack() + (spec.data.pack(data or {}) if spec.data else b"")


def decode_event(dialect: Dialect, payload: bytes | bytearray | memoryview, seq: int = 0) -> Event:
    data = memoryview(payload)
    common = EVENT_COMMON.unpack(data)
    spec = dialect.events.get(common["event"])
    if spec is None:
        raise InvalidField(f"unknown event id {common['event']}", what="kvmi_event", field="event",
                           value=common["event"], seq=seq)
    if common["size"] != dialect.event_size:
        raise MalformedMessage(f"kvmi_event.size is {common['size']}, expected {dialect.event_size}",
                               what="kvmi_event", field="size", value=common["size"], seq=seq)
    want = dialect.event_size + (spec.data.size if spec.data else 0)
    if len(data) != want:
        raise MalformedMessage(f"{spec.name} event is {want} bytes, got {len(data)}", what="kvmi_event",
                               value=len(data), seq=seq)
    arch = EventArch.unpack(data, EVENT_COMMON.size)
    extra = spec.data.unpack(data, dialect.event_size) if spec.data else {}
    return Event(spec, common["vcpu"], arch, extra, seq)


@dataclass
class EventReply:
    vcpu: int
    action: int
    event: int
    data: dict[str, Any] = field(default_factory=dict)


def encode_event_reply(dialect: Dialect, reply: EventReply) -> bytes:
    spec = dialect.events.get(reply.event)
    if spec is None:
        raise InvalidField(f"unknown event id {reply.event}", what="kvmi_event_reply", field="event",
                           value=reply.event)
    if reply.action not in (ACTION_CONTINUE, ACTION_RETRY, ACTION_CRASH):
        raise InvalidField(f"event action {reply.action} is not CONTINUE, RETRY or CRASH",
                           what="kvmi_event_reply", field="action", value=reply.action)
    return (VCPU_HDR.pack(vcpu=reply.vcpu) + EVENT_REPLY.pack(action=reply.action, event=reply.event)
            + (spec.reply.pack(reply.data) if spec.reply else b""))


def decode_event_reply(dialect: Dialect, payload: bytes | bytearray | memoryview) -> EventReply:
    data = memoryview(payload)
    head = VCPU_HDR.size + EVENT_REPLY.size
    if len(data) < head:
        raise MalformedMessage(f"event reply is at least {head} bytes, got {len(data)}", what="kvmi_event_reply",
                               value=len(data))
    ev = struct.unpack_from("<B", data, VCPU_HDR.size + 1)[0]
    spec = dialect.events.get(ev)
    if spec is None:
        raise MalformedMessage(f"reply to unknown event id {ev}", what="kvmi_event_reply", field="event", value=ev)
    want = head + (spec.reply.size if spec.reply else 0)
    if len(data) != want:
        raise MalformedMessage(f"{spec.name} reply is {want} bytes, got {len(data)}", what="kvmi_event_reply",
                               value=len(data))
    vcpu = VCPU_HDR.unpack(data)["vcpu"]
    r = EVENT_REPLY.unpack(data, VCPU_HDR.size)
    if r["action"] not in (ACTION_CONTINUE, ACTION_RETRY, ACTION_CRASH):
        raise InvalidField(f"event action {r['action']} is not CONTINUE, RETRY or CRASH", what="kvmi_event_reply",
                           field="action", value=r["action"])
    extra = spec.reply.unpack(data, head) if spec.reply else {}
    return EventReply(vcpu, r["action"], ev, extra)


__all__ = [
    "ACTION_CONTINUE", "ACTION_CRASH", "ACTION_RETRY", "Array", "cookie_hash", "CommandSpec", "Dialect", "Event", "EventArch",
    "EventReply", "EventSpec", "GuestHello", "Header", "InvalidField", "KVM_EINVAL", "KVM_EOPNOTSUPP", "Layout",
    "MalformedMessage", "ProtocolError", "Registers", "Request", "Sregs", "V6", "decode_event",
    "decode_error", "decode_event_reply", "decode_header", "decode_hello", "decode_intro_reply", "decode_registers_reply",
    "decode_request", "encode_error", "encode_event", "encode_event_reply", "encode_hello", "encode_intro_reply",
    "encode_message", "encode_registers_reply", "encode_request",
]
