"""Page-table walking on hand-built tables (tests/unit/pagetables.py) in a bytearray via BufferRam."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.pagetables import (
    ADDR,
    GB1,
    KB4,
    MB2,
    NX,
    PCD,
    PROTNONE,
    PS,
    PWT,
    RW,
    US,
    A,
    D,
    G,
    P,
    PageTables,
    canonical,
    protnone_pte,
    swp_entry,
)
from vmsight.errors import (
    CorruptData,
    NonCanonicalAddress,
    PageSwapped,
    PermissionDenied,
    PhysicalAddressError,
    TranslationFault,
    VmsightError,
)
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.paging import (
    BadPageTable,
    LeafMapping,
    PageProtNone,
    PagingEntry,
    clear_accessed,
    dtb_from_cr3,
    gva_to_gpa,
    is_canonical,
    is_kernel_half,
    is_user_half,
    kernel_half_start,
    kernel_pgd,
    la57_from_cr4,
    pte_none,
    swp_offset,
    swp_type,
    translate,
    user_half_end,
    user_pgd,
    va_bits,
    walk_range,
)
from vmsight.memory.physical import BufferRam
from vmsight.memory.virtual import AddressSpace

USER_GVA = 0x7F12_3456_7000
KERNEL_GVA = 0xFFFF_FFFF_8100_0000


# --- single translations ------------------------------------------------------------------------------

@pytest.mark.parametrize("la57", [False, True])
@pytest.mark.parametrize("gva", [USER_GVA, KERNEL_GVA, 0x1000, 0x7FFF_FFFF_F000])
def test_4k_page_reports_every_level(la57: bool, gva: int) -> None:
    pt = PageTables(la57=la57)
    if la57 and gva >> 47:
        gva = canonical(gva & ((1 << 48) - 1) | (0x1FF << 48), 57)  # upper half in 57-bit space
    pte_gpa = pt.map(gva, 0x0023_4000, flags=P | RW | US | A | D)
    t = translate(pt.mem, pt.root, gva | 0x123, la57=la57)
    assert t.gpa == 0x0023_4123
    assert t.page_size == KB4
    assert [e.level for e in t.entries] == ([5, 4, 3, 2, 1] if la57 else [4, 3, 2, 1])
    for e in t.entries:
        assert e.entry_gpa == pt.entry_gpa(e.level, gva)
        assert pt.get(e.entry_gpa) == e.value
    assert t.leaf.entry_gpa == pte_gpa
    assert t.leaf.frame_gpa == 0x0023_4000
    assert t.accessed and t.dirty and t.writable and t.user and not t.nx and not t.global_
    assert gva_to_gpa(pt.mem, pt.root, gva + 0xFFF, la57=la57) == 0x0023_4FFF


@pytest.mark.parametrize("la57", [False, True])
def test_2m_page(la57: bool) -> None:
    pt = PageTables(la57=la57)
    pmd_gpa = pt.map(0x4020_0000, 0x0060_0000, MB2, flags=P | RW | A)
    t = translate(pt.mem, pt.root, 0x4020_0000 + 0x1A_BCDE, la57=la57)
    assert (t.gpa, t.page_size) == (0x0060_0000 + 0x1A_BCDE, MB2)
    assert [e.level for e in t.entries] == ([5, 4, 3, 2] if la57 else [4, 3, 2])
    assert t.leaf.entry_gpa == pmd_gpa and t.leaf.ps and t.leaf.is_leaf and t.leaf.page_size == MB2
    assert t.leaf.frame_gpa == 0x0060_0000
    assert not t.user  # U clear at the leaf


def test_2m_page_pat_bit_12_is_not_address() -> None:
    pt = PageTables()
    pt.set_entry(2, 0x4000_0000, 0x0060_0000 | 1 << 12 | P | PS)  # PAT for large pages is bit 12
    assert translate(pt.mem, pt.root, 0x4000_0010).gpa == 0x0060_0010


@pytest.mark.parametrize("la57", [False, True])
def test_1g_page(la57: bool) -> None:
    pt = PageTables(la57=la57)
    gva = 0xFF11_0080_0000_0000 if la57 else 0x80_0000_0000
    pt.map(gva, 0x1_4000_0000, GB1, flags=P | RW | US | A | G)
    t = translate(pt.mem, pt.root, gva + 0x2345_6789, la57=la57)
    assert (t.gpa, t.page_size) == (0x1_4000_0000 + 0x2345_6789, GB1)
    assert [e.level for e in t.entries] == ([5, 4, 3] if la57 else [4, 3])
    assert t.leaf.name == "PDPT" and t.global_ and t.leaf.frame_gpa == 0x1_4000_0000


def test_5_level_uses_bits_48_to_56() -> None:
    pt = PageTables(la57=True)
    gva_a, gva_b = 0x0012_3456_7800_0000, 0x0034_3456_7800_0000  # differ only in the PML5 index
    pt.map(gva_a, 0x10_0000)
    pt.map(gva_b, 0x20_0000)
    assert translate(pt.mem, pt.root, gva_a, la57=True).gpa == 0x10_0000
    assert translate(pt.mem, pt.root, gva_b, la57=True).gpa == 0x20_0000
    with pytest.raises(NonCanonicalAddress):
        translate(pt.mem, pt.root, gva_a, la57=False)
    assert la57_from_cr4(0x3606F0 | 1 << 12) and not la57_from_cr4(0x3606F0)


def test_pat_bit_in_pte_is_not_ps() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x5000, flags=P | RW | US | PS)  # bit 7 of a PTE is PAT
    t = translate(pt.mem, pt.root, USER_GVA + 8)
    assert (t.gpa, t.page_size) == (0x5008, KB4)
    assert not t.leaf.ps


def test_entry_flags() -> None:
    e = PagingEntry(1, 0x1000, 0x8000_0000_1234_5000 | P | RW | US | PWT | PCD | A | D | G)
    assert e.present and e.writable and e.user and e.accessed and e.dirty and e.global_ and e.nx
    assert e.frame_gpa == 0x1234_5000 and not e.ps and not e.prot_none
    e2 = PagingEntry(4, 0, 0x1000 | P)
    assert not (e2.writable or e2.user or e2.accessed or e2.dirty or e2.nx)


def test_writable_and_nx_combine_levels() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x5000, flags=P | RW | US)
    pt.put(pt.entry_gpa(3, USER_GVA), pt.get(pt.entry_gpa(3, USER_GVA)) & ~RW | NX)
    t = translate(pt.mem, pt.root, USER_GVA)
    assert t.leaf.writable and not t.writable
    assert not t.leaf.nx and t.nx


# --- CR3 handling -------------------------------------------------------------------------------------

def test_cr3_pcid_and_noflush_bits_are_masked() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x7000)
    for cr3 in (pt.root | 0x123, pt.root | 1 << 63 | 0xFFF, pt.root | 3 << 61):
        assert dtb_from_cr3(cr3) == pt.root
        assert translate(pt.mem, cr3, USER_GVA).gpa == 0x7000
        assert AddressSpace(pt.mem, cr3).gva_to_gpa(USER_GVA) == 0x7000


def test_pti_kernel_and_user_pgd() -> None:
    # table_top puts the first (kernel) PGD at an 8 KiB-aligned gpa; the user PGD is the next page.
    pt = PageTables(table_top=(12 << 20) + KB4)
    assert pt.root % 0x2000 == 0
    upt = pt.with_root(pt.root + KB4)
    pt.map(KERNEL_GVA, 0x9000)
    pt.map(USER_GVA, 0xA000)
    upt.map(USER_GVA, 0xA000)
    cr3_user = pt.root | 0x1000 | 1 << 63 | 0x7   # user CR3 under PTI: bit 12, PCID, no-flush
    cr3_kernel = pt.root | 0x6
    for cr3 in (cr3_user, cr3_kernel):
        assert kernel_pgd(cr3) == pt.root
        assert user_pgd(cr3) == pt.root + KB4
    assert translate(pt.mem, kernel_pgd(cr3_user), KERNEL_GVA).gpa == 0x9000
    assert translate(pt.mem, user_pgd(cr3_user), USER_GVA).gpa == 0xA000
    assert translate(pt.mem, cr3_user, USER_GVA).gpa == 0xA000       # CR3 as-is selects the user PGD
    with pytest.raises(TranslationFault) as ei:
        translate(pt.mem, user_pgd(cr3_user), KERNEL_GVA)
    assert ei.value.level == 4 and ei.value.entry == 0


# --- faults -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("la57", [False, True])
def test_not_present_at_each_level(la57: bool) -> None:
    levels = [5, 4, 3, 2, 1] if la57 else [4, 3, 2, 1]
    for level in levels:
        pt = PageTables(la57=la57)
        pt.map(USER_GVA, 0x5000)
        g = pt.entry_gpa(level, USER_GVA)
        leftover = pt.get(g) & ~P if level > 2 else 0   # upper levels: garbage without P must not matter
        pt.put(g, leftover)
        with pytest.raises(TranslationFault) as ei:
            translate(pt.mem, pt.root, USER_GVA, la57=la57)
        assert type(ei.value) is TranslationFault
        assert ei.value.level == level
        assert ei.value.entry == leftover
        assert ei.value.gva == USER_GVA


def test_pte_with_only_accessed_dirty_is_none() -> None:
    pt = PageTables()
    pt.set_entry(1, USER_GVA, A | D)   # KNL erratum bits: pte_none() is still true
    assert pte_none(A | D)
    with pytest.raises(TranslationFault) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert type(ei.value) is TranslationFault and ei.value.level == 1


@pytest.mark.parametrize(("swap_type", "offset"), [
    (0, 0), (0, 1), (1, 0x1234), (3, 0x3_FFFF_FFFF_FFFF), (31, 0x2_0000_0000_0000), (29, 0xABCDE),
])
@pytest.mark.parametrize("extra", [0, RW, US | PWT, A | D])   # soft-dirty, uffd-wp + exclusive, erratum
def test_swap_entry_decodes_type_and_offset(swap_type: int, offset: int, extra: int) -> None:
    pt = PageTables()
    pte = swp_entry(swap_type, offset) | extra
    assert not pte & P and not pte & PROTNONE
    assert swp_type(pte) == swap_type and swp_offset(pte) == offset
    pte_gpa = pt.set_entry(1, USER_GVA, pte)
    with pytest.raises(PageSwapped) as ei:
        translate(pt.mem, pt.root, USER_GVA + 0x10)
    e = ei.value
    assert (e.swap_type, e.swap_offset, e.level, e.entry, e.gva) == (swap_type, offset, 1, pte, USER_GVA + 0x10)
    assert isinstance(e, TranslationFault)
    assert pt.get(pte_gpa) == pte


def test_swap_offset_is_stored_inverted() -> None:
    # L1TF: a small offset sets the high physical-address bits, so the entry points at no real memory.
    pte = swp_entry(1, 5)
    assert (pte >> 9) & ((1 << 50) - 1) == ((1 << 50) - 1) ^ 5
    assert pte >> 59 == 1


def test_pmd_migration_entry() -> None:
    pt = PageTables()
    pt.set_entry(2, 0x4000_0000, swp_entry(30, 0x777))
    with pytest.raises(PageSwapped) as ei:
        translate(pt.mem, pt.root, 0x4000_0000)
    assert (ei.value.level, ei.value.swap_type, ei.value.swap_offset) == (2, 30, 0x777)


def test_prot_none_is_reported_distinctly() -> None:
    pt = PageTables()
    pt.set_entry(1, USER_GVA, protnone_pte(0x345))
    with pytest.raises(PageProtNone) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert ei.value.prot_none and ei.value.gpa == 0x345000 and ei.value.level == 1
    assert not isinstance(ei.value, PageSwapped)


def test_prot_none_pre_l1tf_plain_frame() -> None:
    pt = PageTables()
    pt.set_entry(1, USER_GVA, 0x345000 | PROTNONE | A)
    with pytest.raises(PageProtNone) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert ei.value.gpa == 0x345000


def test_prot_none_huge_pmd() -> None:
    pt = PageTables()
    pt.set_entry(2, 0x4000_0000, (~0x60_0000 & ADDR & ~0x1F_F000) | PROTNONE | PS | A)
    with pytest.raises(PageProtNone) as ei:
        translate(pt.mem, pt.root, 0x4000_1234)
    assert ei.value.level == 2 and ei.value.gpa == 0x60_0000


@pytest.mark.parametrize("gva", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x1234_5678_9ABC_DEF0,
                                 -1, 1 << 64, 1 << 70])
def test_non_canonical(gva: int) -> None:
    pt = PageTables()
    with pytest.raises(NonCanonicalAddress) as ei:
        translate(pt.mem, pt.root, gva)
    assert ei.value.gva == gva and ei.value.level == 0
    assert not is_canonical(gva)


def test_canonical_in_57_bits_only() -> None:
    gva = 0x0000_8000_0000_0000
    assert is_canonical(gva, la57=True) and not is_canonical(gva)
    assert is_canonical(0xFF00_0000_0000_0000, la57=True)
    assert not is_canonical(0xFE00_0000_0000_0000, la57=True)
    pt = PageTables(la57=True)
    pt.map(gva, 0x3000)
    assert translate(pt.mem, pt.root, gva, la57=True).gpa == 0x3000


@pytest.mark.parametrize(("la57", "bits", "user_end", "kernel_start"), [
    (False, 48, 0x0000_8000_0000_0000, 0xFFFF_8000_0000_0000),
    (True, 57, 0x0100_0000_0000_0000, 0xFF00_0000_0000_0000),
])
def test_halves_per_paging_mode(la57: bool, bits: int, user_end: int, kernel_start: int) -> None:
    """The one definition of the user/kernel split (SDM: canonical = bits 63..N-1 equal)."""
    assert va_bits(la57=la57) == bits
    assert user_half_end(la57=la57) == user_end
    assert kernel_half_start(la57=la57) == kernel_start
    for gva, user, kernel in [(0, True, False), (user_end - 1, True, False), (user_end, False, False),
                              (kernel_start - 1, False, False), (kernel_start, False, True),
                              ((1 << 64) - 1, False, True), (-1, False, False), (1 << 64, False, False)]:
        assert is_user_half(gva, la57=la57) is user, hex(gva)
        assert is_kernel_half(gva, la57=la57) is kernel, hex(gva)
        assert is_canonical(gva, la57=la57) is (user or kernel), hex(gva)


def test_5_level_kernel_pointers_are_not_4_level_ones() -> None:
    # issue 9: a task_struct in a 5-level guest's direct map (page_offset_base 0xff11... + KASLR)
    task = 0xFF3E_3B65_8123_4AB0
    assert is_kernel_half(task, la57=True) and not is_kernel_half(task, la57=False)
    assert not is_canonical(task)
    # a 5-level user address above the 4-level user half
    assert is_user_half(0x00FF_FFFF_FFFF_F000, la57=True) and not is_user_half(0x00FF_FFFF_FFFF_F000, la57=False)


@given(gva=st.integers(-(1 << 65), 1 << 65), la57=st.booleans())
def test_halves_agree_with_the_walk(gva: int, la57: bool) -> None:
    """is_canonical (built on the halves) and the walker's own canonical check never disagree."""
    pt = PageTables(la57=la57)
    try:
        translate(pt.mem, pt.root, gva, la57=la57)
        walked = True
    except NonCanonicalAddress:
        walked = False
    except VmsightError:
        walked = True
    assert walked is is_canonical(gva, la57=la57)


