"""The SIGKILL watchdog's protocol, end to end against a minimal RSP server on a unix socket (the real
QEMU case is tests/guest/test_events_stress.py)."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

from vmsight.events.watchdog import WatchdogClient, cleanup, read_until_eof
from vmsight.qemu.rsp import checksum

TARGET_XML = ('<?xml version="1.0"?><target><architecture>i386:x86-64</architecture>'
              '<feature name="org.gnu.gdb.i386.core"><reg name="rip" bitsize="64"/></feature></target>')


class FakeStub:
    """Answers what GdbStub and the watchdog send; records every packet."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.packets: list[str] = []
        self.detached = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, conn: socket.socket, body: str) -> None:
        conn.sendall(f"${body}#{checksum(body.encode()):02x}".encode())

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        buf = b""
        while True:  # until the client hangs up, as QEMU does
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
            while b"#" in buf and b"$" in buf:
                start = buf.index(b"$")
                end = buf.index(b"#", start)
                if len(buf) < end + 3:
                    break
                pkt = buf[start + 1:end].decode()
                buf = buf[end + 3:]
                self.packets.append(pkt)
                if pkt.startswith("qSupported"):
                    self._reply(conn, "PacketSize=1000;qXfer:features:read+;multiprocess+")
                elif pkt.startswith("qXfer:features:read:target.xml"):
                    self._reply(conn, "l" + TARGET_XML)
                elif pkt.startswith(("z", "D")):
                    self._reply(conn, "OK")
                    if pkt.startswith("D"):
                        self.detached.set()
                else:
                    self._reply(conn, "")
        conn.close()


def test_read_until_eof_tracks_points_and_bye() -> None:
    stream = io.BytesIO(b"+ 0 ffffffff81000000 1\n+ 2 ffff888000001000 8\n- 0 ffffffff81000000 1\n"
                        b"garbage\n+ 0 zz 1\n")
    bye, points = read_until_eof(stream)
    assert not bye and points == {(2, 0xFFFF888000001000, 8)}
    bye, points = read_until_eof(io.BytesIO(b"+ 0 10 1\nbye\n+ 0 20 1\n"))
    assert bye and points == {(0, 0x10, 1)}


def test_cleanup_removes_points_and_detaches(tmp_path: Path) -> None:
    stub = FakeStub(str(tmp_path / "gdb.sock"))
    assert cleanup(stub.path, {(0, 0x1000, 1), (2, 0x2000, 8)}, deadline_s=3)
    assert stub.detached.wait(3)
    assert "z0,1000,1" in stub.packets and "z2,2000,8" in stub.packets
    assert stub.packets[-1] == "D;1"


def test_cleanup_gives_up_without_a_stub(tmp_path: Path) -> None:
    t = time.monotonic()
    assert not cleanup(str(tmp_path / "nothing.sock"), set(), deadline_s=0.3)
    assert time.monotonic() - t < 3


def test_watchdog_process_cleans_up_when_parent_vanishes(tmp_path: Path) -> None:
    stub = FakeStub(str(tmp_path / "gdb.sock"))
    wd = WatchdogClient.start(stub.path)
    wd.record(True, 0, 0xFFFFFFFF81000010, 1)
    wd.record(True, 0, 0xFFFFFFFF81000020, 1)
    wd.record(False, 0, 0xFFFFFFFF81000010, 1)
    # What a SIGKILL of the parent looks like to the watchdog: end of input, no "bye".
    assert wd._pipe is not None
    wd._pipe.close()
    wd._pipe = None
    assert wd.proc.wait(15) == 0
    assert stub.detached.wait(3)
    assert [p for p in stub.packets if p.startswith("z")] == ["z0,ffffffff81000020,1"]
    assert stub.packets[-1] == "D;1"


def test_watchdog_process_exits_quietly_on_bye(tmp_path: Path) -> None:
    path = str(tmp_path / "gdb.sock")
    wd = WatchdogClient.start(path)  # nothing listens there: a cleanup attempt would fail and exit 1
    wd.record(True, 0, 0x1000, 1)
    wd.record(False, 0, 0x1000, 1)
    wd.stop(clean=True)
    assert wd.proc.returncode == 0
    assert not os.path.exists(path)
