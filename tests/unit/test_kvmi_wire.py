"""KVMi v6 wire table and the VM side's command layer, on an in-memory RAM (issue 12).

Sizes are checked against the v6 UAPI numbers (KVMI-NOTES); every struct round-trips; malformed input is
refused with the typed errors only; and random bytes thrown at the command layer never raise anything else
and never change a byte outside the page a WRITE_PHYSICAL named."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsight.errors import PhysicalAddressError
from vmsight.kvmi import wire
from vmsight.kvmi.server import BadMsr, CommandLayer, Unsupported
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import BufferRam

V6 = wire.V6
PAGE = 4096

# --- layout sizes (v6 UAPI) ----------------------------------------------------------------------------------

SIZES = {
    wire.QEMU2INTROSPECTOR: 96, wire.INTROSPECTOR2QEMU: 24, wire.MSG_HDR: 8, wire.ERROR_CODE: 8,
    wire.VCPU_HDR: 8, wire.KVM_REGS: 144, wire.KVM_SEGMENT: 24, wire.KVM_DTABLE: 16, wire.EVENT_COMMON: 8,
    wire.EVENT_REPLY: 8, wire.KVM_MSR_ENTRY: 16, wire.KVM_MSRS: 8, wire.EVENT_MSRS: 72,
}
REQUEST_SIZES = {"CHECK_COMMAND": 8, "CHECK_EVENT": 8, "PAUSE_VCPU": 8, "CONTROL_VM_EVENTS": 8,
                 "CONTROL_EVENTS": 8, "CONTROL_CR": 8, "CONTROL_MSR": 8, "GET_REGISTERS": 8,
                 "SET_REGISTERS": 144, "GET_CPUID": 8, "READ_PHYSICAL": 16, "WRITE_PHYSICAL": 16,
                 "INJECT_EXCEPTION": 16, "GET_PAGE_ACCESS": 8, "SET_PAGE_ACCESS": 8, "GET_MTRR_TYPE": 8,
                 "CONTROL_SPP": 8, "CONTROL_CMD_RESPONSE": 8}
REPLY_SIZES = {"GET_VERSION": 8, "GET_GUEST_INFO": 16, "GET_VCPU_INFO": 8, "GET_CPUID": 16, "GET_MTRR_TYPE": 8,
               "GET_MAX_GFN": 8, "GET_REGISTERS": 8, "GET_MAP_TOKEN": 32}
EVENT_DATA = {"CR": 24, "MSR": 24, "BREAKPOINT": 16, "PF": 24, "TRAP": 24, "DESCRIPTOR": 8}
EVENT_REPLIES = {"CR": 8, "MSR": 8, "PF": 272}


def test_layout_sizes() -> None:
    for layout, size in SIZES.items():
        assert layout.size == size, layout.name
    assert wire.Sregs.SIZE == 312 and wire.EventArch.SIZE == 536 and V6.event_size == 544
    for name, size in REQUEST_SIZES.items():
        spec = V6.command(name)
        assert spec.request is not None and spec.request.size == size, name
    for name, size in REPLY_SIZES.items():
        spec = V6.command(name)
        assert spec.reply is not None and spec.reply.size == size, name
    for name, size in EVENT_DATA.items():
        data = V6.event(name).data
        assert data is not None and data.size == size, name
    for name, size in EVENT_REPLIES.items():
        reply = V6.event(name).reply
        assert reply is not None and reply.size == size, name
    ids = {c.name: c.id for c in V6.commands.values()}
    assert (ids["GET_VERSION"], ids["READ_PHYSICAL"], ids["CONTROL_CMD_RESPONSE"], ids["GET_MAX_GFN"]) == (2, 17, 27, 29)
    assert {e.name: e.id for e in V6.events.values()}["PAUSE_VCPU"] == 10


def test_cr3_offset_in_event() -> None:
    """KVMI-NOTES: cr3 sits at payload offset 400 of an event."""
    sregs = wire.Sregs(cr3=0x1234_5000)
    arch = wire.EventArch(8, dict.fromkeys(wire.REGS_NAMES, 0), sregs, dict.fromkeys(wire.EVENT_MSR_NAMES, 0))
    payload = wire.encode_event(V6, V6.event("PAUSE_VCPU"), 1, arch)
    assert len(payload) == 544
    assert struct.unpack_from("<Q", payload, 400)[0] == 0x1234_5000


# --- round trips -------------------------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)


def _strategy(layout: wire.Layout) -> st.SearchStrategy[dict[str, Any]]:
    members: dict[str, st.SearchStrategy[Any]] = {}
    for name, code in layout.members:
        if name.startswith("pad"):
            continue
        if code.endswith("s"):
            members[name] = st.binary(min_size=int(code[:-1]), max_size=int(code[:-1]))
        else:
            members[name] = st.integers(*wire._INT_RANGE[code])
    return st.fixed_dictionaries(members)


def _values(layout: wire.Layout, draw: st.DrawFn) -> dict[str, Any]:
    return draw(_strategy(layout))


LAYOUTS = [*SIZES, *(c.request for c in V6.commands.values() if c.request),
           *(c.reply for c in V6.commands.values() if c.reply),
           *(e.data for e in V6.events.values() if e.data), *(e.reply for e in V6.events.values() if e.reply)]


@given(st.data())
def test_every_layout_round_trips(data: st.DataObject) -> None:
    for layout in LAYOUTS:
        vals = data.draw(_strategy(layout), label=layout.name)
        raw = layout.pack(vals)
        assert len(raw) == layout.size
        assert layout.unpack_exact(raw) == vals
        if layout.size != len(layout.names) and any(n.startswith("pad") for n, _ in layout.members):
            # every padding byte is checked: set each one in turn
            for name, code in layout.members:
                if not name.startswith("pad"):
                    continue
                off = struct.calcsize("<" + "".join(c for n2, c in layout.members[:layout.members.index((name, code))]))
                bad = bytearray(raw)
                bad[off] = 1
                with pytest.raises(wire.InvalidField) as ei:
                    layout.unpack_exact(bytes(bad))
                assert ei.value.field == name


@st.composite
def _sregs(draw: st.DrawFn) -> wire.Sregs:
    s = wire.Sregs()
    for n in wire.SEGMENT_NAMES:
        s.segments[n] = _values(wire.KVM_SEGMENT, draw)
    s.gdt = _values(wire.KVM_DTABLE, draw)
    s.idt = _values(wire.KVM_DTABLE, draw)
    s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base = (draw(u64) for _ in range(7))
    s.interrupt_bitmap = (draw(u64), draw(u64), draw(u64), draw(u64))
    return s


@given(_sregs(), st.sampled_from([2, 4, 8]), st.lists(u64, min_size=18, max_size=18),
       st.dictionaries(st.integers(0, 0xFFFF_FFFF), u64, max_size=8), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF_FFFF))
def test_registers_and_events_round_trip(sregs: wire.Sregs, mode: int, gprs: list[int], msrs: dict[int, int],
                                         vcpu: int, seq: int) -> None:
    regs = dict(zip(wire.REGS_NAMES, gprs, strict=True))
    r = wire.Registers(mode, regs, sregs, msrs)
    assert wire.decode_registers_reply(wire.encode_registers_reply(r), len(msrs)) == r
    arch = wire.EventArch(mode, regs, sregs, dict(zip(wire.EVENT_MSR_NAMES, gprs, strict=False)))
    for spec in V6.events.values():
        data = {n: 1 for n in spec.data.names if n != "ctx_data"} if spec.data else {}
        ev = wire.decode_event(V6, wire.encode_event(V6, spec, vcpu, arch, data), seq)
        assert (ev.spec, ev.vcpu, ev.arch, ev.data, ev.seq) == (spec, vcpu, arch, data, seq)
        rdata = {"new_val": 5} if spec.name in ("CR", "MSR") else {}
        reply = wire.EventReply(vcpu, wire.ACTION_RETRY, spec.id, rdata)
        back = wire.decode_event_reply(V6, wire.encode_event_reply(V6, reply))
        assert back.vcpu == vcpu and back.action == 1 and back.event == spec.id
        defaults = {n: bytes(256) if n == "ctx_data" else 0 for n in spec.reply.names} if spec.reply else {}
        assert back.data == {**defaults, **rdata}


def test_handshake_round_trip_and_bounds() -> None:
    hello = wire.GuestHello(bytes(range(16)), 1_700_000_000_123, "guest-1")
    raw = wire.encode_hello(hello)
    assert len(raw) == 96 and raw[:4] == struct.pack("<I", 96) and raw[32:39] == b"guest-1"
    assert wire.decode_hello(V6, raw) == hello
    # a later QEMU's 104-byte handshake (trailing max_gpa) is accepted, the extra bytes skipped
    longer = struct.pack("<I", 104) + raw[4:] + struct.pack("<Q", 1 << 32)
    assert wire.decode_hello(V6, longer).name == "guest-1"
    for size in (31, 65537, 0):
        with pytest.raises(wire.MalformedMessage):
            wire.hello_size(V6, struct.pack("<I", size))
    with pytest.raises(wire.MalformedMessage):
        wire.decode_hello(V6, raw[:95])
    bad_pad = bytearray(raw)
    bad_pad[20] = 1
    with pytest.raises(wire.InvalidField) as ei:
        wire.decode_hello(V6, bytes(bad_pad))
    assert ei.value.field == "pad"
    digest = wire.cookie_hash(b"secret")
    assert len(digest) == 20 and wire.decode_intro_reply(wire.encode_intro_reply(digest)) == digest
    with pytest.raises(wire.MalformedMessage):
        wire.decode_intro_reply(struct.pack("<I", 23) + digest)
    with pytest.raises(wire.MalformedMessage):
        wire.decode_intro_reply(wire.encode_intro_reply()[:23])


def test_malformed_requests() -> None:
    rp = V6.command("READ_PHYSICAL")
    ok = wire.encode_request(rp, fields={"gpa": 0x1000, "size": 8})
    assert wire.decode_request(rp, ok).fields == {"gpa": 0x1000, "size": 8}
    for bad in (ok[:-1], ok + b"\0"):
        with pytest.raises(wire.MalformedMessage):
            wire.decode_request(rp, bad)
    gr = V6.command("GET_REGISTERS")
    req = wire.encode_request(gr, vcpu=1, items=[0xC0000080, 0xC0000100])
    assert len(req) == 8 + 8 + 8
    d = wire.decode_request(gr, req)
    assert (d.vcpu, d.fields, list(d.items)) == (1, {"nmsrs": 2}, [0xC0000080, 0xC0000100])
    with pytest.raises(wire.MalformedMessage):  # count says 2, one index present
        wire.decode_request(gr, req[:-4])
    with pytest.raises(wire.MalformedMessage):  # a short vcpu header is a size error, not padding
        wire.decode_request(gr, req[:5])
    corrupt = bytearray(req)
    corrupt[2] = 1  # vcpu_hdr padding
    with pytest.raises(wire.InvalidField) as ei:
        wire.decode_request(gr, bytes(corrupt))
    assert (ei.value.what, ei.value.field) == ("kvmi_vcpu_hdr", "pad1")
    wp = V6.command("WRITE_PHYSICAL")
    raw = wire.encode_request(wp, fields={"gpa": 0}, items=b"abc")
    assert wire.decode_request(wp, raw).items == b"abc"
    with pytest.raises(wire.MalformedMessage):
        wire.decode_request(wp, raw + b"d")
    with pytest.raises(wire.InvalidField):  # encoders refuse out-of-range values too
        wire.encode_request(rp, fields={"gpa": -1, "size": 1})
    with pytest.raises(wire.InvalidField):
        wire.encode_request(rp, fields={"gpa": 1 << 64, "size": 1})
    with pytest.raises(wire.InvalidField):
        wire.encode_request(rp, fields={"gva": 0})
    sp = V6.command("SET_PAGE_ACCESS")
    entries = [{"gpa": 0x1000, "access": 5}, {"gpa": 0x2000, "access": 7}]
    assert wire.decode_request(sp, wire.encode_request(sp, items=entries)).items == entries


def test_header_limits() -> None:
    assert wire.decode_header(V6, wire.MSG_HDR.pack(id=2, size=V6.max_message, seq=7)) == wire.Header(
        2, V6.max_message, 7)
    with pytest.raises(wire.MalformedMessage) as ei:
        wire.decode_header(V6, wire.MSG_HDR.pack(id=2, size=V6.max_message + 1, seq=7))
    assert (ei.value.msg_id, ei.value.seq) == (2, 7)
    with pytest.raises(wire.MalformedMessage):
        wire.decode_header(V6, b"\0" * 7)
    with pytest.raises(wire.InvalidField):
        wire.encode_message(V6, 2, 1, bytes(V6.max_message + 1))


def test_event_decode_refuses() -> None:
    arch = wire.EventArch(8, dict.fromkeys(wire.REGS_NAMES, 0), wire.Sregs(), dict.fromkeys(wire.EVENT_MSR_NAMES, 0))
    raw = wire.encode_event(V6, V6.event("CR"), 0, arch, {"cr": 3, "old_value": 1, "new_value": 2})
    with pytest.raises(wire.MalformedMessage):
        wire.decode_event(V6, raw[:-1])
    bad = bytearray(raw)
    bad[0] = 0x21  # kvmi_event.size
    with pytest.raises(wire.MalformedMessage):
        wire.decode_event(V6, bytes(bad))
    bad = bytearray(raw)
    bad[8] = 3  # arch.mode
    with pytest.raises(wire.InvalidField):
        wire.decode_event(V6, bytes(bad))
    bad = bytearray(raw)
    bad[4] = 200  # event id
    with pytest.raises(wire.InvalidField):
        wire.decode_event(V6, bytes(bad))
    reply = wire.encode_event_reply(V6, wire.EventReply(0, 0, 1, {"new_val": 2}))
    with pytest.raises(wire.MalformedMessage):
        wire.decode_event_reply(V6, reply[:-1])
    with pytest.raises(wire.InvalidField):
        wire.encode_event_reply(V6, wire.EventReply(0, 3, 1))


# --- the command layer on an in-memory RAM -----------------------------------------------------------------

# RAM at [0, 64 KiB) and [128 KiB, 192 KiB): a hole between, and nothing after. Buffer offsets: 0 and 64 KiB.
LAYOUT = RamLayout([RamRange(0, 0x10000, 0, "ram0"), RamRange(0x20000, 0x10000, 0x10000, "ram0")])


class FakeGuest:
    """RAM in a bytearray that records every access; two vCPUs; registers made up but consistent."""

    def __init__(self) -> None:
        self.buf = bytearray(bytes(range(256)) * (0x20000 // 256))
        self.ram = BufferRam(self.buf, LAYOUT)
        self.layout = LAYOUT
        self.accesses: list[tuple[str, int, int]] = []

    def vcpu_count(self) -> int:
        return 2

    def read_gpa(self, gpa: int, size: int) -> bytes:
        self.accesses.append(("r", gpa, size))
        return self.ram.read_gpa(gpa, size)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.accesses.append(("w", gpa, len(data)))
        self.ram.write_gpa(gpa, data)

    def tsc_speed(self, vcpu: int) -> int:
        if vcpu == 1:
            raise Unsupported("unknown")
        return 2_000_000_000

    def registers(self, vcpu: int, msrs: list[int]) -> wire.Registers:
        for m in msrs:
            if m != 0xC0000080:
                raise BadMsr(m)
        regs = {n: i + vcpu for i, n in enumerate(wire.REGS_NAMES)}
        return wire.Registers(8, regs, wire.Sregs(cr3=0x1000 * (vcpu + 1), efer=0xD01), dict.fromkeys(msrs, 0xD01))


def _msg(name: str, seq: int = 1, **kw: Any) -> tuple[wire.Header, bytes]:
    spec = V6.command(name)
    payload = wire.encode_request(spec, **kw)
    return wire.Header(spec.id, len(payload), seq), payload


def _reply(layer: CommandLayer, name: str, seq: int = 1, **kw: Any) -> tuple[int, bytes]:
    h, p = _msg(name, seq, **kw)
    out = layer.handle(h, p)
    head = wire.decode_header(V6, out[:8])
    assert (head.id, head.seq, head.size) == (h.id, seq, len(out) - 8)
    err = wire.ERROR_CODE.unpack(out, 8)["err"]
    if err:
        assert len(out) == 16, "an error reply carries no data"
    return err, out[16:]


def test_commands_served() -> None:
    g = FakeGuest()
    layer = CommandLayer(g)
    assert _reply(layer, "GET_VERSION") == (0, struct.pack("<II", 1, 0))
    assert _reply(layer, "GET_GUEST_INFO") == (0, struct.pack("<I12x", 2))
    assert _reply(layer, "GET_VCPU_INFO", vcpu=0) == (0, struct.pack("<Q", 2_000_000_000))
    assert _reply(layer, "GET_VCPU_INFO", vcpu=1)[0] == -wire.KVM_EOPNOTSUPP
    assert _reply(layer, "GET_VCPU_INFO", vcpu=2)[0] == -wire.KVM_EINVAL
    assert _reply(layer, "GET_MAX_GFN") == (0, struct.pack("<Q", 0x2F))
    for cid, served in ((2, True), (17, True), (27, True), (7, False), (21, False), (99, False)):
        assert _reply(layer, "CHECK_COMMAND", fields={"id": cid})[0] == (0 if served else -wire.KVM_EOPNOTSUPP)
    for eid in range(12):
        assert _reply(layer, "CHECK_EVENT", fields={"id": eid})[0] == -wire.KVM_EOPNOTSUPP
    assert _reply(layer, "CHECK_EVENT", fields={"id": 12})[0] == -wire.KVM_EINVAL
    for name, kw in (("PAUSE_VCPU", {"vcpu": 0}), ("SET_PAGE_ACCESS", {"items": [{"gpa": 0, "access": 5}]}),
                     ("GET_CPUID", {"vcpu": 0, "fields": {"function": 0}}), ("GET_XSAVE", {"vcpu": 0})):
        assert _reply(layer, name, **kw)[0] == -wire.KVM_EOPNOTSUPP, name
    # an id outside the table: error-only -EOPNOTSUPP, payload ignored
    out = layer.handle(wire.Header(28, 3, 9), b"xyz")
    assert out == wire.encode_message(V6, 28, 9, wire.encode_error(wire.KVM_EOPNOTSUPP))
    # non-zero padding: -EINVAL, the session goes on
    h, p = _msg("CHECK_COMMAND", fields={"id": 2})
    assert layer.handle(h, p[:2] + b"\1" + p[3:])[8:12] == struct.pack("<i", -wire.KVM_EINVAL)


def test_read_write_physical() -> None:
    g = FakeGuest()
    layer = CommandLayer(g)
    assert _reply(layer, "READ_PHYSICAL", fields={"gpa": 0x20FF0, "size": 16}) == (0, bytes(g.buf[0x10FF0:0x11000]))
    assert _reply(layer, "READ_PHYSICAL", fields={"gpa": 0x1000, "size": PAGE}) == (0, bytes(g.buf[0x1000:0x2000]))
    for gpa, size, err in ((0x1FF8, 16, wire.KVM_EINVAL), (0, 0, wire.KVM_EINVAL), (0, PAGE + 1, wire.KVM_EINVAL),
                           (0x10000, 8, wire.KVM_ENOENT), (0x30000, 8, wire.KVM_ENOENT),
                           ((1 << 64) - 8, 8, wire.KVM_ENOENT)):
        assert _reply(layer, "READ_PHYSICAL", fields={"gpa": gpa, "size": size})[0] == -err, (gpa, size)
    before = bytes(g.buf)
    assert _reply(layer, "WRITE_PHYSICAL", fields={"gpa": 0x20010}, items=b"\xcc\xcc")[0] == 0
    assert g.buf[0x10010:0x10012] == b"\xcc\xcc" and g.buf[:0x10010] == before[:0x10010]
    assert g.buf[0x10012:] == before[0x10012:]
    assert _reply(layer, "WRITE_PHYSICAL", fields={"gpa": 0xFFFF}, items=b"ab")[0] == -wire.KVM_EINVAL
    assert _reply(layer, "WRITE_PHYSICAL", fields={"gpa": 0x10000}, items=b"ab")[0] == -wire.KVM_ENOENT
    assert [a for a in g.accesses if a[0] == "w"] == [("w", 0x20010, 2)]


def test_get_registers() -> None:
    layer = CommandLayer(FakeGuest())
    err, data = _reply(layer, "GET_REGISTERS", vcpu=1, items=[0xC0000080])
    r = wire.decode_registers_reply(data, 1)
    assert err == 0 and r.mode == 8 and r.sregs.cr3 == 0x2000 and r.msrs == {0xC0000080: 0xD01}
    assert r.regs["rflags"] == 17 + 1
    assert _reply(layer, "GET_REGISTERS", vcpu=0, items=[0x10])[0] == -wire.KVM_EINVAL
    assert _reply(layer, "GET_REGISTERS", vcpu=0, items=[0xC0000080] * 600)[0] == -wire.KVM_E2BIG


def test_hookguest_batch_suppresses_replies() -> None:
    """hookguest's batch: CONTROL_CMD_RESPONSE(0, now), PAUSE_VCPU x N, CONTROL_CMD_RESPONSE(1, now):
    only the last is answered."""
    layer = CommandLayer(FakeGuest())
    assert layer.handle(*_msg("CONTROL_CMD_RESPONSE", 1, fields={"enable": 0, "now": 1})) == b""
    assert layer.handle(*_msg("PAUSE_VCPU", 2, vcpu=0, fields={"wait": 1})) == b""
    assert layer.handle(*_msg("GET_VERSION", 3)) == b""
    assert _reply(layer, "CONTROL_CMD_RESPONSE", 4, fields={"enable": 1, "now": 1}) == (0, b"")
    # now=0: the setting applies after this reply
    assert _reply(layer, "CONTROL_CMD_RESPONSE", 5, fields={"enable": 0, "now": 0}) == (0, b"")
    assert layer.handle(*_msg("GET_VERSION", 6)) == b""
    assert layer.handle(*_msg("CONTROL_CMD_RESPONSE", 7, fields={"enable": 1, "now": 0})) == b""
    assert _reply(layer, "GET_VERSION", 8)[0] == 0
    assert _reply(layer, "CONTROL_CMD_RESPONSE", 9, fields={"enable": 2, "now": 1})[0] == -wire.KVM_EINVAL


def test_session_closing_messages() -> None:
    layer = CommandLayer(FakeGuest())
    for h, p in ((wire.Header(0, 16, 1), bytes(16)), (wire.Header(1, 0, 1), b""),
                 (wire.Header(17, 15, 1), bytes(15)), (wire.Header(17, 17, 1), bytes(17)),
                 (wire.Header(13, 12, 1), struct.pack("<HHIHHI", 0, 0, 0, 5, 0, 0)[:12])):
        with pytest.raises(wire.MalformedMessage):
            layer.handle(h, p)


# --- property: random input at the command layer -----------------------------------------------------------

# READ/WRITE_PHYSICAL (17, 18) half of the time: they are the ones that touch RAM
_IDS = st.one_of(st.sampled_from([17, 18]), st.sampled_from([*V6.commands, 0, 1, 28, 30, 0xFFFF]))


@st.composite
def _messages(draw: st.DrawFn) -> tuple[wire.Header, bytes]:
    msg_id = draw(_IDS)
    spec = V6.commands.get(msg_id)
    if spec is not None and draw(st.booleans()):
        # mostly well-formed with random members: reaches the handlers, not only the size checks
        fixed = (8 if spec.vcpu else 0) + (spec.request.size if spec.request else 0)
        payload = bytearray(draw(st.binary(min_size=fixed, max_size=fixed)))
        if spec.name in ("READ_PHYSICAL", "WRITE_PHYSICAL"):
            gpa = draw(st.one_of(st.integers(0, 0x31000), st.integers(0, 0x31).map(lambda p: p * PAGE),
                                 st.integers(0, 0x31).map(lambda p: p * PAGE + PAGE - 8), u64))
            size = draw(st.sampled_from([0, 1, 8, 255, PAGE, PAGE + 1, 1 << 63]))
            payload[:16] = struct.pack("<QQ", gpa, size)
            if spec.name == "WRITE_PHYSICAL" and size <= PAGE:
                payload += draw(st.binary(min_size=size, max_size=size))
        if draw(st.booleans()):  # padding right, most of the time
            for i in range(len(payload)):
                if i not in range(16) or spec.name not in ("READ_PHYSICAL", "WRITE_PHYSICAL"):
                    payload[i] = payload[i] if draw(st.booleans()) else 0
        payload_b = bytes(payload)
    else:
        payload_b = draw(st.binary(max_size=300))
    size = len(payload_b) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFF))
    return wire.Header(msg_id, size, draw(st.integers(0, 0xFFFF_FFFF))), payload_b


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages(), min_size=1, max_size=12))
def test_random_messages_never_escape(msgs: list[tuple[wire.Header, bytes]]) -> None:
    g = FakeGuest()
    layer = CommandLayer(g)
    for header, payload in msgs:
        before = bytes(g.buf)
        n_access = len(g.accesses)
        try:
            out = layer.handle(header, payload)
        except wire.ProtocolError:
            assert bytes(g.buf) == before
            break  # the session closes here
        if out:
            h = wire.decode_header(V6, out[:8])
            assert (h.id, h.seq) == (header.id, header.seq) and h.size == len(out) - 8
        changed = [i for i in range(len(before)) if before[i] != g.buf[i]] if bytes(g.buf) != before else []
        new = g.accesses[n_access:]
        for kind, gpa, size in new:
            assert 0 < size <= PAGE and gpa // PAGE == (gpa + size - 1) // PAGE, (kind, gpa, size)
            LAYOUT.check(gpa, size)  # RAM only
        if changed:
            # only a WRITE_PHYSICAL changes RAM, and only the bytes its request named, with its data
            assert header.id == 18 and len(new) == 1 and new[0][0] == "w"
            gpa, size = struct.unpack_from("<QQ", payload)
            assert new[0] == ("w", gpa, size)
            r = LAYOUT.find(gpa)
            assert r is not None
            off = r.offset + gpa - r.gpa
            assert off <= changed[0] and changed[-1] < off + size
            assert g.buf[off:off + size] == payload[16:16 + size]


def test_fake_guest_refuses_holes() -> None:
    """The property test's bound check is real: the fake RAM refuses the hole."""
    with pytest.raises(PhysicalAddressError):
        FakeGuest().read_gpa(0x10000, 1)