def test_entry_pointing_outside_ram() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x5000)
    bad = 0x7_0000_0000 | P | RW | US
    pt.put(pt.entry_gpa(3, USER_GVA), bad)      # PDPT entry -> "PD" far outside the 16 MiB of RAM
    with pytest.raises(BadPageTable) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert (ei.value.level, ei.value.entry, ei.value.table_gpa) == (3, bad, 0x7_0000_0000)
    assert isinstance(ei.value, TranslationFault)


def test_dtb_outside_ram() -> None:
    pt = PageTables()
    with pytest.raises(BadPageTable) as ei:
        translate(pt.mem, 0x40_0000_0000, USER_GVA)
    assert ei.value.level == 5 and ei.value.table_gpa == 0x40_0000_0000


def test_table_in_a_ram_hole() -> None:
    # RAM [0, 8 MiB) and [12 MiB, 16 MiB) at buffer offset 8 MiB: a table at 9 MiB is in the hole.
    layout = RamLayout([RamRange(0, 8 << 20, 0, "lo"), RamRange(12 << 20, 4 << 20, 8 << 20, "hi")])
    pt = PageTables(12 << 20, layout=layout, table_top=8 << 20)
    pt.map(USER_GVA, 0xC0_5000)    # frame in the high range
    assert translate(pt.mem, pt.root, USER_GVA).gpa == 0xC0_5000
    pt.put(pt.entry_gpa(2, USER_GVA), 0x90_0000 | P | RW)
    with pytest.raises(BadPageTable) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert ei.value.level == 2


