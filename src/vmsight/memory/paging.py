"""x86-64 guest page-table walking (4-level and 5-level paging), table-driven.

A walk reports every entry it read (:class:`PagingEntry`), so callers see the accessed (bit 5) and dirty
(bit 6) bits that idle tracking needs. Page tables live in untrusted guest memory: every walk is bounded
by construction (at most 5 levels for :func:`translate`, a table budget for :func:`walk_range`), and an
entry that points outside guest RAM raises :class:`BadPageTable` instead of reading somewhere else.

Levels are numbered like the SDM: 5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.

Linux-specific decoding of non-present entries (x86-64, since the L1TF mitigations, v4.19 and stable):

* swap entry (``arch/x86/include/asm/pgtable_64.h``): type in bits 59-63, the *inverted* offset in bits
  9-58 (commit 2f22b4cd4576 "x86/speculation/l1tf: Protect swap entries against L1TF"), bit 1 soft-dirty,
  bit 2 uffd-wp, bit 3 anon-exclusive. Migration, hwpoison, device-private and PTE-marker entries use the
  same format with a type >= MAX_SWAPFILES (config dependent), so they surface as :class:`PageSwapped` too.
  Kernels older than the L1TF fixes (type in bits 9-13, plain offset above) decode to wrong numbers.
* PROT_NONE (``_PAGE_PROTNONE``, bit 8 with P clear): present to Linux, not to the MMU; its PFN is inverted
  (L1TF series, "x86/speculation/l1tf: Protect PROT_NONE PTEs against speculation";
  ``arch/x86/include/asm/pgtable-invert.h``: every non-zero entry without P has its PFN inverted).
* ``pte_none`` ignores A and D (``_PAGE_KNL_ERRATUM_MASK``: Knights Landing sets them on non-present PTEs).
"""

from __future__ import annotations

import logging
import struct
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from vmsight.errors import (
    CorruptData,
    NonCanonicalAddress,
    PageSwapped,
    PermissionDenied,
    PhysicalAddressError,
    TranslationFault,
)
from vmsight.memory.physical import BufferRam, PhysicalMemory

log = logging.getLogger(__name__)

# --- entry bits (names follow arch/x86/include/asm/pgtable_types.h) ---------------------------------------
PAGE_PRESENT = 1 << 0
PAGE_RW = 1 << 1
PAGE_USER = 1 << 2
PAGE_PWT = 1 << 3
PAGE_PCD = 1 << 4
PAGE_ACCESSED = 1 << 5
PAGE_DIRTY = 1 << 6
PAGE_PSE = 1 << 7            # PS at PDPT/PD; at a PTE the same bit is PAT
PAGE_GLOBAL = 1 << 8
PAGE_PROTNONE = PAGE_GLOBAL  # only meaningful when P is clear
PAGE_NX = 1 << 63
PAGE_KNL_ERRATUM_MASK = PAGE_DIRTY | PAGE_ACCESSED

PTE_ADDR_MASK = 0x000FFFFFFFFFF000       # next table / 4 KiB frame (bits 12-51)
PMD_PAGE_MASK = 0x000FFFFFFFE00000       # 2 MiB frame
PUD_PAGE_MASK = 0x000FFFFFC0000000       # 1 GiB frame
PAGE_SIZE_4K = 1 << 12
PAGE_SIZE_2M = 1 << 21
PAGE_SIZE_1G = 1 << 30
_U64 = (1 << 64) - 1

# Reserved low bits of large-page entries (bit 12 is PAT there): the MMU faults with RSVD if they are set.
_RSVD_2M = 0x1FE000                      # bits 13-20
_RSVD_1G = 0x3FFFE000                    # bits 13-29

# --- swap entries (arch/x86/include/asm/pgtable_64.h, post-L1TF) ------------------------------------------
SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = 9                 # _PAGE_BIT_PROTNONE + 1
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
PAGE_SWP_SOFT_DIRTY = PAGE_RW
PAGE_SWP_UFFD_WP = PAGE_USER
PAGE_SWP_EXCLUSIVE = PAGE_PWT

CR4_LA57 = 1 << 12
CR3_NOFLUSH = 1 << 63
CR3_PTI_USER = 1 << 12                   # PTI: the user PGD is the kernel PGD + 4 KiB

