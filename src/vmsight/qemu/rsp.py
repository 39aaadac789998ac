"""GDB remote serial protocol client for QEMU's gdbstub (FIELD-NOTES: all-stop only, acks required,
``m`` <= 0x800 bytes, registers need target.xml first, multiprocess thread ids ``p01.02``).

Requests can be pipelined (:meth:`GdbStub.pipeline`): QEMU answers in order, which is ~5x faster for bulk
memory reads. Any packet sent while the guest runs stops it and is discarded, so callers must only talk
to the stub while the VM is stopped (``vmsight.vm.VM.paused`` arranges that)."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from types import FrameType

from vmsight.errors import GdbStubError, TargetError
from vmsight.qemu.qmp import connect_unix, tcp_address

log = logging.getLogger(__name__)

MAX_MEM_PACKET = 0x800
MAX_PACKET = 1 << 16     # bytes of one received packet, framing included; QEMU's own limit is 4 KiB
_HEX2 = re.compile(rb"[0-9a-fA-F]{2}")


@dataclass(frozen=True)
class RegisterInfo:
    name: str
    regnum: int
    bitsize: int
    offset: int  # byte offset in the 'g' packet


@dataclass(frozen=True)
class StopReply:
    """A decoded stop reply: ``T05thread:p01.02;watch:ffff...;`` etc."""

    signal: int
    thread: str | None
    kind: str | None        # "watch", "rwatch", "awatch", "swbreak", "hwbreak", or None
    address: int | None     # watchpoint start address
    raw: str
    exited: bool = False


def _exchange_code() -> tuple[tuple[str, ...], frozenset[str]]:
    import asyncio

    import qemu.qmp

    import vmsight.qemu.qmp

    dirs = tuple(os.path.dirname(m.__file__) + os.sep for m in (asyncio, qemu.qmp) if m.__file__)
    return dirs, frozenset(f for f in (vmsight.qemu.qmp.__file__, __file__) if f)


_EXCHANGE_DIRS, _EXCHANGE_FILES = _exchange_code()


def in_exchange(frame: FrameType | None) -> bool:
    """Whether a signal handler's ``frame`` interrupted a QMP or gdbstub exchange (asyncio, qemu.qmp, our
    QMP and RSP clients): an exception raised there leaves the session out of step, and the clean-up that
    needs it with it."""
    for _ in range(512):
        if frame is None:
            return False
        name = frame.f_code.co_filename
        if name in _EXCHANGE_FILES or name.startswith(_EXCHANGE_DIRS):
            return True
        frame = frame.f_back
    return False


def frame(payload: str | bytes) -> bytes:
    """One RSP packet: ``$`` escaped payload ``#`` checksum."""
    body = escape(payload.encode("latin-1") if isinstance(payload, str) else payload)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


def stub_socket(address: str, timeout: float) -> socket.socket:
    """A connected socket to a gdbstub at a unix path or ``tcp:HOST:PORT``, errors naming the fix."""
    if address.startswith("tcp:"):
        try:
            return socket.create_connection(tcp_address(address), timeout)
        except OSError as e:
            raise TargetError(f"cannot connect to gdbstub at {address}: {e}") from None
    return connect_unix(address, timeout)


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo '}' escaping and '*' run-length encoding of a received packet body."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x7D and i + 1 < n:
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < n:  # '*': repeat previous char (count - 29) times
            out += bytes([out[-1]]) * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def parse_stop_reply(text: str) -> StopReply:
    """Decode a stop reply (``T05thread:p01.02;watch:ffff...;``, ``S05``, ``W00``); RspProtocolError for
    anything else (the peer is untrusted)."""
    try:
        if text.startswith(("W", "X")):
            return StopReply(int(text[1:3], 16), None, None, None, text, exited=True)
        if not text.startswith(("T", "S")) or len(text) < 3:
            raise RspProtocolError(f"unexpected stop reply {text[:40]!r}", text)
        sig = int(text[1:3], 16)
        thread = kind = None
        addr = None
        for field in text[3:].split(";"):
            if ":" not in field:
                continue
            k, v = field.split(":", 1)
            if k == "thread":
                thread = v
            elif k in ("watch", "rwatch", "awatch"):
                kind, addr = k, int(v, 16)
            elif k in ("swbreak", "hwbreak"):
                kind = k
    except ValueError:
        raise RspProtocolError(f"malformed stop reply {text[:40]!r}", text) from None
    return StopReply(sig, thread, kind, addr, text)