def test_leaf_outside_ram_translates_but_read_fails() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0xFEE0_0000)   # e.g. an MMIO mapping: translation is fine, RAM access is not
    assert translate(pt.mem, pt.root, USER_GVA).gpa == 0xFEE0_0000
    with pytest.raises(PhysicalAddressError):
        AddressSpace(pt.mem, pt.root).read(USER_GVA, 8)


def test_reserved_bits() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x5000)
    g4 = pt.entry_gpa(4, USER_GVA)
    pt.put(g4, pt.get(g4) | PS)
    with pytest.raises(BadPageTable) as ei:
        translate(pt.mem, pt.root, USER_GVA)
    assert ei.value.level == 4
    pt2 = PageTables()
    pt2.set_entry(2, 0x4000_0000, 0x60_0000 | 1 << 13 | P | PS)
    with pytest.raises(BadPageTable) as ei:
        translate(pt2.mem, pt2.root, 0x4000_0000)
    assert ei.value.level == 2
    pt2.set_entry(3, 0x80_0000_0000, 0x4000_0000 | 1 << 20 | P | PS)
    with pytest.raises(BadPageTable):
        translate(pt2.mem, pt2.root, 0x80_0000_0000)


def test_backend_without_read_u64() -> None:
    class Plain:
        name = "plain"

        def __init__(self, inner: BufferRam) -> None:
            self.layout = inner.layout
            self.read_gpa = inner.read_gpa
            self.write_gpa = inner.write_gpa

    pt = PageTables()
    pt.map(USER_GVA, 0x5000)
    assert translate(Plain(pt.mem), pt.root, USER_GVA + 4).gpa == 0x5004