# (level, shift of the index) from the top; table-driven so 4- and 5-level share one loop.
_LEVELS_4: tuple[tuple[int, int], ...] = ((4, 39), (3, 30), (2, 21), (1, 12))
_LEVELS_5: tuple[tuple[int, int], ...] = ((5, 48), *_LEVELS_4)
_IDX_SHIFTS_4 = tuple((level, shift - 3) for level, shift in _LEVELS_4)
_IDX_SHIFTS_5 = tuple((level, shift - 3) for level, shift in _LEVELS_5)
_LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}


def swp_type(pte: int) -> int:
    """``__swp_type``: the swap type (bits 59-63) of a non-present, non-PROT_NONE entry."""
    return (pte & _U64) >> (64 - SWP_TYPE_BITS)


def swp_offset(pte: int) -> int:
    """``__swp_offset``: ``~pte << SWP_TYPE_BITS >> SWP_OFFSET_SHIFT`` on an unsigned 64-bit value."""
    return ((~pte << SWP_TYPE_BITS) & _U64) >> SWP_OFFSET_SHIFT


def pte_none(pte: int) -> bool:
    """Linux ``pte_none``: zero apart from the A/D bits some CPUs set on non-present entries."""
    return not (pte & ~PAGE_KNL_ERRATUM_MASK)


def dtb_from_cr3(cr3: int) -> int:
    """Top-level table gpa from a CR3 value: drops PCID/PWT/PCD (bits 0-11), the no-flush bit 63 and LAM
    bits 61-62."""
    return cr3 & PTE_ADDR_MASK


def kernel_pgd(cr3: int) -> int:
    """PTI: the kernel half of the 8 KiB PGD pair, whichever half CR3 currently holds."""
    return cr3 & ~0x1FFF & PTE_ADDR_MASK


def user_pgd(cr3: int) -> int:
    """PTI: the user PGD (kernel PGD + 4 KiB); kernel addresses are mostly unmapped in it."""
    return kernel_pgd(cr3) + PAGE_SIZE_4K


def la57_from_cr4(cr4: int) -> bool:
    """True when CR4.LA57 (bit 12) selects 5-level paging."""
    return bool(cr4 & CR4_LA57)


def va_bits(*, la57: bool) -> int:
    """Significant virtual-address bits: 57 with 5-level paging (CR4.LA57), else 48."""
    return 57 if la57 else 48


def user_half_end(*, la57: bool) -> int:
    """First gva above the canonical lower half (where user space lives): 1 << 47, or 1 << 56 with LA57.
    Linux's TASK_SIZE_MAX is one page below (the guard page, arch/x86/include/asm/page_64.h)."""
    return 1 << (va_bits(la57=la57) - 1)


def kernel_half_start(*, la57: bool) -> int:
    """First gva of the canonical upper half (the kernel's): 0xffff800000000000, or 0xff00000000000000
    with LA57. The one definition of the kernel/user split: every validity check goes through here."""
    return (1 << 64) - user_half_end(la57=la57)


def is_kernel_half(gva: int, *, la57: bool) -> bool:
    """``gva`` lies in the canonical upper half for this paging mode (a plausible kernel pointer)."""
    return kernel_half_start(la57=la57) <= gva < 1 << 64


def is_user_half(gva: int, *, la57: bool) -> bool:
    """``gva`` lies in the canonical lower half for this paging mode (a plausible user pointer)."""
    return 0 <= gva < user_half_end(la57=la57)


def is_canonical(gva: int, *, la57: bool = False) -> bool:
    return is_user_half(gva, la57=la57) or is_kernel_half(gva, la57=la57)


# --- errors specific to the walk ----------------------------------------------------------------------

class BadPageTable(TranslationFault):
    """A page-table entry is malformed: it points to a table outside guest RAM, or has reserved bits set.
    ``level`` is the level of the offending entry (``top + 1`` when CR3/dtb itself points outside RAM,
    then ``entry`` is the dtb); ``table_gpa`` is where the next table would have been."""

    def __init__(self, gva: int, level: int, entry: int, table_gpa: int, reason: str) -> None:
        super().__init__(gva, level, entry, reason)
        self.table_gpa = table_gpa


