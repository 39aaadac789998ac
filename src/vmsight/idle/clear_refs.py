"""clear_refs backend: VMA-granular, works on any kernel with CONFIG_PROC_PAGE_MONITOR, no root needed for
your own processes.

mark: ``echo 1 > /proc/PID/clear_refs`` clears the accessed bit of every PTE and PG_referenced of every page
of the process. read: ``Referenced:`` of each VMA in /proc/PID/smaps = bytes touched since. It does not say which
pages, so the bitmap marks pages idle only in VMAs with nothing referenced (and accessed in VMAs where everything
resident was referenced); pages of partly referenced VMAs stay untracked.

Precision. ``echo 1`` does not flush the TLB (only the soft-dirty clear does, since 912efa17e512 "mm: proc:
Invalidate TLB after clearing soft-dirty page state"; x86's ptep_clear_flush_young skips it by design), and a CPU
sets the accessed bit only when it walks the page tables: a page touched through a translation still cached is
missed. On this project's host (6.18 under KVM, PCID), warming 1024 pages then marking and touching them again lost
pages in 30 of 30 cycles (up to 629), 0 of 30 with the flush (test_idle_host.py). So mark() then writes ``4``: on a kernel built without CONFIG_MEM_SOFT_DIRTY that only does
flush_tlb_mm, and every page the process touches after mark() returns is counted (measured: 0 missed in 230
trials). With CONFIG_MEM_SOFT_DIRTY, ``4`` would also clear the process's soft-dirty bits (state that CRIU or a
garbage collector may own) and write-protect every PTE, so it is not written: counts are lower bounds, the
snapshot says so and its idle pages are APPROXIMATE. The option is read from this process's own pagemap (a page
just written in a fresh mapping reads soft-dirty only with it). Referenced is per folio for a PMD-mapped THP
(2 MiB at a time) and includes PG_referenced set by others' use of a shared or file page.

It disturbs reclaim: clearing the referenced state makes the whole process look cold to the kernel's LRU
aging, so reclaim may pick its pages sooner. Ranges do not limit the clearing (clear_refs is per process)."""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct

import numpy as np

from vmsight.idle.abi import PAGE_SHIFT, PAGE_SIZE, PM_PRESENT, PM_SOFT_DIRTY
from vmsight.idle.backend import (
    Backend,
    BackendResult,
    Unavailable,
    VfnRange,
    base_state,
    fill,
    now_ns,
    read_pagemap,
    segments_for,
)
from vmsight.idle.errors import AccessDenied, ProcessGone
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.procfs import Process
from vmsight.idle.result import STATE_DTYPE, PageState, VmaUsage

log = logging.getLogger(__name__)

DISTURBS_RECLAIM = ("clear_refs clears the referenced state of every page of the process: until pages are "
                    "touched again, the kernel's reclaim sees them as cold (this tracker disturbs reclaim)")
LOWER_BOUND = ("clear_refs counts are lower bounds: the kernel has CONFIG_MEM_SOFT_DIRTY, so the tracker does not "
               "flush the process's TLB after clearing (that would reset its soft-dirty bits), and a page touched "
               "through a cached translation is not seen as referenced")


def soft_dirty_compiled(proc: KernelFiles) -> bool | None:
    """Whether the kernel has CONFIG_MEM_SOFT_DIRTY, from this process's own pagemap: a new mapping is VM_SOFTDIRTY,
    so a page just written in it reads soft-dirty (bit 55); without the option that bit is always 0. None if the
    pagemap cannot be read (then assume it has)."""
    m = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0] = 1
        c = ctypes.c_char.from_buffer(m)
        vfn = ctypes.addressof(c) >> PAGE_SHIFT
        del c  # an exported buffer would keep the mmap from closing
        raw = proc.pread("self/pagemap", vfn * 8, 8)
    except (OSError, AccessDenied) as e:
        log.debug("soft-dirty probe: %s", e)
        return None
    finally:
        m.close()
    proc.forget("self/")
    if len(raw) != 8:
        return None
    (entry,) = struct.unpack("<Q", raw)
    return bool(entry & PM_SOFT_DIRTY) if entry & PM_PRESENT else None


