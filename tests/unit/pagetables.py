"""Builder of synthetic x86-64 page tables in a bytearray, for unit tests.

Independent of vmsight.memory.paging on purpose: it keeps its own map of the tables it created, so a test
compares the walker with what was built, not with itself. Swap entries are built with the kernel's own
``__swp_entry`` formula (arch/x86/include/asm/pgtable_64.h, post-L1TF)."""

from __future__ import annotations

from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import BufferRam

P, RW, US, PWT, PCD, A, D, PS, G = (1 << b for b in range(9))
PROTNONE = G
NX = 1 << 63
U64 = (1 << 64) - 1
ADDR = 0x000FFFFFFFFFF000

KB4, MB2, GB1 = 1 << 12, 1 << 21, 1 << 30

# arch/x86/include/asm/pgtable_64.h
SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = 9              # _PAGE_BIT_PROTNONE + 1
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS


def swp_entry(swap_type: int, offset: int) -> int:
    """``__swp_entry(type, offset)`` = ``(~offset << SWP_OFFSET_SHIFT >> SWP_TYPE_BITS) | type << 59`` with
    unsigned long arithmetic (``~`` and ``<<`` wrap at 64 bits)."""
    return ((((~offset) << SWP_OFFSET_SHIFT) & U64) >> SWP_TYPE_BITS) | ((swap_type << (64 - SWP_TYPE_BITS)) & U64)


def protnone_pte(pfn: int, flags: int = PROTNONE | A) -> int:
    """A PROT_NONE PTE as Linux writes it since L1TF: P clear, PFN bits inverted (pgtable-invert.h)."""
    return ((~(pfn << 12)) & ADDR) | flags


def canonical(lin: int, bits: int = 48) -> int:
    """Sign-extend a ``bits``-wide linear address."""
    return lin | (U64 ^ ((1 << bits) - 1)) if lin >> (bits - 1) & 1 else lin


class PageTables:
    """Guest RAM (``size`` bytes, one range at gpa 0 unless ``layout`` says otherwise) plus page tables
    allocated downwards from ``table_top``. ``root`` is the top-level table (the dtb)."""

    def __init__(self, size: int = 16 << 20, *, la57: bool = False, table_top: int | None = None,
                 layout: RamLayout | None = None) -> None:
        self.buf = bytearray(size)
        self.mem = BufferRam(self.buf, layout or RamLayout([RamRange(0, size, 0, "test")]))
        self.la57 = la57
        self.top = 5 if la57 else 4
        self._next = [table_top if table_top is not None else size]   # shared with with_root() copies
        self.tables: dict[tuple[int, int], int] = {}   # (level, gva >> (shift of level + 9)) -> table gpa
        self.root = self.alloc_table()

    def with_root(self, root: int) -> PageTables:
        """Another address space in the same RAM (and table allocator), top-level table at ``root``."""
        other = object.__new__(PageTables)
        other.__dict__.update(self.__dict__)
        other.tables = {}
        other.root = root
        other.mem.write_gpa(root, bytes(KB4))
        return other

    def alloc_table(self) -> int:
        self._next[0] -= KB4
        gpa = self._next[0]
        assert gpa >= 0, "out of table space"
        self.mem.write_gpa(gpa, bytes(KB4))
        return gpa

    # raw entry access (gpa -> buffer offset is identity for the default layout)
    def _off(self, gpa: int) -> int:
        r = self.mem.layout.find(gpa)
        assert r is not None
        return r.offset + gpa - r.gpa

    def get(self, gpa: int) -> int:
        o = self._off(gpa)
        return int.from_bytes(self.buf[o:o + 8], "little")

    def put(self, gpa: int, value: int) -> None:
        o = self._off(gpa)
        self.buf[o:o + 8] = (value & U64).to_bytes(8, "little")

    @staticmethod
    def shift(level: int) -> int:
        return 12 + 9 * (level - 1)

    def table_for(self, level: int, gva: int, upper: int = P | RW | US) -> int:
        """The level-``level`` table covering ``gva``, creating tables above it as needed."""
        key = (level, (gva & U64) >> (self.shift(level) + 9) & ((1 << (9 * (self.top - level))) - 1))
        if level == self.top:
            return self.root
        t = self.tables.get(key)
        if t is None:
            parent = self.table_for(level + 1, gva, upper)
            t = self.alloc_table()
            self.tables[key] = t
            self.put(self.entry_gpa_in(parent, level + 1, gva), t | upper)
        return t

    def entry_gpa_in(self, table: int, level: int, gva: int) -> int:
        return table + (((gva >> self.shift(level)) & 511) << 3)

    def entry_gpa(self, level: int, gva: int) -> int:
        """Where the level-``level`` entry for ``gva`` lives (creating tables above it)."""
        return self.entry_gpa_in(self.table_for(level, gva), level, gva)

    def set_entry(self, level: int, gva: int, value: int) -> int:
        """Write a raw entry at ``level`` for ``gva``; returns its gpa."""
        g = self.entry_gpa(level, gva)
        self.put(g, value)
        return g

    def map(self, gva: int, gpa: int, page_size: int = KB4, flags: int = P | RW | US | A) -> int:
        """Map one page; returns the gpa of the leaf entry."""
        if page_size == KB4:
            return self.set_entry(1, gva, (gpa & ADDR) | flags)
        if page_size == MB2:
            assert gpa % MB2 == 0
            return self.set_entry(2, gva, gpa | flags | PS)
        if page_size == GB1:
            assert gpa % GB1 == 0
            return self.set_entry(3, gva, gpa | flags | PS)
        raise ValueError(page_size)