class PageProtNone(TranslationFault):
    """The entry is PROT_NONE (``mprotect(PROT_NONE)`` or a NUMA-hinting fault): Linux treats the page as
    present and resident, the MMU does not. ``gpa`` is the frame the entry still holds (``-1`` if its
    frame is not in guest RAM with either the L1TF-inverted or the plain encoding)."""

    prot_none = True

    def __init__(self, gva: int, level: int, entry: int, gpa: int) -> None:
        super().__init__(gva, level, entry, f"is PROT_NONE (present to Linux, frame {gpa:#x}, not to the MMU)")
        self.gpa = gpa


# --- results ------------------------------------------------------------------------------------------

class PagingEntry(NamedTuple):
    """One page-table entry read during a walk: ``value`` was read at ``entry_gpa`` at ``level``."""

    level: int
    entry_gpa: int
    value: int

    @property
    def present(self) -> bool:
        return bool(self.value & PAGE_PRESENT)

    @property
    def writable(self) -> bool:
        return bool(self.value & PAGE_RW)

    @property
    def user(self) -> bool:
        return bool(self.value & PAGE_USER)

    @property
    def accessed(self) -> bool:
        return bool(self.value & PAGE_ACCESSED)

    @property
    def dirty(self) -> bool:
        return bool(self.value & PAGE_DIRTY)

    @property
    def ps(self) -> bool:
        """PS (bit 7): a 1 GiB page at level 3, a 2 MiB page at level 2. At level 1 the bit is PAT."""
        return self.level in (2, 3) and bool(self.value & PAGE_PSE)

    @property
    def global_(self) -> bool:
        return bool(self.value & PAGE_GLOBAL)

    @property
    def nx(self) -> bool:
        return bool(self.value & PAGE_NX)

    @property
    def prot_none(self) -> bool:
        return not self.value & PAGE_PRESENT and bool(self.value & PAGE_PROTNONE) and self.level <= 2

    @property
    def is_leaf(self) -> bool:
        return self.level == 1 or self.ps

    @property
    def page_size(self) -> int:
        """Size of what this entry maps if it is a leaf."""
        if self.level == 1 or not self.ps:
            return PAGE_SIZE_4K
        return PAGE_SIZE_2M if self.level == 2 else PAGE_SIZE_1G

    @property
    def frame_gpa(self) -> int:
        """The next table's gpa, or the page frame for a leaf (large-page masks applied)."""
        if self.ps:
            return self.value & (PMD_PAGE_MASK if self.level == 2 else PUD_PAGE_MASK)
        return self.value & PTE_ADDR_MASK

    @property
    def name(self) -> str:
        return _LEVEL_NAMES.get(self.level, f"L{self.level}")


class Translation:
    """``gva`` maps to ``gpa`` inside a page of ``page_size`` bytes; ``entries`` is the walk, top first.

    The :class:`PagingEntry` objects are built on first access to ``entries``: most callers want only the
    gpa, and building five named tuples costs more than the walk itself."""

    __slots__ = ("gva", "gpa", "page_size", "_walked", "_entries")

    def __init__(self, gva: int, gpa: int, page_size: int,
                 entries: Sequence[PagingEntry] | Sequence[tuple[int, int, int]]) -> None:
        self.gva = gva
        self.gpa = gpa
        self.page_size = page_size
        self._walked = entries
        self._entries: tuple[PagingEntry, ...] | None = None

    @property
    def entries(self) -> tuple[PagingEntry, ...]:
        if self._entries is None:
            self._entries = tuple(e if isinstance(e, PagingEntry) else PagingEntry._make(e) for e in self._walked)
        return self._entries

    def __iter__(self) -> Iterator[object]:  # unpacking like the NamedTuple it replaces
        return iter((self.gva, self.gpa, self.page_size, self.entries))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Translation) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash((self.gva, self.gpa, self.page_size))

    def __repr__(self) -> str:
        return f"Translation(gva={self.gva:#x}, gpa={self.gpa:#x}, page_size={self.page_size:#x}, entries={self.entries})"

    @property
    def leaf(self) -> PagingEntry:
        return self.entries[-1]

    @property
    def page_gpa(self) -> int:
        return self.gpa & ~(self.page_size - 1)

    @property
    def writable(self) -> bool:
        """Writable at every level (CR0.WP semantics for user and kernel)."""
        return all(e.value & PAGE_RW for e in self.entries)

    @property
    def user(self) -> bool:
        return all(e.value & PAGE_USER for e in self.entries)

    @property
    def nx(self) -> bool:
        return any(e.value & PAGE_NX for e in self.entries)

    @property
    def accessed(self) -> bool:
        return bool(self.entries[-1].value & PAGE_ACCESSED)

    @property
    def dirty(self) -> bool:
        return bool(self.entries[-1].value & PAGE_DIRTY)

    @property
    def global_(self) -> bool:
        return bool(self.entries[-1].value & PAGE_GLOBAL)