class RspProtocolError(GdbStubError):
    """The peer broke RSP framing (an oversized packet, a malformed stop reply): the session is out of
    step and cannot be trusted any more."""


class RspConnection:
    """RSP framing over one connected stream socket: the only packet reader and writer (the gdbstub client,
    the event dispatcher and the SIGKILL watchdog all use it). Every received packet is acked (``+``) or,
    on a bad checksum, refused (``-``: QEMU sends it again); bytes outside packets (the peer's acks) are
    skipped. The peer is untrusted: a packet longer than :data:`MAX_PACKET` raises RspProtocolError
    instead of growing the buffer."""

    def __init__(self, sock: socket.socket, timeout: float = 3.0) -> None:
        self._sock = sock
        self.timeout = timeout
        self._buf = b""

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(1 << 20)
        except TimeoutError:
            raise
        except OSError as e:
            raise GdbStubError(f"gdbstub connection failed: {e}") from None
        if not chunk:
            raise GdbStubError("gdbstub closed the connection (QEMU exited?)")
        self._buf += chunk

    def recv_packet(self, timeout: float | None = None) -> str:
        """The next packet's payload (unescaped), acked; TimeoutError if none is complete in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            start = self._buf.find(b"$")
            if start < 0:
                self._buf = b""       # acks and noise between packets: nothing to keep
            else:
                if start:
                    self._buf = self._buf[start:]
                end = self._buf.find(b"#", 1, MAX_PACKET + 1)
                if end < 0 and len(self._buf) > MAX_PACKET:
                    self._buf = b""
                    raise RspProtocolError(f"the gdbstub sent a packet longer than {MAX_PACKET} bytes (QEMU "
                                           "sends at most 4 KiB): not a QEMU gdbstub, or a broken one")
                if end >= 0 and len(self._buf) >= end + 3:
                    body = self._buf[1:end]
                    cs = self._buf[end + 1:end + 3]
                    self._buf = self._buf[end + 3:]
                    if _HEX2.fullmatch(cs) is None or int(cs, 16) != checksum(body):
                        self._sock.sendall(b"-")
                        continue
                    self._sock.sendall(b"+")
                    return unescape(body).decode("latin-1")
            self._fill(deadline)

    def send(self, payload: str | bytes) -> None:
        """Send a packet without waiting for its reply (acks are skipped when replies are read)."""
        self._sock.sendall(frame(payload))

    def send_break(self) -> None:
        """Send ^C (a bare byte, not a packet): stops a running VM (its stop reply comes later); QEMU
        ignores it when the VM is stopped already."""
        self._sock.sendall(b"\x03")

    def request(self, payload: str | bytes, timeout: float | None = None) -> str:
        self.send(payload)
        return self.recv_packet(timeout)

    def close(self) -> None:
        self._sock.close()


class GdbStub(RspConnection):
    """One gdbstub connection. ``address`` is a unix socket path or ``tcp:HOST:PORT``; ``sock``, a
    stream already connected to it (tests: one end of a socketpair)."""

    def __init__(self, address: str, timeout: float = 3.0, *, sock: socket.socket | None = None) -> None:
        super().__init__(stub_socket(address, timeout) if sock is None else sock, timeout)
        self.address = address
        self.pushed_stop: StopReply | None = None
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # Connecting stops a running VM and QEMU pushes a stop reply; none comes if it was stopped already.
        try:
            self.pushed_stop = parse_stop_reply(self.recv_packet(0.3))
        except TimeoutError:
            pass
        try:
            self.features = self.request("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
        except TimeoutError:
            self._sock.close()
            raise GdbStubError(f"gdbstub at {address} does not answer: another debugger is attached "
                               "(QEMU's stub serves one client; detach it first). QEMU keeps this attempt "
                               "queued and will stop the VM when the other debugger leaves: resume it then "
                               "(QMP cont)") from None
        self.multiprocess = "multiprocess+" in self.features
        self.registers = self._fetch_target_description()
        self.g_size = sum(r.bitsize // 8 for r in self.registers)
        self._by_name = {r.name: r for r in self.registers}

    # --- packets -------------------------------------------------------------------------------------

    def pipeline(self, payloads: list[str], window: int = 32) -> list[str]:
        """Send requests with up to ``window`` in flight; replies in order."""
        out: list[str] = []
        sent = 0
        while len(out) < len(payloads):
            while sent < len(payloads) and sent - len(out) < window:
                self.send(payloads[sent])
                sent += 1
            out.append(self.recv_packet())
        return out

    # --- target description and registers ------------------------------------------------------------

    def _xfer(self, annex: str) -> str:
        data, offset = "", 0
        while True:
            reply = self.request(f"qXfer:features:read:{annex}:{offset:x},ffb")
            if not reply or reply[0] not in "lm":
                raise GdbStubError(f"cannot read target description {annex}: {reply!r}", reply)
            data += reply[1:]
            offset += len(reply) - 1
            if reply[0] == "l":
                return data

    def _fetch_target_description(self) -> list[RegisterInfo]:
        regs: list[RegisterInfo] = []
        pending = ["target.xml"]
        seen: set[str] = set()
        next_num = 0
        while pending:
            annex = pending.pop(0)
            if annex in seen:
                continue
            seen.add(annex)
            text = re.sub(r"<!DOCTYPE[^>]*>", "", self._xfer(annex))
            root = ET.fromstring(re.sub(r"<(/?)xi:", r"<\1", text))  # the xi: prefix is never declared
            for el in root.iter():
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "include":
                    pending.append(el.attrib["href"])
                elif tag == "reg":
                    num = int(el.attrib.get("regnum", next_num))
                    regs.append(RegisterInfo(el.attrib["name"], num, int(el.attrib["bitsize"]), 0))
                    next_num = num + 1
        regs.sort(key=lambda r: r.regnum)
        out, off = [], 0
        for r in regs:
            out.append(RegisterInfo(r.name, r.regnum, r.bitsize, off))
            off += r.bitsize // 8
        return out

    def register_info(self, name: str) -> RegisterInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise GdbStubError(f"the gdbstub has no register {name!r}") from None

    def select_thread(self, thread: str) -> None:
        reply = self.request(f"Hg{thread}")
        if reply != "OK":
            raise GdbStubError(f"cannot select vCPU thread {thread}: {reply!r}", reply)

    def read_all_registers(self) -> dict[str, int]:
        """All registers of the selected thread via ``g``; x87/xmm registers as ints (little-endian)."""
        reply = self.request("g")
        raw = bytes.fromhex(reply) if reply and reply[0] != "E" else b""
        if len(raw) < self.g_size:
            raise GdbStubError(f"short 'g' reply ({len(raw)} of {self.g_size} bytes)", reply[:20])
        return {r.name: int.from_bytes(raw[r.offset:r.offset + r.bitsize // 8], "little") for r in self.registers}

    def read_register(self, name: str) -> int:
        r = self.register_info(name)
        reply = self.request(f"p{r.regnum:x}")
        if not reply or reply[0] == "E":
            raise GdbStubError(f"cannot read register {name}: {reply!r}", reply)
        return int.from_bytes(bytes.fromhex(reply), "little")

    def write_register(self, name: str, value: int) -> None:
        r = self.register_info(name)
        data = (value & ((1 << r.bitsize) - 1)).to_bytes(r.bitsize // 8, "little").hex()
        reply = self.request(f"P{r.regnum:x}={data}")
        if reply != "OK":
            raise GdbStubError(f"cannot write register {name}: {reply!r}", reply)

    def threads(self) -> list[str]:
        out: list[str] = []
        reply = self.request("qfThreadInfo")
        for _ in range(4096):
            if not reply or reply[0] == "l":
                break
            out += reply[1:].split(",")
            reply = self.request("qsThreadInfo")
        return out

    # --- memory -------------------------------------------------------------------------------------

    def set_physical_mode(self, physical: bool) -> None:
        """``Qqemu.PhyMemMode``: m/M use physical addresses. Global in QEMU and sticky across reconnects."""
        reply = self.request(f"Qqemu.PhyMemMode:{int(physical)}")
        if reply != "OK":
            raise GdbStubError(f"this QEMU gdbstub has no physical memory mode: {reply!r}", reply)

    def read_memory(self, addr: int, size: int) -> bytes:
        reqs = [f"m{a:x},{min(MAX_MEM_PACKET, addr + size - a):x}" for a in range(addr, addr + size, MAX_MEM_PACKET)]
        replies = self.pipeline(reqs) if len(reqs) > 1 else [self.request(reqs[0])] if reqs else []
        out = bytearray()
        for req, reply in zip(reqs, replies, strict=True):
            if not reply or (reply[0] == "E" and len(reply) == 3):
                raise GdbStubError(f"gdbstub cannot read memory at {req[1:].split(',')[0]}: {reply!r}", reply)
            out += bytes.fromhex(reply)
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        step = MAX_MEM_PACKET // 2
        reqs = [f"M{addr + i:x},{len(data[i:i + step]):x}:{data[i:i + step].hex()}" for i in range(0, len(data), step)]
        for req, reply in zip(reqs, self.pipeline(reqs), strict=True):
            if reply != "OK":
                raise GdbStubError(f"gdbstub cannot write memory at {req[1:].split(',')[0]}: {reply!r}", reply)

    # --- run control ---------------------------------------------------------------------------------

    def insert_breakpoint(self, kind: int, addr: int, length: int = 1) -> None:
        """kind: 0 sw, 1 hw, 2 write watch, 3 read watch, 4 access watch."""
        reply = self.request(f"Z{kind},{addr:x},{length:x}")
        if reply != "OK":
            raise GdbStubError(f"cannot insert Z{kind} at {addr:#x} len {length}: {reply or 'unsupported'}", reply)

    def remove_breakpoint(self, kind: int, addr: int, length: int = 1) -> None:
        reply = self.request(f"z{kind},{addr:x},{length:x}")
        if reply != "OK":
            raise GdbStubError(f"cannot remove z{kind} at {addr:#x}: {reply!r}", reply)

    def cont(self) -> None:
        """Resume all vCPUs; the stop reply comes later (:meth:`wait_stop`)."""
        self.send("vCont;c" if self.multiprocess else "c")

    def step(self, thread: str | None = None) -> StopReply:
        self.send(f"vCont;s:{thread}" if thread else "s")
        return self.wait_stop(self.timeout)

    def wait_stop(self, timeout: float | None) -> StopReply:
        """Block until the guest stops; TimeoutError if it is still running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                text = self.recv_packet(left if left is not None else 1e9)
            except TimeoutError:
                raise
            if text.startswith(("T", "S", "W", "X")):
                return parse_stop_reply(text)
            if text.startswith("O"):  # console output packets
                continue
            log.debug("ignoring packet while waiting for a stop: %r", text)

    def interrupt(self, timeout: float = 2.0) -> StopReply:
        self.send_break()
        return self.wait_stop(timeout)

    def detach(self) -> None:
        """Detach and let the VM run. With multiprocess a plain 'D' answers E22 and leaves it paused."""
        try:
            self.request("D;1" if self.multiprocess else "D", timeout=1.0)
        finally:
            self.close()