# --- walk_range ---------------------------------------------------------------------------------------

def _mixed() -> tuple[PageTables, dict[int, tuple[int, int, int]]]:
    pt = PageTables(32 << 20)
    want: dict[int, tuple[int, int, int]] = {}   # gva -> (gpa, size, pte_gpa)
    for i, gva in enumerate([0x40_0000, 0x40_1000, 0x40_3000, 0x7FFF_FFFF_F000, USER_GVA, 0x20_0000_0000]):
        want[gva] = (0x10_0000 + i * KB4, KB4, pt.map(gva, 0x10_0000 + i * KB4))
    want[0x80_0000] = (0x60_0000, MB2, pt.map(0x80_0000, 0x60_0000, MB2))
    want[0x40_0000_0000] = (0x8000_0000, GB1, pt.map(0x40_0000_0000, 0x8000_0000, GB1))
    want[KERNEL_GVA] = (0x1_0000_0000, MB2, pt.map(KERNEL_GVA, 0x1_0000_0000, MB2))
    want[0xFFFF_8880_0000_1000] = (0x1000, KB4, pt.map(0xFFFF_8880_0000_1000, 0x1000))
    return pt, want


def test_walk_range_finds_exactly_what_was_mapped() -> None:
    pt, want = _mixed()
    got = list(walk_range(pt.mem, pt.root, 0, 1 << 64))
    assert [m.gva for m in got] == sorted(want)
    for m in got:
        assert isinstance(m, LeafMapping) and m.present and m.accessed
        assert (m.gpa, m.page_size, m.pte_gpa) == want[m.gva]
        assert m.pte_value == pt.get(m.pte_gpa)