class LeafMapping(NamedTuple):
    """One leaf found by :func:`walk_range`. ``gva`` is the page's first address (it may lie below the range
    start for a large page), ``gpa`` its frame, or ``-1`` for a non-present entry (swap, migration) whose
    frame is unknown. ``pte_value`` was read at ``pte_gpa`` (a PTE, or a PMD/PUD for large pages)."""

    gva: int
    gpa: int
    page_size: int
    pte_value: int
    pte_gpa: int

    @property
    def present(self) -> bool:
        return bool(self.pte_value & PAGE_PRESENT)

    @property
    def accessed(self) -> bool:
        return bool(self.pte_value & PAGE_PRESENT) and bool(self.pte_value & PAGE_ACCESSED)

    @property
    def dirty(self) -> bool:
        return bool(self.pte_value & PAGE_PRESENT) and bool(self.pte_value & PAGE_DIRTY)

    @property
    def writable(self) -> bool:
        """The leaf's RW bit (upper levels are not considered here)."""
        return bool(self.pte_value & PAGE_RW)

    @property
    def prot_none(self) -> bool:
        return not self.pte_value & PAGE_PRESENT and bool(self.pte_value & PAGE_PROTNONE)

    @property
    def swapped(self) -> bool:
        """A Linux swap-format entry (swap, or migration/hwpoison/device/marker with a high type)."""
        v = self.pte_value
        return not v & PAGE_PRESENT and not v & PAGE_PROTNONE and not pte_none(v) and not (
            self.page_size != PAGE_SIZE_4K and v & PAGE_PSE)

    @property
    def swap_type(self) -> int:
        return swp_type(self.pte_value)

    @property
    def swap_offset(self) -> int:
        return swp_offset(self.pte_value)


# --- single-address walk ------------------------------------------------------------------------------

_Q = struct.Struct("<Q")
_READERS: weakref.WeakKeyDictionary[object, tuple[Callable[[int], int], Callable[[int, int], bytes]]] = (
    weakref.WeakKeyDictionary())


def fast_readers(mem: PhysicalMemory) -> tuple[Callable[[int], int], Callable[[int, int], bytes]]:
    """``(read_u64(gpa), read(gpa, size))`` for ``mem``, as fast as the backend allows.

    For a :class:`~vmsight.memory.physical.BufferRam` (and :class:`MappedRam`) that does not override its
    readers, reads go straight to its buffer with ``struct.unpack_from``/slices: no lasting buffer export
    (``MappedRam.close()`` still works) and no ``RamLayout.find`` per access. Anything not inside one RAM
    range falls back to the backend's own methods, so errors and range-spanning reads are unchanged.
    These are cached per backend (weakly: the readers hold only a weak reference to ``mem``).
    Other backends: their ``read_u64`` if they have one, else 8-byte ``read_gpa`` (not cached)."""
    try:
        return _READERS[mem]
    except (KeyError, TypeError):
        pass
    readers = _direct_readers(mem)
    if readers is None:
        return _backend_readers(mem)
    try:
        _READERS[mem] = readers
    except TypeError:  # not weak-referenceable: build each time
        pass
    return readers


def _backend_readers(mem: PhysicalMemory) -> tuple[Callable[[int], int], Callable[[int, int], bytes]]:
    read_gpa = mem.read_gpa
    ru64: Callable[[int], int] | None = getattr(mem, "read_u64", None)
    if ru64 is None:
        def ru64(gpa: int) -> int:
            return int.from_bytes(read_gpa(gpa, 8), "little")
    return ru64, read_gpa


