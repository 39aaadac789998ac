"""Backend-neutral result of one idle read: :class:`IdleSnapshot`.

Layout (shared by every backend, including future ones that harvest guest page-table accessed bits):

* ``segments``: a sparse bitmap indexed by virtual frame number (vfn = gva >> 12). Each :class:`IdleSegment`
  starts at a multiple of 64 pages and holds ``idle`` u64 words in the proposed ``/proc/PID/page_idle`` layout:
  word ``vfn // 64`` (relative to the segment's first word), bit ``vfn % 64``, set = idle. Per-page arrays of the
  same segment (index ``vfn - start_vfn``) carry what the ABI lacked: ``state`` (:class:`PageState` flags),
  ``swap_type``/``swap_offset`` (valid where SWAPPED) and ``pfn`` (0 = unknown).
* ``vmas``: the process's VMAs at read time; ``usage``: per-VMA byte counts, the backend's best numbers (for a
  VMA-granular backend these are exact counts even where the bitmap cannot say which page).
* A page's idle bit is meaningful only where ``state`` has TRACKED; elsewhere it reads 0 ("not known idle"),
  exactly as the ABI reports non-present pages. Unknown is never reported as idle, and a backend that cannot see
  anything raises instead of returning an all-active snapshot.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmsight.idle.abi import PAGE_SHIFT, PAGE_SIZE, WORD_BITS, pack_bits, unpack_bits
from vmsight.idle.procfs import Vma

FORMAT_VERSION = 1


class PageState(enum.IntFlag):
    """Per-page state (uint16 per page)."""

    PRESENT = 1 << 0      # mapped to a page frame
    SWAPPED = 1 << 1      # a swap (or migration) entry: swap_type/swap_offset valid when root
    FILE = 1 << 2         # file page or shared anonymous page (pagemap bit 61)
    EXCLUSIVE = 1 << 3    # mapped by this process only (pagemap bit 56); clear = shared
    HUGE = 1 << 4         # part of a transparent huge page / large folio (or hugetlb)
    SOFT_DIRTY = 1 << 5
    TRACKED = 1 << 6      # the backend judged this page: its idle bit is meaningful
    CHANGED = 1 << 7      # frame changed between mark and read (migrated, reclaimed+refaulted): not judged
    ZERO_PAGE = 1 << 8    # the shared zero page (never tracked by page_idle)
    NEW = 1 << 9          # became present during the interval (faulted in = accessed)
    APPROXIMATE = 1 << 10  # idle bit inferred for a region or VMA, not observed for this page


STATE_DTYPE = np.uint16


@dataclass
class IdleSegment:
    """Pages [start_vfn, start_vfn + 64 * len(idle)). ``start_vfn`` is a multiple of 64."""

    start_vfn: int
    idle: npt.NDArray[np.uint64]
    state: npt.NDArray[np.uint16]
    swap_type: npt.NDArray[np.uint8]
    swap_offset: npt.NDArray[np.uint64]
    pfn: npt.NDArray[np.uint64]

    @classmethod
    def empty(cls, start_vfn: int, nr_pages: int) -> IdleSegment:
        if start_vfn % WORD_BITS:
            raise ValueError(f"segment start vfn {start_vfn:#x} is not a multiple of 64")
        n = -(-nr_pages // WORD_BITS) * WORD_BITS
        return cls(start_vfn, np.zeros(n // WORD_BITS, np.uint64), np.zeros(n, STATE_DTYPE),
                   np.zeros(n, np.uint8), np.zeros(n, np.uint64), np.zeros(n, np.uint64))

    @property
    def nr_pages(self) -> int:
        return len(self.state)

    @property
    def end_vfn(self) -> int:
        return self.start_vfn + self.nr_pages

    @property
    def first_word(self) -> int:
        return self.start_vfn // WORD_BITS

    def idle_pages(self) -> npt.NDArray[np.bool_]:
        return unpack_bits(self.idle)[: self.nr_pages]

    def set_idle(self, idle: npt.NDArray[np.bool_]) -> None:
        self.idle = pack_bits(idle)

    def has(self, flag: PageState) -> npt.NDArray[np.bool_]:
        return (self.state & np.uint16(flag)) != 0


@dataclass
class VmaUsage:
    """Per-VMA byte counts of one read. ``accessed_bytes`` + ``idle_bytes`` = tracked resident bytes."""

    vma: Vma
    present_bytes: int = 0
    accessed_bytes: int = 0
    idle_bytes: int = 0
    swapped_bytes: int = 0
    huge_bytes: int = 0
    untracked_bytes: int = 0   # resident but not judged (not on LRU, zero page, changed, VMA-ambiguous)

    def to_json(self) -> dict[str, object]:
        return {"name": self.vma.name, "label": self.vma.label, "kind": self.vma.kind,
                "start_gva": self.vma.start_gva, "end_gva": self.vma.end_gva,
                "mapped_bytes": self.vma.size, "present_bytes": self.present_bytes,
                "accessed_bytes": self.accessed_bytes, "idle_bytes": self.idle_bytes,
                "swapped_bytes": self.swapped_bytes, "huge_bytes": self.huge_bytes,
                "untracked_bytes": self.untracked_bytes}


@dataclass
class AccessRegion:
    """A region-granular observation (DAMON): [start_gva, end_gva) saw ``nr_accesses`` samples hit in the last
    aggregation interval and kept that access level for ``age`` aggregation intervals."""

    start_gva: int
    end_gva: int
    nr_accesses: int
    age: int


@dataclass
class IdleSnapshot:
    """One read of a tracked process. ``start_boottime_ns``: when the process started, in ns since boot (the
    kernel's ``task->start_boottime``; from /proc/PID/stat's clock ticks on the host, so to a tick);
    ``read_time_ns`` / ``mark_time_ns``: this process's monotonic clock."""

    pid: int
    comm: str
    start_boottime_ns: int
    backend: str
    granularity: str            # "page", "region" or "vma"
    approximate: bool
    segments: list[IdleSegment]
    vmas: list[Vma]
    usage: list[VmaUsage]
    read_time_ns: int
    mark_time_ns: int | None = None
    known: PageState = PageState(0)   # which PageState flags this backend could determine
    partial: bool = False
    warnings: list[str] = field(default_factory=list)
    regions: list[AccessRegion] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    # --- queries --------------------------------------------------------------------------------------
    def segment_of(self, vfn: int) -> IdleSegment | None:
        for s in self.segments:
            if s.start_vfn <= vfn < s.end_vfn:
                return s
        return None

    def is_idle(self, gva: int) -> bool:
        vfn = gva >> PAGE_SHIFT
        s = self.segment_of(vfn)
        if s is None:
            return False
        i = vfn - s.start_vfn
        return bool((int(s.idle[i // WORD_BITS]) >> (i % WORD_BITS)) & 1)

    def state_of(self, gva: int) -> PageState:
        vfn = gva >> PAGE_SHIFT
        s = self.segment_of(vfn)
        return PageState(int(s.state[vfn - s.start_vfn])) if s else PageState(0)

    def words(self, start_vfn: int, end_vfn: int) -> npt.NDArray[np.uint64]:
        """Bitmap words for [start_vfn, end_vfn) (both rounded out to 64 pages) exactly as the proposed
        ``/proc/PID/page_idle`` would return them from offset ``start_vfn // 64 * 8``; unread words are 0."""
        w0 = start_vfn // WORD_BITS
        w1 = -(-end_vfn // WORD_BITS)
        out = np.zeros(max(w1 - w0, 0), np.uint64)
        for s in self.segments:
            a, b = max(w0, s.first_word), min(w1, s.first_word + len(s.idle))
            if a < b:
                out[a - w0:b - w0] = s.idle[a - s.first_word:b - s.first_word]
        return out

    def iter_words(self, start_vfn: int, end_vfn: int,
                   chunk_words: int = 1 << 16) -> Iterator[tuple[int, npt.NDArray[np.uint64]]]:
        """:meth:`words` in pieces of at most ``chunk_words`` (first vfn, words): a span as large as the whole
        user address space (2^29+ words, mostly unmapped zeros) without holding it."""
        v = start_vfn // WORD_BITS * WORD_BITS
        while v < end_vfn:
            e = min(v + chunk_words * WORD_BITS, end_vfn)
            yield v, self.words(v, e)
            v = e

    def pages(self, flag: PageState | None = None, idle: bool | None = None) -> npt.NDArray[np.int64]:
        """Sorted vfns of pages that have ``flag`` (all of its bits) and, if given, that idle state."""
        out = []
        for s in self.segments:
            m = np.ones(s.nr_pages, bool)
            if flag is not None:
                m &= (s.state & np.uint16(flag)) == np.uint16(flag)
            if idle is not None:
                m &= s.idle_pages() == idle
            out.append(np.nonzero(m)[0].astype(np.int64) + s.start_vfn)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def count(self, flag: PageState, idle: bool | None = None) -> int:
        return int(len(self.pages(flag, idle)))

    @property
    def accessed_bytes(self) -> int:
        """Working-set size: bytes seen accessed during the interval (sum over VMAs)."""
        return sum(u.accessed_bytes for u in self.usage)

    @property
    def idle_bytes(self) -> int:
        return sum(u.idle_bytes for u in self.usage)

    @property
    def present_bytes(self) -> int:
        return sum(u.present_bytes for u in self.usage)

    @property
    def swapped_bytes(self) -> int:
        return sum(u.swapped_bytes for u in self.usage)


def _usage_predicates() -> npt.NDArray[np.int64]:
    """(6, 256) 0/1 matrix: which usage categories a per-page code counts in. A code is the page's PRESENT,
    SWAPPED, HUGE and TRACKED bits (all below bit 7) plus bit 7 = idle."""
    c = np.arange(256)

    def on(flag: int) -> npt.NDArray[np.bool_]:
        return (c & flag) != 0

    present, tracked, idle = on(PageState.PRESENT), on(PageState.TRACKED), on(0x80)
    return np.stack([present, present & tracked & ~idle, present & tracked & idle, on(PageState.SWAPPED),
                     present & on(PageState.HUGE), present & ~tracked]).astype(np.int64)


_USAGE_CODE_MASK = np.uint16(PageState.PRESENT | PageState.SWAPPED | PageState.HUGE | PageState.TRACKED)
_USAGE_PREDICATES = _usage_predicates()


def usage_from_segments(vmas: Iterable[Vma], segments: list[IdleSegment]) -> list[VmaUsage]:
    """Per-VMA counts from per-page data (page- and region-granular backends). Per segment, one bincount of
    (stretch between VMA boundaries, page code): VMAs never overlap, so each is exactly one stretch."""
    vmas = list(vmas)
    totals = np.zeros((len(vmas), 6), np.int64)
    order = sorted(range(len(vmas)), key=lambda i: vmas[i].start_gva)
    ends = [vmas[i].end_gva >> PAGE_SHIFT for i in order]
    for s in segments:
        inside = []
        for k in range(bisect.bisect_right(ends, s.start_vfn), len(order)):
            v = vmas[order[k]]
            if v.start_gva >> PAGE_SHIFT >= s.end_vfn:
                break
            inside.append((order[k], max(v.start_gva >> PAGE_SHIFT, s.start_vfn) - s.start_vfn,
                           min(v.end_gva >> PAGE_SHIFT, s.end_vfn) - s.start_vfn))
        if not inside:
            continue
        cuts = sorted({0} | {a for _, a, _ in inside} | {b for _, _, b in inside if b < s.nr_pages})
        key = np.repeat(np.arange(0, len(cuts) << 8, 256, dtype=np.int64), np.diff(np.append(cuts, s.nr_pages)))
        key |= s.state & _USAGE_CODE_MASK
        key |= s.idle_pages().view(np.uint8) << np.uint8(7)
        hist = np.bincount(key, minlength=len(cuts) << 8).reshape(len(cuts), 256)
        where = {c: k for k, c in enumerate(cuts)}
        for i, a, _ in inside:
            totals[i] += _USAGE_PREDICATES @ hist[where[a]]
    out = []
    for v, tot in zip(vmas, totals, strict=True):
        n = [int(x) * PAGE_SIZE for x in tot]
        out.append(VmaUsage(v, present_bytes=n[0], accessed_bytes=n[1], idle_bytes=n[2], swapped_bytes=n[3],
                            huge_bytes=n[4], untracked_bytes=n[5]))
    return out
