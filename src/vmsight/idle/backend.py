"""What every idle backend shares: the interface, pagemap scanning, and building snapshot segments."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from vmsight.idle.abi import (
    PAGE_SHIFT,
    PAGEMAP_ENTRY,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    U64,
    WORD_BITS,
    pack_bits,
    pagemap_pfn,
    pagemap_swap,
    unpack_bits,
)
from vmsight.idle.errors import ProcessGone
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.procfs import Process, Vma
from vmsight.idle.result import (
    STATE_DTYPE,
    AccessRegion,
    IdleSegment,
    IdleSnapshot,
    PageState,
    VmaUsage,
    usage_from_segments,
)

log = logging.getLogger(__name__)

VfnRange = tuple[int, int]      # [start_vfn, end_vfn)
PAGEMAP_CHUNK = 1 << 16         # entries per pagemap pread (512 KiB)


@dataclass(frozen=True)
class Unavailable:
    """Why a backend cannot run: ``option`` names the kernel option or capability to fix it."""

    reason: str
    option: str = ""
    permission: bool = False


@dataclass(frozen=True)
class BackendResult:
    """What one backend read saw, beyond which pages were idle (``segments``)."""

    segments: list[IdleSegment]
    known: PageState                         # the PageState flags this backend could determine
    mark_time_ns: int | None                 # monotonic ns of the mark this read ends (None: never marked)
    usage: list[VmaUsage] | None = None      # exact per-VMA counts (VMA-granular backend); None: from segments
    warnings: tuple[str, ...] = ()
    regions: tuple[AccessRegion, ...] = ()   # region-granular backends (DAMON): the regions as sampled


def in_ranges(vmas: list[Vma], vfn_ranges: list[VfnRange]) -> list[Vma]:
    """The VMAs that overlap ``vfn_ranges``."""
    return [v for v in vmas
            if any(v.start_gva >> PAGE_SHIFT < hi and lo < v.end_gva >> PAGE_SHIFT for lo, hi in vfn_ranges)]


def make_snapshot(res: BackendResult, *, pid: int, comm: str, start_boottime_ns: int, backend: str,
                  granularity: str, approximate: bool, vmas: list[Vma], vfn_ranges: list[VfnRange],
                  partial: bool = False, warnings: tuple[str, ...] = ()) -> IdleSnapshot:
    """The snapshot of one read: ``res`` with the VMAs it covers (per-VMA usage counted from its segments
    unless the backend counted it) and ``warnings`` after the backend's own."""
    in_range = in_ranges(vmas, vfn_ranges)
    usage = res.usage if res.usage is not None else usage_from_segments(in_range, res.segments)
    return IdleSnapshot(
        pid=pid, comm=comm, start_boottime_ns=start_boottime_ns, backend=backend, granularity=granularity,
        approximate=approximate, segments=res.segments, vmas=in_range, usage=usage, read_time_ns=now_ns(),
        mark_time_ns=res.mark_time_ns, known=res.known, partial=partial,
        warnings=[*res.warnings, *warnings], regions=list(res.regions))


class Backend:
    """Interface of an idle backend. ``granularity``: "page", "region" or "vma"."""

    name = "?"
    granularity = "page"
    approximate = False
    option = ""

    @classmethod
    def probe(cls, proc: KernelFiles, sysfs: KernelFiles, pid: int) -> Unavailable | None:
        """None if the backend can run here, else why not. Must not write anything."""
        raise NotImplementedError

    def __init__(self, process: Process, proc: KernelFiles, sysfs: KernelFiles) -> None:
        self.process = process
        self.proc = proc
        self.sysfs = sysfs
        self.warnings: list[str] = []

    def lock_name(self) -> str:
        return self.name

    def mark(self, ranges: list[VfnRange], *, named_ranges: bool) -> None:
        """Start an interval over ``ranges``. ``named_ranges``: the caller named them (else they are every
        mapped VMA): DAMON then monitors only those."""
        raise NotImplementedError

    def read(self, ranges: list[VfnRange]) -> BackendResult:
        """Per-page data for ``ranges`` and what else the backend knows (usage, regions, warnings...)."""
        raise NotImplementedError

    def read_and_mark(self, ranges: list[VfnRange], next_ranges: list[VfnRange], *,
                      named_ranges: bool) -> BackendResult:
        """``read(ranges)`` then ``mark(next_ranges)``; backends that can do it cheaper override this."""
        out = self.read(ranges)
        self.mark(next_ranges, named_ranges=named_ranges)
        return out

    def close(self) -> None:
        pass