def _direct_readers(mem: PhysicalMemory) -> tuple[Callable[[int], int], Callable[[int, int], bytes]] | None:
    buf = getattr(mem, "_buf", None)
    if not (isinstance(mem, BufferRam) and isinstance(buf, memoryview) and buf.format == "B"
            and getattr(type(mem), "read_u64", None) is BufferRam.read_u64
            and getattr(type(mem), "read_gpa", None) is BufferRam.read_gpa):
        return None
    # (first gpa, end gpa, buffer offset - gpa) per RAM range, biggest first.
    ranges = sorted(((r.gpa, r.end, r.offset - r.gpa) for r in mem.layout), key=lambda t: t[0] - t[1])
    unpack_from = _Q.unpack_from
    mem_ref = weakref.ref(mem)

    def backend() -> BufferRam:
        m = mem_ref()
        if m is None:
            raise ValueError("the physical-memory backend is gone")
        return m

    if len(ranges) == 1:
        (lo, end, delta), = ranges
        hi = end - 8

        def read_u64(gpa: int) -> int:
            if lo <= gpa <= hi:
                return unpack_from(buf, gpa + delta)[0]
            return backend().read_u64(gpa)

        def read(gpa: int, size: int) -> bytes:
            if lo <= gpa and gpa + size <= end and size >= 0:
                o = gpa + delta
                return buf[o:o + size].tobytes()
            return backend().read_gpa(gpa, size)

        return read_u64, read

    def read_u64_multi(gpa: int) -> int:
        for lo, end, delta in ranges:
            if lo <= gpa and gpa + 8 <= end:
                return unpack_from(buf, gpa + delta)[0]
        return backend().read_u64(gpa)

    def read_multi(gpa: int, size: int) -> bytes:
        for lo, end, delta in ranges:
            if lo <= gpa and gpa + size <= end and size >= 0:
                o = gpa + delta
                return buf[o:o + size].tobytes()
        return backend().read_gpa(gpa, size)

    return read_u64_multi, read_multi


def _in_ram(mem: PhysicalMemory, gpa: int) -> bool:
    return mem.layout.find(gpa) is not None


def _prot_none_gpa(mem: PhysicalMemory, value: int, mask: int) -> int:
    """Frame of a PROT_NONE entry: inverted since L1TF (pgtable-invert.h), plain on older kernels; the
    encoding whose frame lies in RAM wins."""
    inverted = ~value & mask
    if _in_ram(mem, inverted):
        return inverted
    plain = value & mask
    return plain if _in_ram(mem, plain) else -1


def _not_present(mem: PhysicalMemory, gva: int, level: int, value: int) -> TranslationFault:
    """The exception for a non-present entry at ``level``, decoded the Linux way for PTEs and PMDs."""
    if level <= 2 and not pte_none(value):
        if value & PAGE_PROTNONE:
            mask = PTE_ADDR_MASK if level == 1 else PMD_PAGE_MASK
            return PageProtNone(gva, level, value, _prot_none_gpa(mem, value, mask))
        if level == 2 and value & PAGE_PSE:
            # pmdp_invalidate() clears P on a huge PMD while it is split or changed.
            return TranslationFault(gva, level, value, "not present (huge page being invalidated)")
        # A PMD holds swap-format entries only for THP migration (bit 7 is kept clear in them).
        return PageSwapped(gva, level, value, swp_type(value), swp_offset(value))
    return TranslationFault(gva, level, value)


def _walk(mem: PhysicalMemory, dtb: int, gva: int, la57: bool, ru64: Callable[[int], int] | None = None,
          walked: list[tuple[int, int, int]] | None = None) -> tuple[int, int]:
    """Walk for ``gva``; returns (gpa, page_size) and appends (level, entry_gpa, value) per level read to
    ``walked`` if given. Raises on any fault. ``ru64`` is the entry reader (default: :func:`fast_readers`).

    This is the cold path of every translation: literals instead of module constants, one shift per
    level (``_IDX_SHIFTS`` pre-subtract 3 so the index comes out already scaled by 8)."""
    if la57:
        levels, bits = _IDX_SHIFTS_5, 57
    else:
        levels, bits = _IDX_SHIFTS_4, 48
    top = gva >> (bits - 1)
    if top != 0 and top != (1 << (65 - bits)) - 1:
        raise NonCanonicalAddress(gva, bits)
    if ru64 is None:
        ru64 = fast_readers(mem)[0]
    value = dtb & 0xFFFFFFFFFFFFFFFF
    table = value & 0x000FFFFFFFFFF000
    for level, shift in levels:
        entry_gpa = table | ((gva >> shift) & 0xFF8)
        try:
            value = ru64(entry_gpa)
        except PhysicalAddressError:   # ``value`` is still the entry (or dtb) that pointed here
            raise BadPageTable(gva, level + 1, value, table,
                               f"points to a level-{level} table at gpa {table:#x} outside guest RAM") from None
        if walked is not None:
            walked.append((level, entry_gpa, value))
        if not value & 1:                                    # P
            raise _not_present(mem, gva, level, value)
        if value & 0x80 and level != 1:                      # PS (at a PTE, bit 7 is PAT)
            return _large_leaf(gva, level, value)
        table = value & 0x000FFFFFFFFFF000
    return table | (gva & 0xFFF), 0x1000