class ClearRefsBackend(Backend):
    name = "clear_refs"
    granularity = "vma"
    approximate = False
    option = "CONFIG_PROC_PAGE_MONITOR"

    @classmethod
    def probe(cls, proc: KernelFiles, sysfs: KernelFiles, pid: int) -> Unavailable | None:
        if not proc.exists(f"{pid}/clear_refs") and not proc.exists("self/clear_refs"):
            return Unavailable("no /proc/PID/clear_refs: the kernel was built without CONFIG_PROC_PAGE_MONITOR",
                               cls.option)
        return None

    def lock_name(self) -> str:
        return f"clear_refs-{self.process.pid}"

    def __init__(self, process: Process, proc: KernelFiles, sysfs: KernelFiles) -> None:
        super().__init__(process, proc, sysfs)
        self.mark_time_ns: int | None = None
        self.warnings.append(DISTURBS_RECLAIM)
        log.warning("%s", DISTURBS_RECLAIM)
        # writing "4" is a pure TLB flush of the mm only where the kernel has no soft-dirty state to clear
        self.flushes_tlb = soft_dirty_compiled(proc) is False
        if not self.flushes_tlb:
            self._lower_bound()

    def _lower_bound(self) -> None:
        self.flushes_tlb = False
        self.approximate = True
        self.warnings.append(LOWER_BOUND)
        log.warning("%s", LOWER_BOUND)

    def mark(self, ranges: list[VfnRange], *, named_ranges: bool) -> None:
        # clear_refs is per process: ranges, named or not, do not limit what is cleared
        try:
            self.proc.write_text(f"{self.process.pid}/clear_refs", "1\n")
        except FileNotFoundError:
            raise ProcessGone(self.process.pid, "clear_refs write") from None
        except AccessDenied as e:
            raise AccessDenied(e.path, "writing clear_refs needs to own the process or be root") from None
        if self.flushes_tlb:
            try:
                self.proc.write_text(f"{self.process.pid}/clear_refs", "4\n")
            except FileNotFoundError:
                raise ProcessGone(self.process.pid, "clear_refs TLB flush") from None
            except OSError as e:  # a kernel that refuses "4": keep going with lower bounds
                log.debug("clear_refs 4: %s", e)
                self._lower_bound()
        self.process.check_alive("mark")
        self.mark_time_ns = now_ns()

    def read(self, ranges: list[VfnRange]) -> BackendResult:
        smaps = self.process.smaps()
        segments = segments_for(ranges)
        usage: list[VmaUsage] = []
        known = PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.EXCLUSIVE | PageState.TRACKED
        # without the TLB flush a VMA reading "nothing referenced" may have been touched: its idle pages are inferred
        judged = np.uint16(PageState.TRACKED | (PageState.APPROXIMATE if self.approximate else 0))
        for lo, hi in ranges:
            entries = read_pagemap(self.proc, self.process, lo, hi)
            state = base_state(entries)
            idle = np.zeros(hi - lo, bool)
            for e in smaps:
                a = max(lo, e.vma.start_gva >> PAGE_SHIFT)
                b = min(hi, e.vma.end_gva >> PAGE_SHIFT)
                if a >= b:
                    continue
                rss, ref = e.bytes("Rss"), e.bytes("Referenced")
                sl = slice(a - lo, b - lo)
                present = (state[sl] & np.uint16(PageState.PRESENT)) != 0
                if ref == 0:       # nothing referenced: every resident page is idle
                    idle[sl] = present
                    state[sl] |= np.where(present, judged, 0).astype(STATE_DTYPE)
                elif ref >= rss:   # everything resident was referenced
                    state[sl] |= np.where(present, np.uint16(PageState.TRACKED), 0).astype(STATE_DTYPE)
                else:              # some referenced, unknown which: judged only as a count (VmaUsage)
                    state[sl] |= np.where(present, np.uint16(PageState.APPROXIMATE), 0).astype(STATE_DTYPE)
            fill(segments, lo, hi, state, idle, entries=entries)
        for e in smaps:
            v = e.vma
            if not any(v.start_gva >> PAGE_SHIFT < hi and lo < v.end_gva >> PAGE_SHIFT for lo, hi in ranges):
                continue
            rss, ref = e.bytes("Rss"), e.bytes("Referenced")
            usage.append(VmaUsage(v, present_bytes=rss, accessed_bytes=min(ref, rss), idle_bytes=max(rss - ref, 0),
                                  swapped_bytes=e.bytes("Swap"),
                                  huge_bytes=e.bytes("AnonHugePages") + e.bytes("FilePmdMapped")
                                  + e.bytes("ShmemPmdMapped")))
        self.process.check_alive("read")
        return BackendResult(segments, known, self.mark_time_ns, usage=usage, warnings=tuple(self.warnings))


__all__ = ["ClearRefsBackend", "DISTURBS_RECLAIM", "LOWER_BOUND", "PAGE_SIZE", "soft_dirty_compiled"]