def test_walk_range_subrange() -> None:
    pt, want = _mixed()
    got = [m.gva for m in walk_range(pt.mem, pt.root, 0x40_1000, 0x40_3001)]
    assert got == [0x40_1000, 0x40_3000]
    # A large page overlapping the range start is reported with its own first address.
    got = [m.gva for m in walk_range(pt.mem, pt.root, 0x80_0000 + 0x5000, 0x80_0000 + 0x6000)]
    assert got == [0x80_0000]
    assert [m.gva for m in walk_range(pt.mem, pt.root, KERNEL_GVA, 1 << 64)] == [KERNEL_GVA]
    assert list(walk_range(pt.mem, pt.root, 0x40_4000, 0x40_4000)) == []


def test_walk_range_5_level() -> None:
    pt = PageTables(la57=True)
    pt.map(0x0012_3456_7800_0000, 0x5000)
    pt.map(0xFF11_0000_0000_0000, 0x6000)
    got = [(m.gva, m.gpa) for m in walk_range(pt.mem, pt.root, 0, 1 << 64, la57=True)]
    assert got == [(0x0012_3456_7800_0000, 0x5000), (0xFF11_0000_0000_0000, 0x6000)]


def test_walk_range_nonpresent_variant() -> None:
    pt = PageTables()
    pt.map(USER_GVA, 0x5000)
    pt.set_entry(1, USER_GVA + KB4, swp_entry(2, 0xBEEF))
    pt.set_entry(1, USER_GVA + 2 * KB4, protnone_pte(0x77))
    pt.set_entry(1, USER_GVA + 3 * KB4, A | D)          # pte_none: never reported
    pt.set_entry(2, 0x4000_0000, swp_entry(30, 0x99))   # PMD migration entry
    assert [m.gva for m in walk_range(pt.mem, pt.root, 0, 1 << 47)] == [USER_GVA]
    got = {m.gva: m for m in walk_range(pt.mem, pt.root, 0, 1 << 47, include_nonpresent=True)}
    assert sorted(got) == [0x4000_0000, USER_GVA, USER_GVA + KB4, USER_GVA + 2 * KB4]
    sw = got[USER_GVA + KB4]
    assert sw.swapped and not sw.present and sw.gpa == -1 and (sw.swap_type, sw.swap_offset) == (2, 0xBEEF)
    pn = got[USER_GVA + 2 * KB4]
    assert pn.prot_none and not pn.swapped and pn.gpa == 0x77000
    mig = got[0x4000_0000]
    assert mig.page_size == MB2 and mig.swapped and (mig.swap_type, mig.swap_offset) == (30, 0x99)
    assert got[USER_GVA].present and not got[USER_GVA].swapped