def _large_leaf(gva: int, level: int, value: int) -> tuple[int, int]:
    if level == 2:
        if value & _RSVD_2M:
            raise BadPageTable(gva, level, value, -1, "is a 2 MiB page with reserved bits 13-20 set")
        return (value & PMD_PAGE_MASK) | (gva & (PAGE_SIZE_2M - 1)), PAGE_SIZE_2M
    if level == 3:
        if value & _RSVD_1G:
            raise BadPageTable(gva, level, value, -1, "is a 1 GiB page with reserved bits 13-29 set")
        return (value & PUD_PAGE_MASK) | (gva & (PAGE_SIZE_1G - 1)), PAGE_SIZE_1G
    raise BadPageTable(gva, level, value, -1, f"has the reserved PS bit set at level {level}")


def translate(mem: PhysicalMemory, dtb: int, gva: int, *, la57: bool = False) -> Translation:
    """Translate ``gva`` through the page tables whose top level is at ``dtb`` (a CR3 value is fine:
    PCID and bit 63 are masked).

    Raises :class:`~vmsight.errors.NonCanonicalAddress`, :class:`~vmsight.errors.TranslationFault`
    (entry not present; ``.level``/``.entry`` say where), :class:`~vmsight.errors.PageSwapped` (Linux swap
    entry), :class:`PageProtNone`, :class:`BadPageTable` (table outside RAM, reserved bits)."""
    walked: list[tuple[int, int, int]] = []
    gpa, size = _walk(mem, dtb, gva, la57, None, walked)
    return Translation(gva, gpa, size, walked)


def gva_to_gpa(mem: PhysicalMemory, dtb: int, gva: int, *, la57: bool = False) -> int:
    """Like :func:`translate` but returns only the gpa (no entry objects built)."""
    return _walk(mem, dtb, gva, la57)[0]


# --- bulk walk ----------------------------------------------------------------------------------------

class _Budget:
    """Per-walk state: tables left to read, and the reader for whole tables."""

    __slots__ = ("left", "limit", "dtb", "read")

    def __init__(self, limit: int, dtb: int, read: Callable[[int, int], bytes]) -> None:
        self.left = limit
        self.limit = limit
        self.dtb = dtb
        self.read = read


def walk_range(mem: PhysicalMemory, dtb: int, start_gva: int, end_gva: int, *, la57: bool = False,
               include_nonpresent: bool = False, max_tables: int = 1 << 16,
               strict: bool = False) -> Iterator[LeafMapping]:
    """Yield a :class:`LeafMapping` for every present page overlapping [start_gva, end_gva), in address
    order. Non-present upper-level entries skip their whole span; each table is read as one 4 KiB block.

    ``include_nonpresent``: also yield non-present but non-none PTEs/PMDs (swap, migration, PROT_NONE);
    their ``gpa`` is -1, or the frame for PROT_NONE. The non-canonical hole is skipped.

    Untrusted tables: at most ``max_tables`` tables are read (then :class:`~vmsight.errors.CorruptData`);
    an entry pointing outside RAM or with reserved bits is skipped with a warning, or raises
    :class:`BadPageTable` when ``strict``. The guest may change tables during the walk: pause it for a
    consistent picture."""
    top = 5 if la57 else 4
    half = user_half_end(la57=la57)
    upper = kernel_half_start(la57=la57)
    dtb &= _U64
    budget = _Budget(max_tables, dtb, fast_readers(mem)[1])
    for seg_lo, seg_hi, gva_bias in ((0, half, 0), (upper, 1 << 64, upper - half)):
        lo, hi = max(start_gva, seg_lo), min(end_gva, seg_hi)
        if lo >= hi:
            continue
        # Linear (un-sign-extended) index space: lin = gva - gva_bias.
        yield from _walk_table(mem, dtb & PTE_ADDR_MASK, top, 0, lo - gva_bias, hi - gva_bias, gva_bias,
                               include_nonpresent, budget, strict, top + 1, dtb)


