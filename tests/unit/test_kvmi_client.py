"""The Introspector client and the VM side's Session over a real unix socket, with the in-memory guest of
test_kvmi_wire (issue 12): handshake and cookie, (id, seq) matching with events queued meanwhile, and
sessions ending on bad input without raising."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_kvmi_wire import LAYOUT, FakeGuest
from vmsight.kvmi import CommandError, Introspector, wire
from vmsight.kvmi.server import Session
from vmsight.kvmi.transport import TransportError, parse_address

V6 = wire.V6
HELLO = wire.GuestHello(bytes(range(16)), 1_700_000_000_000, "fake")


class Served:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.reason: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.reason = self.session.serve()


@pytest.fixture()
def pair() -> Iterator[tuple[Introspector, Served, FakeGuest]]:
    guest = FakeGuest()
    with Introspector() as intro:
        s = Session(str(intro.address), guest, HELLO)
        connector = threading.Thread(target=s.connect)
        connector.start()
        assert intro.accept(5.0) == HELLO
        connector.join()
        served = Served(s)
        served.thread.start()
        yield intro, served, guest
    served.thread.join(5.0)
    assert not served.thread.is_alive()


def test_private_socket_and_commands(pair: tuple[Introspector, Served, FakeGuest]) -> None:
    intro, served, guest = pair
    path = intro.address.unix_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert intro.get_version() == 1 and intro.get_guest_info() == 2 and intro.get_max_gfn() == 0x2F
    assert intro.read_physical(0x20000, 8) == bytes(guest.buf[0x10000:0x10008])
    intro.write_physical(0x20000, b"\x90")
    assert guest.buf[0x10000] == 0x90
    assert intro.check_command(17) and not intro.check_command(7) and not intro.check_event(10)
    r = intro.get_registers(0, [0xC0000080])
    assert r.sregs.cr3 == 0x1000 and r.msrs == {0xC0000080: 0xD01}
    with pytest.raises(CommandError) as ei:
        intro.read_physical(0x10000, 8)
    assert ei.value.err == -wire.KVM_ENOENT and ei.value.errno_name == "ENOENT"
    with pytest.raises(CommandError) as ei:
        intro.call("PAUSE_VCPU", vcpu=0, fields={"wait": 1})
    assert ei.value.err == -wire.KVM_EOPNOTSUPP
    # hookguest's batch, in one write: only the re-enabling CONTROL_CMD_RESPONSE is answered
    h1, m1 = intro.frame("CONTROL_CMD_RESPONSE", fields={"enable": 0, "now": 1})
    _, m2 = intro.frame("GET_VERSION")
    h3, m3 = intro.frame("CONTROL_CMD_RESPONSE", fields={"enable": 1, "now": 1})
    intro.send_raw(m1 + m2 + m3)
    assert intro.wait_reply(h3) == b""
    assert intro.get_version() == 1  # in step: nothing else was queued
    intro.close()
    served.thread.join(5.0)
    assert served.reason == "the introspector hung up"


def test_malformed_message_ends_session(pair: tuple[Introspector, Served, FakeGuest]) -> None:
    intro, served, guest = pair
    before = bytes(guest.buf)
    intro.send_raw(wire.MSG_HDR.pack(id=17, size=15, seq=1) + bytes(15))  # READ_PHYSICAL is 16 bytes
    served.thread.join(5.0)
    assert served.reason is not None and served.reason.startswith("protocol error")
    assert bytes(guest.buf) == before
    with pytest.raises((TransportError, OSError)):
        intro.get_version()


def test_short_message_ends_session(pair: tuple[Introspector, Served, FakeGuest]) -> None:
    intro, served, _ = pair
    intro.send_raw(wire.MSG_HDR.pack(id=18, size=100, seq=1) + bytes(10))
    assert intro.sock is not None
    intro.sock.shutdown(socket.SHUT_WR)
    served.thread.join(5.0)
    assert served.reason is not None and served.reason.startswith("short message")


def _fake_vm(address: str, script: list[bytes], received: list[bytes]) -> threading.Thread:
    """A raw VM side: handshake, then for each scripted blob, read one command and send the blob."""

    def run() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(parse_address(address).unix_path)
        s.sendall(wire.encode_hello(HELLO))
        received.append(s.recv(24, socket.MSG_WAITALL))
        for blob in script:
            head = s.recv(8, socket.MSG_WAITALL)
            h = wire.decode_header(V6, head)
            s.recv(h.size, socket.MSG_WAITALL) if h.size else b""
            s.sendall(blob.replace(b"SEQ!", struct.pack("<I", h.seq)))
        s.recv(1)
        s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _arch() -> wire.EventArch:
    return wire.EventArch(8, dict.fromkeys(wire.REGS_NAMES, 7), wire.Sregs(cr3=0x5000),
                          dict.fromkeys(wire.EVENT_MSR_NAMES, 0))


def test_events_are_queued_while_waiting_for_a_reply() -> None:
    event = wire.encode_message(V6, 1, 77, wire.encode_event(V6, V6.event("PAUSE_VCPU"), 1, _arch()))
    reply = wire.MSG_HDR.pack(id=2, size=16, seq=0)[:4] + b"SEQ!" + wire.encode_error(0) + struct.pack("<II", 1, 0)
    received: list[bytes] = []
    with Introspector(secret=b"s3cret") as intro:
        t = _fake_vm(str(intro.address), [event + reply], received)
        intro.accept(5.0)
        assert intro.get_version() == 1
        assert received == [wire.encode_intro_reply(wire.cookie_hash(b"s3cret"))]
        ev = intro.wait_event(1.0)
        assert (ev.spec.name, ev.vcpu, ev.seq, ev.arch.sregs.cr3, ev.arch.regs["rip"]) == ("PAUSE_VCPU", 1, 77, 0x5000, 7)
        assert intro.sock is not None
        intro.sock.close()
        intro.sock = None
        t.join(5.0)


def test_mismatched_reply_is_a_protocol_error() -> None:
    wrong = wire.MSG_HDR.pack(id=5, size=8, seq=12345) + wire.encode_error(0)
    with Introspector() as intro:
        t = _fake_vm(str(intro.address), [wrong], [])
        intro.accept(5.0)
        with pytest.raises(wire.ProtocolError) as ei:
            intro.get_version()
        assert (ei.value.msg_id, ei.value.seq) == (5, 12345)
        intro.close()
        t.join(5.0)


def test_cookie_hash_is_checked_by_the_vm_side() -> None:
    for intro_secret, vm_secret, ok in ((b"k", b"k", True), (b"k", b"other", False), (None, b"k", False),
                                        (b"k", None, True)):
        with Introspector(secret=intro_secret) as intro:
            s = Session(str(intro.address), FakeGuest(), HELLO, secret=vm_secret, timeout=5.0)
            errors: list[Exception] = []

            def connect(sess: Session = s, errs: list[Exception] = errors) -> None:
                try:
                    sess.connect()
                except TransportError as e:
                    errs.append(e)

            t = threading.Thread(target=connect)
            t.start()
            intro.accept(5.0)
            t.join(5.0)
            assert (not errors) == ok, (intro_secret, vm_secret, errors)
            if errors:
                assert "wrong cookie hash" in str(errors[0])
            s.close()


def test_addresses() -> None:
    assert parse_address("/run/x.sock").unix_path == "/run/x.sock"
    assert parse_address("unix:/run/x.sock").unix_path == "/run/x.sock"
    a = parse_address("vsock:any:1234")
    assert (a.cid, a.port) == (0xFFFF_FFFF, 1234) and str(parse_address("vsock:3:9")) == "vsock:3:9"
    for bad in ("vsock:3", "vsock:x:1", "vsock:3:0", "unix:", "unix:/" + "a" * 120):
        with pytest.raises(TransportError):
            parse_address(bad)


def _drain(sock: socket.socket, out: list[bytes]) -> None:
    try:
        while chunk := sock.recv(65536):
            out.append(chunk)
    except ConnectionResetError:  # the VM side closed with our bytes unread (a protocol error mid-stream)
        pass


_FRAMES = st.one_of(
    st.binary(max_size=64),  # noise
    st.builds(lambda i, n, s, p: wire.MSG_HDR.pack(id=i, size=n, seq=s) + p,  # a header, maybe lying about size
              st.sampled_from([0, 1, 2, 3, 5, 13, 17, 18, 27, 29, 99]), st.integers(0, 40),
              st.integers(0, 0xFFFF_FFFF), st.binary(max_size=40)),
    st.builds(lambda gpa, data: wire.MSG_HDR.pack(id=18, size=16 + len(data), seq=1)  # well-formed writes
              + struct.pack("<QQ", gpa, len(data)) + data,
              st.integers(0, 0x31000), st.binary(min_size=1, max_size=64)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_FRAMES, max_size=20))
def test_random_streams_end_the_session_cleanly(frames: list[bytes]) -> None:
    """Any byte stream from the introspector: serve() returns a reason (never raises), and every RAM access
    it made was inside one page of RAM."""
    guest = FakeGuest()
    a, b = socket.socketpair()
    s = Session("unix:/nonexistent", guest, HELLO)
    s.sock = a
    replies: list[bytes] = []
    t = threading.Thread(target=_drain, args=(b, replies), daemon=True)
    t.start()
    b.sendall(b"".join(frames))
    b.shutdown(socket.SHUT_WR)
    reason = s.serve()
    t.join(5.0)
    b.close()
    assert isinstance(reason, str) and reason
    for _kind, gpa, size in guest.accesses:
        assert 0 < size <= 4096 and gpa // 4096 == (gpa + size - 1) // 4096
        LAYOUT.check(gpa, size)
    # the replies are whole messages
    out = b"".join(replies)
    while out:
        h = wire.decode_header(V6, out[:8])
        assert len(out) >= 8 + h.size
        out = out[8 + h.size:]


def test_listen_refuses_an_existing_path_and_leaves_it(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_bytes(b"not ours")
    with pytest.raises(TransportError, match="cannot listen"):
        Introspector(f"unix:{taken}")
    assert taken.read_bytes() == b"not ours"
    with Introspector(f"unix:{tmp_path / 'k.sock'}") as intro:
        assert stat.S_ISSOCK(os.stat(tmp_path / "k.sock").st_mode)
        assert stat.S_IMODE(os.stat(tmp_path / "k.sock").st_mode) == 0o600
        assert intro.address.unix_path == str(tmp_path / "k.sock")
    assert not (tmp_path / "k.sock").exists()