def read_pagemap(proc: KernelFiles, process: Process, start_vfn: int, end_vfn: int) -> U64:
    """Pagemap entries of [start_vfn, end_vfn). A short read means the mm is gone (the process exited):
    raises ProcessGone."""
    rel = f"{process.pid}/pagemap"
    n = end_vfn - start_vfn
    out = np.empty(n, np.uint64)
    done = 0
    while done < n:
        count = min(PAGEMAP_CHUNK, n - done)
        try:
            data = proc.pread(rel, (start_vfn + done) * PAGEMAP_ENTRY, count * PAGEMAP_ENTRY)
        except FileNotFoundError:
            data = b""
        if len(data) != count * PAGEMAP_ENTRY:
            process.check_alive("pagemap read")
            raise ProcessGone(process.pid, f"pagemap read at vfn {start_vfn + done:#x} (short read)")
        out[done:done + count] = np.frombuffer(data, dtype=np.uint64)
        done += count
    return out


def _state_lut() -> np.ndarray:
    """PageState for each value of pagemap bits 55-63 (index = entry >> 55)."""
    lut = np.zeros(512, STATE_DTYPE)
    for hi in range(512):
        e = hi << 55
        st = 0
        if e & PM_PRESENT:
            st |= PageState.PRESENT
        elif e & PM_SWAP:
            st |= PageState.SWAPPED
        if e & PM_FILE:
            st |= PageState.FILE
        if e & PM_MMAP_EXCLUSIVE:
            st |= PageState.EXCLUSIVE
        if e & PM_SOFT_DIRTY:
            st |= PageState.SOFT_DIRTY
        lut[hi] = st
    return lut


_STATE_LUT = _state_lut()


def base_state(entries: U64) -> np.ndarray:
    """PageState bits that pagemap alone tells (PRESENT, SWAPPED, FILE, EXCLUSIVE, SOFT_DIRTY): one table
    lookup on the top nine bits per page."""
    return _STATE_LUT[(entries >> np.uint64(55)).astype(np.intp)]


def segments_for(ranges: list[VfnRange]) -> list[IdleSegment]:
    """Empty word-aligned segments covering ``ranges`` (ranges that share or touch a word share a segment)."""
    spans: list[list[int]] = []
    for lo, hi in sorted(ranges):
        a = lo // WORD_BITS * WORD_BITS
        b = -(-hi // WORD_BITS) * WORD_BITS
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [IdleSegment.empty(a, b - a) for a, b in spans]


def fill(segments: list[IdleSegment], lo: int, hi: int, state: np.ndarray, idle: np.ndarray,
         entries: U64 | None = None, pfn: U64 | None = None) -> None:
    """Write per-page data of [lo, hi) into the segment holding it."""
    for s in segments:
        if s.start_vfn <= lo and hi <= s.end_vfn:
            a, b = lo - s.start_vfn, hi - s.start_vfn
            s.state[a:b] = state
            w0, w1 = a // WORD_BITS, -(-b // WORD_BITS)   # touch only the words of [a, b)
            bits = unpack_bits(s.idle[w0:w1])
            bits[a - w0 * WORD_BITS:b - w0 * WORD_BITS] = idle
            s.idle[w0:w1] = pack_bits(bits)
            if entries is not None:
                stype, soff = pagemap_swap(entries)
                s.swap_type[a:b] = stype
                s.swap_offset[a:b] = soff
            if pfn is not None:
                s.pfn[a:b] = pfn
            return
    raise ValueError(f"no segment holds vfn range {lo:#x}-{hi:#x}")


def now_ns() -> int:
    return time.monotonic_ns()


__all__ = ["Backend", "BackendResult", "Unavailable", "make_snapshot", "in_ranges", "VfnRange", "read_pagemap", "base_state", "segments_for", "fill",
           "pagemap_pfn", "now_ns"]
