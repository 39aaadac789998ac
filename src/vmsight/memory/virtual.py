"""Guest-virtual memory: one address space (a dtb) over any :class:`PhysicalMemory` backend.

:class:`AddressSpace` keeps a small software TLB (virtual page -> physical frame, plain dicts) so repeated
reads cost one dict lookup plus the physical read. The guest can change its page tables whenever it runs,
so the cache is only valid while the guest is paused: the owner (a live VM) calls :meth:`invalidate` on
resume; it is O(1). There is deliberately no ``lru_cache`` on methods (stale tables on a live VM).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmsight.errors import CorruptData
from vmsight.memory.paging import PAGE_SIZE_1G, PAGE_SIZE_2M, Translation, _walk, fast_readers, translate
from vmsight.memory.physical import PhysicalMemory

log = logging.getLogger(__name__)

_PAGE = 0x1000
_OFF = 0xFFF


def cstr(raw: bytes) -> bytes:
    """The bytes of a fixed C buffer (``char comm[16]``) before its first NUL, or all of them without one."""
    return raw.split(b"\0", 1)[0]


def read_cstr(read: Callable[[int, int], bytes], gva: int, max_len: int = 4096) -> bytes:
    """The NUL-terminated string at ``gva`` (without the NUL), at most ``max_len`` bytes, through
    ``read(gva, size)`` (an address space, a kernel, a test's bytearray). The one C-string reader: it reads
    page by page, so a string that ends just before an unmapped page still reads; a fault on a page it
    needs propagates (MemoryAccessError), and a reader that returns fewer bytes than asked is CorruptData."""
    out = bytearray()
    pos = gva
    while len(out) < max_len:
        n = min(max_len - len(out), _PAGE - (pos & _OFF))
        chunk = read(pos, n)
        if len(chunk) != n:
            raise CorruptData(f"short read: {len(chunk)} of {n} bytes", pos)
        nul = chunk.find(b"\0")
        if nul >= 0:
            out += chunk[:nul]
            return bytes(out)
        out += chunk
        pos += n
    return bytes(out)


class AddressSpace:
    """Guest-virtual view of ``mem`` through the page tables at ``dtb`` (a CR3 value is accepted: PCID and
    bit 63 are masked). ``la57`` selects 5-level paging (CR4.LA57).

    Reads and writes translate every page they touch; a translation failure raises the fault of the first
    page that failed (``.gva`` is that page's first byte inside the request). Writes do not honour the RW
    bit (this is a debugger's view); a write to a shared page (zero page, page cache, KSM) is seen by
    every process that maps it."""

    def __init__(self, mem: PhysicalMemory, dtb: int, *, la57: bool = False, max_cached: int = 1 << 16) -> None:
        self.mem = mem
        self.dtb = dtb
        self.la57 = la57
        self.max_cached = max_cached
        readers = fast_readers(mem)
        self._ru64: Callable[[int], int] = readers[0]
        self._read_gpa: Callable[[int, int], bytes] = readers[1]
        # vfn (gva >> 12) -> gpa of the 4 KiB frame; large pages also by gva >> 21 / gva >> 30.
        self._tlb: dict[int, int] = {}
        self._tlb_2m: dict[int, int] = {}
        self._tlb_1g: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"AddressSpace(dtb={self.dtb:#x}, la57={self.la57}, backend={self.mem.name!r})"

    @property
    def cached_pages(self) -> int:
        """Number of 4 KiB translations currently cached."""
        return len(self._tlb)

    # --- translation -------------------------------------------------------------------------------

    def invalidate(self, gva: int | None = None) -> None:
        """Drop cached translations: all of them (O(1)), or those covering ``gva``."""
        if gva is None:
            self._tlb = {}
            self._tlb_2m = {}
            self._tlb_1g = {}
            return
        self._tlb.pop(gva >> 12, None)
        self._tlb_2m.pop(gva >> 21, None)
        self._tlb_1g.pop(gva >> 30, None)

    def translate(self, gva: int) -> Translation:
        """Full, uncached walk with every entry (see :func:`vmsight.memory.paging.translate`); refreshes
        the cache for this page."""
        caches = self._tlb, self._tlb_2m, self._tlb_1g
        t = translate(self.mem, self.dtb, gva, la57=self.la57)
        self._remember(caches, gva, t.gpa, t.page_size)
        return t

    def gva_to_gpa(self, gva: int) -> int:
        """Cached translation of one address."""
        frame = self._tlb.get(gva >> 12)
        if frame is None:
            frame = self._fill(gva)
        return frame | (gva & _OFF)

    def _fill(self, gva: int) -> int:
        """Cache miss: large-page entries first, then a walk. Returns the 4 KiB frame gpa of ``gva``.
        The caches are captured before the walk: if :meth:`invalidate` runs meanwhile (another thread
        resuming the guest), the result lands in the discarded dicts, never in the fresh ones."""
        caches = tlb, tlb_2m, tlb_1g = self._tlb, self._tlb_2m, self._tlb_1g
        base = tlb_2m.get(gva >> 21)
        if base is not None:
            frame = base | (gva & (PAGE_SIZE_2M - _PAGE))
        else:
            base = tlb_1g.get(gva >> 30)
            if base is None:
                gpa, size = _walk(self.mem, self.dtb, gva, self.la57, self._ru64)
                return self._remember(caches, gva, gpa, size)
            frame = base | (gva & (PAGE_SIZE_1G - _PAGE))
        if len(tlb) >= self.max_cached:
            tlb.clear()
        tlb[gva >> 12] = frame
        return frame

    def _remember(self, caches: tuple[dict[int, int], dict[int, int], dict[int, int]], gva: int, gpa: int,
                  size: int) -> int:
        tlb, tlb_2m, tlb_1g = caches
        if len(tlb) >= self.max_cached:
            tlb.clear()
            tlb_2m.clear()
            tlb_1g.clear()
        if size == PAGE_SIZE_2M:
            tlb_2m[gva >> 21] = gpa & ~(PAGE_SIZE_2M - 1)
        elif size == PAGE_SIZE_1G:
            tlb_1g[gva >> 30] = gpa & ~(PAGE_SIZE_1G - 1)
        frame = gpa & ~_OFF
        tlb[gva >> 12] = frame
        return frame

    # --- reads and writes --------------------------------------------------------------------------

    def read(self, gva: int, size: int) -> bytes:
        """``size`` bytes at ``gva``; may span pages (physically contiguous pieces are read at once)."""
        off = gva & _OFF
        if off + size <= _PAGE:
            if size <= 0:
                if size < 0:
                    raise ValueError(f"negative size {size}")
                return b""
            frame = self._tlb.get(gva >> 12)
            if frame is None:
                frame = self._fill(gva)
            return self._read_gpa(frame | off, size)
        return b"".join(self._read_gpa(gpa, n) for gpa, n in self._runs(gva, size))

    def _runs(self, gva: int, size: int) -> list[tuple[int, int]]:
        """Translate [gva, gva+size) page by page into physically contiguous (gpa, length) runs. All pages
        are translated before any I/O, so a fault leaves nothing half done."""
        runs: list[tuple[int, int]] = []
        pos, end = gva, gva + size
        tlb = self._tlb
        while pos < end:
            n = min(end, (pos | _OFF) + 1) - pos
            frame = tlb.get(pos >> 12)
            if frame is None:
                frame = self._fill(pos)
                tlb = self._tlb
            gpa = frame | (pos & _OFF)
            if runs and runs[-1][0] + runs[-1][1] == gpa:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((gpa, n))
            pos += n
        return runs

    def read_u64(self, gva: int) -> int:
        off = gva & _OFF
        if off <= 0xFF8:
            frame = self._tlb.get(gva >> 12)
            if frame is None:
                frame = self._fill(gva)
            return self._ru64(frame | off)
        return int.from_bytes(self.read(gva, 8), "little")

    def read_u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def read_u16(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 2), "little")

    def read_u8(self, gva: int) -> int:
        return self.read(gva, 1)[0]

    def read_cstr(self, gva: int, max_len: int = 4096) -> bytes:
        """:func:`read_cstr` through this address space."""
        return read_cstr(self.read, gva, max_len)

    def write(self, gva: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gva``; every page is translated before the first byte is written."""
        data = bytes(data)
        pos = 0
        for gpa, n in self._runs(gva, len(data)):
            self.mem.write_gpa(gpa, data[pos:pos + n])
            pos += n

    def write_u64(self, gva: int, value: int) -> None:
        self.write(gva, (value & ((1 << 64) - 1)).to_bytes(8, "little"))


class AddressSpaces:
    """The address spaces of one target, one per (dtb, paging mode), made on first use; ``invalidate()``
    drops every cached translation (the guest ran). One implementation for live VMs, dumps and the event
    dispatcher, so that a resume cannot leave one of them stale."""

    def __init__(self) -> None:
        self._by_root: dict[tuple[int, bool], AddressSpace] = {}

    def get(self, phys: PhysicalMemory, dtb: int, la57: bool) -> AddressSpace:
        sp = self._by_root.get((dtb, la57))
        if sp is None:
            sp = self._by_root[(dtb, la57)] = AddressSpace(phys, dtb, la57=la57)
        return sp

    def invalidate(self) -> None:
        for sp in self._by_root.values():
            sp.invalidate()

    def clear(self) -> None:
        self._by_root.clear()


__all__ = ["AddressSpace", "AddressSpaces", "cstr", "read_cstr"]
