"""Guest RAM in several RAM blocks (issue 9 item 4), without a guest: which blocks are guest RAM (the
machine's memory backends, not a VGA's vga.vram), and BlockRam's dispatch of ranges to each block's backend."""

from __future__ import annotations

from typing import Any

import pytest

from vmsight.errors import PhysicalAddressError, VmsightError
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import BlockRam, BufferRam
from vmsight.qemu.layout import parse_mtree
from vmsight.vm import VM

# `info mtree -f` of QEMU 7.2 started without -nodefaults (the default VGA), RAM in memory-backend-file "mem".
MTREE_VGA = """FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
  0000000000000000-000000000009ffff (prio 0, ram): mem
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000cafff (prio 0, rom): mem @00000000000c0000
  00000000000cb000-00000000000cdfff (prio 0, ram): mem @00000000000cb000
  00000000000ce000-00000000000e7fff (prio 0, rom): mem @00000000000ce000
  00000000000e8000-00000000000effff (prio 0, ram): mem @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): mem @00000000000f0000
  0000000000100000-000000000fffffff (prio 0, ram): mem @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
"""


class FakeQmp:
    def __init__(self, memdev: Any) -> None:
        self.memdev = memdev

    def execute(self, cmd: str, **_: Any) -> Any:
        assert cmd == "query-memdev"
        if isinstance(self.memdev, Exception):
            raise self.memdev
        return self.memdev


class FakeVm:
    def __init__(self, memdev: Any) -> None:
        self.qmp = FakeQmp(memdev)


def _guest_ram(memdev: Any, layout: RamLayout) -> RamLayout:
    return VM._guest_ram(FakeVm(memdev), layout)  # type: ignore[arg-type]  # noqa: SLF001


def test_default_vga_vram_is_not_guest_ram() -> None:
    full = parse_mtree(MTREE_VGA)
    assert {r.block for r in full} == {"mem", "vga.vram"}  # what the shared-file check used to see
    ram = _guest_ram([{"id": "mem", "size": 256 << 20, "share": True}], full)
    assert {r.block for r in ram} == {"mem"}
    assert ram.total_bytes == (256 << 20) - (0xc0000 - 0xa0000)  # all of mem but the VGA window
    assert ram.find(0xfd000000) is None and ram.find(0xc0000) is not None


@pytest.mark.parametrize("memdev", [VmsightError("no query-memdev"), [], [{"size": 1}], [{"id": "other"}]])
def test_layout_kept_when_qemu_does_not_say(memdev: Any) -> None:
    full = parse_mtree(MTREE_VGA)
    assert _guest_ram(memdev, full) is full


def test_block_ram_dispatches_by_block() -> None:
    # node0 at gpa 0 (16 KiB), node1 at gpa 16 KiB (16 KiB): separate buffers, each at its own offsets
    layout = RamLayout([RamRange(0, 0x4000, 0, "node0"), RamRange(0x4000, 0x4000, 0, "node1")])
    bufs = {b: bytearray(bytes([i + 1]) * 0x4000) for i, b in enumerate(("node0", "node1"))}
    parts = {b: BufferRam(bufs[b], RamLayout([r for r in layout if r.block == b])) for b in bufs}
    mem = BlockRam(parts, layout)
    assert mem.read_gpa(0x3ffc, 8) == b"\x01" * 4 + b"\x02" * 4  # across the node boundary
    mem.write_gpa(0x3ffe, b"ABCD")
    assert bufs["node0"][-2:] == b"AB" and bufs["node1"][:2] == b"CD"
    assert mem.read_u64(0x3ffe) == int.from_bytes(b"ABCD\x02\x02\x02\x02", "little")
    assert bytes(mem.view(0x4000, 4)) == b"CD\x02\x02"
    with pytest.raises(PhysicalAddressError):
        mem.view(0x3ffe, 4)  # not inside one range
    with pytest.raises(PhysicalAddressError):
        mem.read_gpa(0x7ffc, 8)  # past the end
    with pytest.raises(ValueError, match="node1"):
        BlockRam({"node0": parts["node0"]}, layout)
