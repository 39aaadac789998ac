"""The SIGKILL watchdog's protocol, end to end against a minimal RSP server on a unix socket and a RAM
file (the real QEMU cases are tests/guest/test_events_stress.py and tests/guest/test_signals.py)."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmsight.events.watchdog import (
    WatchdogClient,
    cleanup,
    read_journal,
    read_until_eof,
    restore_accessed,
)
from vmsight.memory.physical import BufferRam
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
                        b"garbage\n+ 0 zz 1\nwant paused\ngdb /x/gdb.sock\nram {bad json\n"
                        b"accessed /tmp/j\naccessed -\naccessed /tmp/k\n")
    st = read_until_eof(stream)
    assert not st.bye and st.points == {(2, 0xFFFF888000001000, 8)}
    assert st.want == "paused" and st.gdb == "/x/gdb.sock" and st.ram is None and st.journal == "/tmp/k"
    st = read_until_eof(io.BytesIO(b"+ 0 10 1\nbye\n+ 0 20 1\n"))
    assert st.bye and st.points == {(0, 0x10, 1)} and st.want == "running"


PRESENT_A = 0x8000000000000067  # NX | D | A | U | W | P


def test_restore_accessed_only_where_the_same_frame_is_mapped_and_a_is_clear() -> None:
    ram = BufferRam(bytearray(0x2000))
    entries = {0x1000: 0x1234000 | PRESENT_A, 0x1008: 0x5678000 | PRESENT_A, 0x1010: 0x9999000 | PRESENT_A,
               0x1018: 0x4444000 | PRESENT_A}
    now = {0x1000: 0x1234000 | (PRESENT_A & ~0x20),          # ours, A cleared: given back
           0x1008: 0x7777000 | (PRESENT_A & ~0x20),          # remapped to another frame: not ours
           0x1010: 0x9999000 | PRESENT_A,                    # A set again by the guest: left alone
           0x1018: 0x4444000 | (PRESENT_A & ~0x21)}          # not present (swapped/PROT_NONE): never written
    for gpa, v in now.items():
        ram.write_gpa(gpa, v.to_bytes(8, "little"))
    assert restore_accessed(ram, entries) == 1
    after = {g: int.from_bytes(ram.read_gpa(g, 8), "little") for g in now}
    assert after == {**now, 0x1000: now[0x1000] | 0x20}


def test_journal_written_before_clearing_and_dropped_after(tmp_path: Path) -> None:
    wd = WatchdogClient.start(want="running")
    try:
        wd.accessed({0x1000: 0xAA, 0x2008: 0xBB})
        journal = wd._journal
        assert journal is not None and os.stat(journal).st_mode & 0o777 == 0o600
        assert read_journal(journal) == {0x1000: 0xAA, 0x2008: 0xBB}
        wd.accessed({0x3000: 0xCC})  # the next interval replaces it
        assert read_journal(journal) == {0x3000: 0xCC}
        wd.accessed(None)
        assert wd._journal is None and not os.path.exists(journal) and wd.clean()
    finally:
        wd.stop(clean=True)
        wd.proc.wait(15)
    assert wd.proc.returncode == 0


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
    wd = WatchdogClient.start(gdb=stub.path)
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
    wd = WatchdogClient.start(gdb=path)  # nothing listens there: a cleanup attempt would fail and exit 1
    wd.record(True, 0, 0x1000, 1)
    wd.record(False, 0, 0x1000, 1)
    assert wd.clean()
    wd.stop(clean=True)
    assert wd.proc.wait(15) == 0
    assert not os.path.exists(path)


def test_watchdog_process_gives_accessed_bits_back_and_keeps_a_paused_vm_paused(tmp_path: Path) -> None:
    """A parent that found the VM paused dies mid-interval: the bits it journalled are ORed back in the
    RAM file, its point removed, and the stub hung up on without D (which would start the VM)."""
    stub = FakeStub(str(tmp_path / "gdb.sock"))
    ram_path = tmp_path / "guest.ram"
    ram_path.write_bytes(bytes(0x3000))
    ram = BufferRam(bytearray(0x3000))  # what the guest's page tables look like now, mid-interval
    cleared = {0x2000 + 8 * i: (0x100000 + i * 0x1000) | PRESENT_A for i in range(300)}
    for gpa, old in cleared.items():
        ram.write_gpa(gpa, (old & ~0x20).to_bytes(8, "little"))
    ram.write_gpa(0x2008, ((0x100000 + 0x1000) | PRESENT_A).to_bytes(8, "little"))  # touched again since
    ram_path.write_bytes(ram.read_gpa(0, 0x3000))
    wd = WatchdogClient.start(gdb=stub.path, want="paused")
    wd.ram({"path": str(ram_path), "ranges": [[0, 0x3000, 0]]})
    wd.record(True, 2, 0xFFFF888000001000, 8)
    wd.accessed(cleared)
    journal = wd._journal
    assert wd._pipe is not None and journal is not None
    wd._pipe.close()  # the parent's death, as the watchdog sees it
    wd._pipe = None
    assert wd.proc.wait(15) == 0
    data = ram_path.read_bytes()
    after = {g: int.from_bytes(data[g:g + 8], "little") for g in cleared}
    assert after == cleared  # every bit back, nothing else changed (the re-touched one kept its value)
    assert not os.path.exists(journal)
    assert "z2,ffff888000001000,8" in stub.packets and not any(p.startswith("D") for p in stub.packets)


def test_ram_in_several_blocks_is_described_and_written_per_file(tmp_path: Path) -> None:
    """A VM whose RAM is two memory backends (NUMA nodes; BlockRam): the watchdog gets each range's own file,
    so a SIGKILLed parent's accessed bits can be given back there too (it used to get no description)."""
    from types import SimpleNamespace

    from vmsight.events.watchdog import _FileRam, ram_description
    from vmsight.memory.layout import RamLayout, RamRange
    from vmsight.memory.physical import BlockRam, MappedRam

    a, b = tmp_path / "node0", tmp_path / "node1"
    for f in (a, b):
        f.write_bytes(bytes(1 << 20))
    layout = RamLayout([RamRange(0, 1 << 20, 0, "m0"), RamRange(1 << 20, 1 << 20, 0, "m1")])
    parts = {"m0": MappedRam(str(a), RamLayout([layout.ranges[0]])),
             "m1": MappedRam(str(b), RamLayout([layout.ranges[1]]))}
    try:
        vm = SimpleNamespace(phys=BlockRam(parts, layout), layout=layout, pid=None)
        desc = ram_description(vm)  # type: ignore[arg-type]
        assert desc is not None and [r[3] for r in desc["ranges"]] == [str(a), str(b)]
        ram = _FileRam(json.loads(json.dumps(desc)))       # as it reaches the watchdog
        try:
            ram.write_gpa(0x1008, b"\x21" * 8)
            ram.write_gpa((1 << 20) + 0x2010, b"\x42" * 8)
            assert ram.read_gpa((1 << 20) + 0x2010, 8) == b"\x42" * 8
            with pytest.raises(ValueError, match="outside the RAM"):
                ram.write_gpa(2 << 20, b"x")
        finally:
            ram.close()
        assert a.read_bytes()[0x1008:0x1010] == b"\x21" * 8 and b.read_bytes()[0x2010:0x2018] == b"\x42" * 8
    finally:
        for m in parts.values():
            m.close()
