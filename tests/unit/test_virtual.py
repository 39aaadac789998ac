"""AddressSpace: reads/writes spanning pages, faults mid-range, the translation cache and its invalidation."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from tests.unit.pagetables import KB4, MB2, PageTables, swp_entry
from vmsight.errors import PageSwapped, PhysicalAddressError, TranslationFault
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.paging import clear_accessed, fast_readers, translate, walk_range
from vmsight.memory.physical import BufferRam, MappedRam
from vmsight.memory.virtual import AddressSpace

GVA = 0x5555_0000_0000


def _fill(pt: PageTables, gpa: int, size: int, seed: int) -> bytes:
    data = bytes((seed + i * 7) & 0xFF for i in range(size))
    pt.mem.write_gpa(gpa, data)
    return data


def test_read_within_one_page_and_typed_reads() -> None:
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    pt.mem.write_gpa(0x30_0100, (0x1122334455667788).to_bytes(8, "little") + b"hello\0world")
    space = AddressSpace(pt.mem, pt.root)
    assert space.read_u64(GVA + 0x100) == 0x1122334455667788
    assert space.read_u32(GVA + 0x100) == 0x55667788
    assert space.read_u16(GVA + 0x106) == 0x1122
    assert space.read_u8(GVA + 0x107) == 0x11
    assert space.read_cstr(GVA + 0x108) == b"hello"
    assert space.read(GVA + 0x108, 0) == b""
    assert space.gva_to_gpa(GVA + 0x123) == 0x30_0123
    with pytest.raises(ValueError):
        space.read(GVA, -1)


def test_read_spanning_4k_boundary_non_contiguous_frames() -> None:
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    pt.map(GVA + KB4, 0x20_0000)          # next virtual page lives *below* the first one
    a = _fill(pt, 0x30_0000, KB4, 1)
    b = _fill(pt, 0x20_0000, KB4, 2)
    space = AddressSpace(pt.mem, pt.root)
    assert space.read(GVA + KB4 - 5, 10) == a[-5:] + b[:5]
    assert space.read(GVA, 2 * KB4) == a + b
    # u64 straddling the boundary
    assert space.read_u64(GVA + KB4 - 4) == int.from_bytes(a[-4:] + b[:4], "little")


def test_read_spanning_2m_boundary() -> None:
    pt = PageTables(32 << 20)
    pt.map(0x4000_0000, 0x80_0000, MB2)
    pt.map(0x4000_0000 + MB2, 0x40_0000, MB2)
    pt.map(0x4000_0000 + 2 * MB2, 0x20_0000)   # a 4 KiB page right after the second 2 MiB page
    tail_a = _fill(pt, 0x80_0000 + MB2 - 64, 64, 3)
    head_b = _fill(pt, 0x40_0000, 64, 4)
    tail_b = _fill(pt, 0x40_0000 + MB2 - 16, 16, 5)
    head_c = _fill(pt, 0x20_0000, 16, 6)
    space = AddressSpace(pt.mem, pt.root)
    assert space.read(0x4000_0000 + MB2 - 64, 128) == tail_a + head_b
    assert space.read(0x4000_0000 + 2 * MB2 - 16, 32) == tail_b + head_c
    # a whole 2 MiB page in one call equals the physical bytes
    assert space.read(0x4000_0000 + MB2, MB2) == pt.mem.read_gpa(0x40_0000, MB2)


def test_fault_mid_range_reports_failing_gva() -> None:
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    pt.map(GVA + KB4, 0x31_0000)
    pt.set_entry(1, GVA + 2 * KB4, swp_entry(1, 0x42))
    space = AddressSpace(pt.mem, pt.root)
    with pytest.raises(PageSwapped) as ei:
        space.read(GVA + 0x800, 3 * KB4)
    assert ei.value.gva == GVA + 2 * KB4 and ei.value.swap_offset == 0x42
    with pytest.raises(TranslationFault) as ei2:
        space.read(GVA + 0x800, 4 * KB4 + 0x900)      # first failure wins
    assert ei2.value.gva == GVA + 2 * KB4
    with pytest.raises(TranslationFault) as ei3:
        space.read_u64(GVA + 3 * KB4 + 8)
    assert ei3.value.gva == GVA + 3 * KB4 + 8 and ei3.value.level == 1


def test_write_spanning_pages_and_no_partial_write_on_fault() -> None:
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    pt.map(GVA + KB4, 0x20_0000)
    space = AddressSpace(pt.mem, pt.root)
    space.write(GVA + KB4 - 3, b"abcdef")
    assert pt.mem.read_gpa(0x30_0000 + KB4 - 3, 3) == b"abc"
    assert pt.mem.read_gpa(0x20_0000, 3) == b"def"
    space.write_u64(GVA + 8, 0xDEADBEEF)
    assert space.read_u64(GVA + 8) == 0xDEADBEEF
    before = pt.mem.read_gpa(0x20_0000, KB4)
    with pytest.raises(TranslationFault) as ei:
        space.write(GVA + 2 * KB4 - 2, b"XXXX")          # second page unmapped
    assert ei.value.gva == GVA + 2 * KB4
    assert pt.mem.read_gpa(0x20_0000, KB4) == before     # nothing written


def test_cache_is_stale_until_invalidate() -> None:
    pt = PageTables()
    pte = pt.map(GVA, 0x30_0000)
    pt.mem.write_gpa(0x30_0000, b"old!")
    pt.mem.write_gpa(0x31_0000, b"new!")
    space = AddressSpace(pt.mem, pt.root)
    assert space.read(GVA, 4) == b"old!"
    pt.put(pte, pt.get(pte) & ~0x000FFFFFFFFFF000 | 0x31_0000)   # the guest remaps the page
    assert space.read(GVA, 4) == b"old!"                          # cached: stale, by design
    assert translate(pt.mem, pt.root, GVA).gpa == 0x31_0000        # the uncached walk sees it
    space.invalidate()
    assert space.read(GVA, 4) == b"new!"
    # Single-page invalidation, and unmapping observed after it.
    pt.put(pte, 0)
    assert space.read_u32(GVA) == int.from_bytes(b"new!", "little")
    space.invalidate(GVA)
    with pytest.raises(TranslationFault):
        space.read(GVA, 4)


def test_cache_of_large_pages_is_invalidated_too() -> None:
    pt = PageTables(32 << 20)
    pmd = pt.map(0x4000_0000, 0x80_0000, MB2)
    pt.mem.write_gpa(0x80_0000 + 0x12_3000, b"AAAA")
    pt.mem.write_gpa(0x40_0000 + 0x12_3000, b"BBBB")
    space = AddressSpace(pt.mem, pt.root)
    assert space.read(0x4000_0000 + 0x12_3000, 4) == b"AAAA"
    assert space.read(0x4000_0000 + 0x55_000, 1) is not None       # another 4 KiB of the same 2 MiB page
    pt.put(pmd, pt.get(pmd) & ~0x000FFFFFFFE00000 | 0x40_0000)
    assert space.read(0x4000_0000 + 0x12_3000, 4) == b"AAAA"
    space.invalidate()
    assert space.read(0x4000_0000 + 0x12_3000, 4) == b"BBBB"


def test_invalidate_during_a_walk_wins() -> None:
    """A walk that races with invalidate() (another thread resuming the guest) must not refill the
    fresh cache with a translation read before the invalidation."""
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    space: AddressSpace | None = None

    class Racing(BufferRam):
        def read_u64(self, gpa: int) -> int:
            assert space is not None
            space.invalidate()                  # "resume" happens in the middle of the walk
            return super().read_u64(gpa)

    space = AddressSpace(Racing(pt.buf), pt.root)
    assert space.gva_to_gpa(GVA) == 0x30_0000
    assert space.cached_pages == 0


def test_translate_method_returns_entries_and_fills_cache() -> None:
    pt = PageTables()
    pte = pt.map(GVA, 0x30_0000)
    space = AddressSpace(pt.mem, pt.root)
    t = space.translate(GVA + 5)
    assert t.gpa == 0x30_0005 and t.leaf.entry_gpa == pte
    pt.put(pte, 0)
    assert space.gva_to_gpa(GVA + 6) == 0x30_0006    # served from the cache the translate() filled


def test_cache_bound() -> None:
    pt = PageTables()
    for i in range(40):
        pt.map(GVA + i * KB4, 0x30_0000 + ((i * 13) % 40) * KB4)
    space = AddressSpace(pt.mem, pt.root, max_cached=8)
    for _ in range(2):
        for i in range(40):
            assert space.gva_to_gpa(GVA + i * KB4 + 1) == 0x30_0000 + ((i * 13) % 40) * KB4 + 1
    assert 0 < space.cached_pages <= 8


def test_5_level_address_space() -> None:
    pt = PageTables(la57=True)
    gva = 0x00AB_0000_0000_1000
    pt.map(gva, 0x30_0000)
    pt.mem.write_gpa(0x30_0010, b"la57")
    space = AddressSpace(pt.mem, pt.root, la57=True)
    assert space.read(gva + 0x10, 4) == b"la57"
    with pytest.raises(TranslationFault):
        AddressSpace(pt.mem, pt.root).read(gva, 4)        # non-canonical in 4-level mode


# --- the direct-buffer readers behind the hot path ------------------------------------------------------

def test_mapped_ram_still_closes_after_use(tmp_path: Path) -> None:
    """The fast readers must not keep a buffer export alive, or MappedRam.close() (mmap.close) fails."""
    size = 16 << 20
    path = tmp_path / "ram"
    path.write_bytes(bytes(size))
    layout = RamLayout([RamRange(0, size, 0, "ram")])
    mem = MappedRam(str(path), layout)
    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    pt.map(GVA + KB4, 0x20_0000)
    mem.write_gpa(0, bytes(pt.buf))                      # copy the built tables into the mapped file
    mem.write_gpa(0x30_0000 + KB4 - 4, b"abcd")
    mem.write_gpa(0x20_0000, b"efgh")
    space = AddressSpace(mem, pt.root)
    assert space.read(GVA + KB4 - 4, 8) == b"abcdefgh"
    assert space.read_u64(GVA + KB4 - 4) == int.from_bytes(b"abcdefgh", "little")
    leaves = list(walk_range(mem, pt.root, 0, 1 << 47))
    assert [m.gva for m in leaves] == [GVA, GVA + KB4]
    assert clear_accessed(mem, [m.pte_gpa for m in leaves]) == [True, True]
    mem.close()                                          # raises BufferError if anything still exports
    assert path.read_bytes()[pt.entry_gpa(1, GVA)] & 0x20 == 0   # cleared A bit reached the file


def test_multi_range_layout_reads_and_spans() -> None:
    # RAM [0, 8 MiB) and [12 MiB, 16 MiB) (buffer offset 8 MiB); a read spanning the hole must fail,
    # reads inside either range must be right.
    layout = RamLayout([RamRange(0, 8 << 20, 0, "lo"), RamRange(12 << 20, 4 << 20, 8 << 20, "hi")])
    pt = PageTables(12 << 20, layout=layout, table_top=8 << 20)
    pt.map(GVA, 0x7F_F000)                   # last page of the low range
    pt.map(GVA + KB4, 0xC0_0000)             # first page of the high range
    pt.map(GVA + 2 * KB4, 0x90_0000)         # in the hole
    pt.mem.write_gpa(0x7F_FFFC, b"lowx")
    pt.mem.write_gpa(0xC0_0000, b"high")
    space = AddressSpace(pt.mem, pt.root)
    assert space.read(GVA + KB4 - 4, 8) == b"lowxhigh"
    assert space.read_u64(GVA + KB4 - 4) == int.from_bytes(b"lowxhigh", "little")
    with pytest.raises(PhysicalAddressError):
        space.read(GVA + 2 * KB4, 4)
    ru64, read = fast_readers(pt.mem)
    assert read(0x7F_FFFC, 4) == b"lowx" and read(0xC0_0000, 4) == b"high"
    with pytest.raises(PhysicalAddressError):
        ru64(0x7F_FFFC)                      # 8 bytes would run into the hole
    with pytest.raises(PhysicalAddressError):
        read(0xBF_FFFE, 4)


def test_fast_readers_honour_overrides_and_do_not_keep_backend_alive() -> None:
    class Counting(BufferRam):
        calls = 0

        def read_u64(self, gpa: int) -> int:
            Counting.calls += 1
            return super().read_u64(gpa)

    pt = PageTables()
    pt.map(GVA, 0x30_0000)
    mem = Counting(pt.buf)
    assert translate(mem, pt.root, GVA).gpa == 0x30_0000
    assert Counting.calls == 4                  # an overriding backend is used as it is, not bypassed

    plain = BufferRam(bytearray(1 << 20))
    ref = weakref.ref(plain)
    fast_readers(plain)
    del plain
    gc.collect()
    assert ref() is None
