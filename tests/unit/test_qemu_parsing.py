"""Parsers of QEMU's text and wire formats, on recorded and synthetic input."""

from __future__ import annotations

import pytest

from vmsight.errors import PhysicalAddressError
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.qemu.layout import parse_mtree
from vmsight.qemu.rsp import checksum, escape, parse_stop_reply, unescape
from vmsight.vm import parse_info_registers

# `info mtree -f` of a pc machine with 5 GiB (RAM above 4 GiB is the same block at offset 0xc0000000).
MTREE_5G = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): mem
  00000000000c3000-00000000000e7fff (prio 0, rom): mem @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): mem @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): mem @00000000000f0000
  0000000000100000-00000000bfffffff (prio 0, ram): mem @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): mem @00000000c0000000

FlatView #1
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""


def test_mtree_pc_above_4g() -> None:
    lay = parse_mtree(MTREE_5G)
    assert [(r.gpa, r.size, r.offset) for r in lay] == [(0, 0xC0000000, 0), (0x100000000, 0x40000000, 0xC0000000)]
    assert lay.total_bytes == 0x100000000
    assert lay.find(0xFEC00000) is None and lay.find(0x100000010).offset == 0xC0000000  # type: ignore[union-attr]
    with pytest.raises(PhysicalAddressError):
        lay.check(0xBFFFFFF0, 0x20)  # runs into the hole below 4 GiB
    pieces = list(lay.pieces(0x100, 0x10))
    assert pieces == [(lay.ranges[0], 0x100, 0x10)]


def test_layout_pieces_span_adjacent_ranges() -> None:
    lay = RamLayout([RamRange(0, 0x1000, 0, "a"), RamRange(0x1000, 0x1000, 0x5000, "b")])
    assert [(p, n) for _, p, n in lay.pieces(0xFF0, 0x20)] == [(0xFF0, 0x10), (0x1000, 0x10)]
    assert RamLayout.from_json(lay.to_json()).ranges == lay.ranges


def test_rsp_escaping_and_rle() -> None:
    raw = b"a$b#c}d*e"
    assert unescape(escape(raw)) == raw
    assert unescape(b"0* ") == b"0" * 4  # '*' + chr(29 + 3): three more repeats
    assert checksum(b"OK") == 0x9A


def test_stop_replies() -> None:
    r = parse_stop_reply("T05thread:p01.02;watch:ffffffff81e0a000;")
    assert (r.signal, r.thread, r.kind, r.address) == (5, "p01.02", "watch", 0xFFFFFFFF81E0A000)
    assert parse_stop_reply("T02thread:01;").kind is None
    assert parse_stop_reply("W00").exited


INFO_REGS = """\
CPU#0
RAX=0000000000000001 RBX=0000000000000002 RCX=0000000000000003 RDX=0000000000000004
RSI=0000000000000005 RDI=0000000000000006 RBP=0000000000000007 RSP=ffffffff82003e98
R8 =0000000000000000 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000
RIP=ffffffff81e17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
GS =0000 ffff88800f800000 00000000 00000000
LDT=0000 0000000000000000 00000000 00008200 DPL=0 LDT
TR =0040 fffffe000003e000 00004087 00008900 DPL=0 TSS64-avl
GDT=     fffffe000003c000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=00000000005eaeb0 CR3=0000000002970000 CR4=000006b0
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000d01
XMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 0000000000000000
CPU#1
RAX=00000000000000aa RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
"""


def test_info_registers() -> None:
    r0 = parse_info_registers(INFO_REGS, 0)
    assert r0["rax"] == 1 and r0["rip"] == 0xFFFFFFFF81E17A0B and r0["eflags"] == 0x246
    assert r0["cs"] == 0x10 and r0["gs_base_hmp"] == r0["gs_base"] == 0xFFFF88800F800000
    assert (r0["gdtr_base"], r0["gdtr_limit"], r0["idtr_limit"]) == (0xFFFFFE000003C000, 0x7F, 0xFFF)
    assert r0["tr"] == 0x40 and r0["tr_base"] == 0xFFFFFE000003E000
    assert r0["dr7"] == 0x400 and r0["efer"] == 0xD01 and r0["cr3"] == 0x2970000
    assert "xmm00" not in r0
    assert parse_info_registers(INFO_REGS, 1)["rax"] == 0xAA