def _bad(strict: bool, gva: int, level: int, entry: int, table_gpa: int, reason: str) -> None:
    if strict:
        raise BadPageTable(gva, level, entry, table_gpa, reason)
    log.warning("skipping gva %#x: level-%d entry %#018x %s", gva, level, entry, reason)


_PY_TABLES = 256   # tables a walk filters in pure Python before it switches to numpy (faster per table)


def _walk_table(mem: PhysicalMemory, table_gpa: int, level: int, base: int, lo: int, hi: int, bias: int,
                nonpresent: bool, budget: _Budget, strict: bool, parent_level: int,
                parent: int) -> Iterator[LeafMapping]:
    """Entries of the level-``level`` table at ``table_gpa`` covering linear [lo, hi); ``base`` is the
    linear address of its entry 0. Recursion depth is at most the number of levels."""
    if budget.left <= 0:
        raise CorruptData(f"page-table walk read more than {budget.limit} tables (dtb {budget.dtb:#x})",
                          table_gpa)
    budget.left -= 1
    try:
        raw = budget.read(table_gpa, PAGE_SIZE_4K)
    except PhysicalAddressError:
        _bad(strict, base + bias, parent_level, parent, table_gpa,
             f"points to a level-{level} table at gpa {table_gpa:#x} outside guest RAM")
        return
    shift = 12 + 9 * (level - 1)
    span = 1 << shift
    i0 = max(0, (lo - base) >> shift)
    i1 = min(512, ((hi - 1 - base) >> shift) + 1)
    if i0 >= i1:
        return
    mask = ~PAGE_KNL_ERRATUM_MASK & _U64 if nonpresent and level <= 2 else PAGE_PRESENT
    if budget.limit - budget.left <= _PY_TABLES:
        # A short walk (finding the kernel image: ~8 tables) filters in Python: importing numpy would cost
        # more than the whole walk, and `vmsight ps` needs it nowhere else.
        entries = struct.unpack_from("<512Q", raw)[i0:i1]
        hits = [(i, v) for i, v in enumerate(entries) if v & mask]
        if not hits:
            return
        idx_list = [i for i, _ in hits]
        values = [v for _, v in hits]
    else:
        import numpy as np

        arr = np.frombuffer(raw, dtype="<u8")[i0:i1]
        idx = np.flatnonzero(arr & np.uint64(mask))
        if not len(idx):
            return
        values = arr[idx].tolist()
        idx_list = idx.tolist()
    if level == 1:
        # Hot loop: one LeafMapping per 4 KiB page.
        first_gva = base + bias + (i0 << 12)
        first_egpa = table_gpa + (i0 << 3)
        for i, v in zip(idx_list, values, strict=True):
            if v & PAGE_PRESENT:
                gpa = v & PTE_ADDR_MASK
            elif v & PAGE_PROTNONE:
                gpa = _prot_none_gpa(mem, v, PTE_ADDR_MASK)
            else:
                gpa = -1
            yield LeafMapping(first_gva + (i << 12), gpa, PAGE_SIZE_4K, v, first_egpa + (i << 3))
        return
    for i, v in zip(idx_list, values, strict=True):
        j = i0 + i
        lin = base + j * span
        entry_gpa = table_gpa + (j << 3)
        if not v & PAGE_PRESENT:               # only reached with nonpresent at level 2
            gpa = _prot_none_gpa(mem, v, PMD_PAGE_MASK) if v & PAGE_PROTNONE else -1
            yield LeafMapping(lin + bias, gpa, span, v, entry_gpa)
            continue
        if v & PAGE_PSE:
            if level == 2 and not v & _RSVD_2M:
                yield LeafMapping(lin + bias, v & PMD_PAGE_MASK, span, v, entry_gpa)
            elif level == 3 and not v & _RSVD_1G:
                yield LeafMapping(lin + bias, v & PUD_PAGE_MASK, span, v, entry_gpa)
            else:
                _bad(strict, lin + bias, level, v, -1, f"has reserved bits set (PS at level {level})")
            continue
        yield from _walk_table(mem, v & PTE_ADDR_MASK, level - 1, lin, max(lo, lin), min(hi, lin + span),
                               bias, nonpresent, budget, strict, level, v)