def test_walk_range_skips_bad_tables_unless_strict(caplog: pytest.LogCaptureFixture) -> None:
    pt = PageTables()
    pt.map(0x1000, 0x5000)
    pt.map(USER_GVA, 0x6000)
    pt.put(pt.entry_gpa(3, 0x1000), 0x9_0000_0000 | P | RW)
    assert [m.gva for m in walk_range(pt.mem, pt.root, 0, 1 << 47)] == [USER_GVA]
    assert "outside guest RAM" in caplog.text
    with pytest.raises(BadPageTable) as ei:
        list(walk_range(pt.mem, pt.root, 0, 1 << 47, strict=True))
    assert ei.value.level == 3 and ei.value.table_gpa == 0x9_0000_0000


def test_walk_range_table_budget_stops_self_referencing_tables() -> None:
    pt = PageTables()
    for i in range(512):   # every PML4 entry points at the PML4 itself: 512**3 tables if unbounded
        pt.put(pt.root + 8 * i, pt.root | P | RW | US)
    with pytest.raises(CorruptData):
        for _ in walk_range(pt.mem, pt.root, 0, 1 << 64, max_tables=1000):
            pass
    # A single recursive slot (Windows-style self map) is finite and maps the PML4 page itself.
    pt2 = PageTables()
    pt2.put(pt2.root, pt2.root | P | RW)
    assert [(m.gva, m.gpa) for m in walk_range(pt2.mem, pt2.root, 0, 1 << 64)] == [(0, pt2.root)]