# --- accessed-bit harvesting --------------------------------------------------------------------------

def clear_accessed(mem: PhysicalMemory, pte_gpas: Sequence[int], expected: Sequence[int] | None = None,
                   *, max_retries: int = 8) -> list[bool]:
    """Test-and-clear the Accessed bit (5) of the leaf entries at ``pte_gpas``; returns, per entry, whether
    it was present with A set and was cleared (``ptep_test_and_clear_young`` semantics, without the flush).

    Not atomic: Python has no atomic and-not on guest RAM, so while the guest runs, a D bit (or any other
    change) the MMU writes between our compare and our store is lost. The store is a compare-then-write of
    the whole entry, retried when the entry changed since it was read; this narrows the window to a few
    hundred ns but does not close it: pause the guest for exact results (and because a PTE page could be
    freed and reused between the walk and this call). Pass ``expected`` (the ``pte_value`` from
    :func:`walk_range`) to leave alone entries whose frame or flags changed apart from A/D since.

    Entries that are not present (swap, PROT_NONE) are never written. A gpa outside RAM raises
    :class:`~vmsight.errors.PhysicalAddressError`. On the guest's own TLB: a cleared
    bit is set again only when the vCPU re-walks the tables (see FIELD-NOTES, "Accessed bits under TCG")."""
    if expected is not None and len(expected) != len(pte_gpas):
        raise ValueError("expected must have one value per pte gpa")
    view = getattr(mem, "view", None) if sys.byteorder == "little" else None
    tables: dict[int, memoryview] = {}
    keep = ~(PAGE_ACCESSED | PAGE_DIRTY) & _U64
    out: list[bool] = []
    try:
        for n, pte_gpa in enumerate(pte_gpas):
            want = None if expected is None else expected[n] & keep
            cleared = False
            if view is not None and not pte_gpa & 7:
                # Aligned 8-byte item stores through a 'Q' view: never torn, unlike a byte-wise copy.
                page = pte_gpa & ~0xFFF
                q = tables.get(page)
                if q is None:
                    q = tables[page] = view(page, PAGE_SIZE_4K).cast("Q")
                    if q.readonly:
                        raise PermissionDenied(f"cannot clear accessed bits: guest RAM ({mem.name}) is "
                                               "mapped read-only; attach with write access")
                i = (pte_gpa & 0xFFF) >> 3
                for _ in range(max_retries):
                    old = q[i]
                    if not old & PAGE_PRESENT or not old & PAGE_ACCESSED or (
                            want is not None and old & keep != want):
                        break
                    if q[i] == old:               # compare ...
                        q[i] = old & ~PAGE_ACCESSED  # ... then store
                        cleared = True
                        break
                else:
                    log.warning("pte at gpa %#x kept changing; A bit left set", pte_gpa)
            else:
                cleared = _clear_accessed_slow(mem, pte_gpa, want, keep, max_retries)
            out.append(cleared)
    finally:
        for q in tables.values():
            q.release()
    return out


def _clear_accessed_slow(mem: PhysicalMemory, pte_gpa: int, want: int | None, keep: int, retries: int) -> bool:
    ru64 = fast_readers(mem)[0]
    for _ in range(retries):
        old = ru64(pte_gpa)
        if not old & PAGE_PRESENT or not old & PAGE_ACCESSED or (want is not None and old & keep != want):
            return False
        if ru64(pte_gpa) == old:
            mem.write_gpa(pte_gpa, (old & ~PAGE_ACCESSED).to_bytes(8, "little"))
            return True
    log.warning("pte at gpa %#x kept changing; A bit left set", pte_gpa)
    return False


__all__ = [
    "BadPageTable", "LeafMapping", "PageProtNone", "PagingEntry", "Translation", "clear_accessed",
    "dtb_from_cr3", "fast_readers", "gva_to_gpa", "is_canonical", "is_kernel_half", "is_user_half",
    "kernel_half_start", "kernel_pgd", "la57_from_cr4", "pte_none", "swp_offset", "swp_type", "translate",
    "user_half_end", "user_pgd", "va_bits", "walk_range",
]