# --- accessed-bit harvesting --------------------------------------------------------------------------

class _NoView:
    """A backend with only read_gpa/write_gpa (the slow clear path)."""

    name = "noview"

    def __init__(self, inner: BufferRam) -> None:
        self.layout = inner.layout
        self.inner = inner

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.inner.read_gpa(gpa, size)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.inner.write_gpa(gpa, data)


@pytest.mark.parametrize("fast", [True, False])
def test_clear_accessed(fast: bool) -> None:
    pt = PageTables()
    g_ad = pt.map(0x1000, 0x5000, flags=P | RW | A | D)
    g_a = pt.map(0x2000, 0x6000, flags=P | RW | A)
    g_idle = pt.map(0x3000, 0x7000, flags=P | RW)
    g_swap = pt.set_entry(1, 0x4000, swp_entry(1, 1) | A)
    g_2m = pt.map(0x20_0000, 0x40_0000, MB2, flags=P | RW | A)
    mem = pt.mem if fast else _NoView(pt.mem)
    before = {g: pt.get(g) for g in (g_ad, g_a, g_idle, g_swap, g_2m)}
    res = clear_accessed(mem, [g_ad, g_a, g_idle, g_swap, g_2m])
    assert res == [True, True, False, False, True]
    assert pt.get(g_ad) == before[g_ad] & ~A and pt.get(g_ad) & D      # D survives
    assert pt.get(g_a) == before[g_a] & ~A
    assert pt.get(g_idle) == before[g_idle]
    assert pt.get(g_swap) == before[g_swap]                            # non-present: untouched
    assert pt.get(g_2m) == before[g_2m] & ~A
    assert not any(m.accessed for m in walk_range(pt.mem, pt.root, 0, 1 << 47))


@pytest.mark.parametrize("fast", [True, False])
def test_clear_accessed_respects_expected(fast: bool) -> None:
    pt = PageTables()
    g1 = pt.map(0x1000, 0x5000)
    g2 = pt.map(0x2000, 0x6000)
    seen = [m.pte_value for m in walk_range(pt.mem, pt.root, 0x1000, 0x3000)]
    pt.put(g2, 0x9000 | P | RW | US | A)      # remapped since the walk: must be left alone
    pt.put(g1, pt.get(g1) | D)                 # only D changed: still the same mapping
    mem = pt.mem if fast else _NoView(pt.mem)
    assert clear_accessed(mem, [g1, g2], seen) == [True, False]
    assert pt.get(g1) & D and not pt.get(g1) & A
    assert pt.get(g2) & A


def test_clear_accessed_retries_when_entry_changes() -> None:
    """The guest sets D between our read and our compare: the entry is re-read and D is kept."""
    pt = PageTables()
    g = pt.map(0x1000, 0x5000, flags=P | RW | A)

    class Racy(_NoView):
        reads = 0

        def read_gpa(self, gpa: int, size: int) -> bytes:
            Racy.reads += 1
            if Racy.reads == 1:   # first read sees the old value, then the "guest" writes D
                data = self.inner.read_gpa(gpa, size)
                pt.put(g, pt.get(g) | D)
                return data
            return self.inner.read_gpa(gpa, size)

    assert clear_accessed(Racy(pt.mem), [g]) == [True]
    assert pt.get(g) & D and not pt.get(g) & A
    assert Racy.reads >= 3


# --- untrusted memory ---------------------------------------------------------------------------------

_PAGES = 8
_table_ptr = st.builds(lambda page, flags: page * KB4 | flags | P, st.integers(0, _PAGES - 1),
                       st.integers(0, 0xFFF) | st.just(RW | US | A))
_entry = st.one_of(
    _table_ptr, _table_ptr, _table_ptr,                          # mostly plausible: keeps walks going deep
    st.just(0),
    st.integers(0, (1 << 64) - 1),
    st.builds(lambda page, flags: page * KB4 | flags, st.integers(0, _PAGES + 2), st.integers(0, 0xFFF)),
    st.builds(swp_entry, st.integers(0, 31), st.integers(0, (1 << 50) - 1)),
    st.builds(protnone_pte, st.integers(0, 1 << 40)),
    st.builds(lambda page: page * KB4 | P | PS, st.integers(0, _PAGES)),
)


@pytest.mark.timeout(300)   # "never hangs": every walk is bounded, so this is far more than needed
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fill=st.lists(_entry, min_size=_PAGES, max_size=_PAGES),   # each page starts as 512 copies of one entry
    entries=st.dictionaries(st.integers(0, _PAGES * 512 - 1), _entry, max_size=100),
    dtb=st.integers(0, _PAGES - 1).map(lambda p: p * KB4) | st.integers(-(1 << 13), (1 << 64) - 1),
    gva=st.integers(-(1 << 10), (1 << 64) + 10) | st.integers(0, 1 << 47),
    la57=st.booleans(),
    size=st.integers(0, 3 * KB4),
)
def test_random_tables_only_raise_vmsight_errors(fill: list[int], entries: dict[int, int], dtb: int, gva: int,
                                                 la57: bool, size: int) -> None:
    buf = bytearray(b"".join(v.to_bytes(8, "little") * 512 for v in fill))
    for i, v in entries.items():
        buf[i * 8:i * 8 + 8] = v.to_bytes(8, "little")
    mem = BufferRam(buf)
    try:
        translate(mem, dtb, gva, la57=la57)
    except VmsightError:
        pass
    space = AddressSpace(mem, dtb, la57=la57)
    try:
        space.read(gva, size)
    except VmsightError:
        pass
    try:
        found = list(walk_range(mem, dtb, 0, 1 << 64, la57=la57, include_nonpresent=True, max_tables=64))
    except VmsightError:
        found = []
    for m in found:
        assert 0 <= m.gva < 1 << 64 and m.page_size in (KB4, MB2, GB1)
    try:
        clear_accessed(mem, [m.pte_gpa for m in found[:100]])
    except VmsightError:
        pass


def test_clear_accessed_on_read_only_ram_is_a_clear_error() -> None:
    pt = PageTables()
    g = pt.map(0x1000, 0x5000, flags=P | RW | A)
    ro = BufferRam(memoryview(bytes(pt.buf)))      # read-only buffer, same contents
    with pytest.raises(PermissionDenied):
        clear_accessed(ro, [g])
