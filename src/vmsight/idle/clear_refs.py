"""clear_refs backend: VMA-granular, works on any kernel with CONFIG_PROC_PAGE_MONITOR, no root needed for
your own processes.

mark: ``echo 1 > /proc/PID/clear_refs`` clears the accessed bit of every PTE and PG_referenced of every page
of the process. read: ``Referenced:`` of each VMA in /proc/PID/smaps = bytes touched since. That is an exact
count per VMA but does not say which pages, so the bitmap marks pages idle only in VMAs with nothing referenced
(and accessed in VMAs where everything resident was referenced); pages of partly referenced VMAs stay untracked.

It disturbs reclaim: clearing the referenced state makes the whole process look cold to the kernel's LRU
aging, so reclaim may pick its pages sooner. Ranges do not limit the clearing (clear_refs is per process)."""

from __future__ import annotations

import logging

import numpy as np

from vmsight.idle.abi import PAGE_SHIFT, PAGE_SIZE
from vmsight.idle.backend import (
    Backend,
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
from vmsight.idle.result import STATE_DTYPE, IdleSegment, PageState, VmaUsage

log = logging.getLogger(__name__)

DISTURBS_RECLAIM = ("clear_refs clears the referenced state of every page of the process: until pages are "
                    "touched again, the kernel's reclaim sees them as cold (this tracker disturbs reclaim)")


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

    def mark(self, ranges: list[VfnRange]) -> None:
        try:
            self.proc.write_text(f"{self.process.pid}/clear_refs", "1\n")
        except FileNotFoundError:
            raise ProcessGone(self.process.pid, "clear_refs write") from None
        except AccessDenied as e:
            raise AccessDenied(e.path, "writing clear_refs needs to own the process or be root") from None
        self.process.check_alive("mark")
        self.mark_time_ns = now_ns()

    def read(self, ranges: list[VfnRange]) -> tuple[list[IdleSegment], dict[str, object]]:
        smaps = self.process.smaps()
        segments = segments_for(ranges)
        usage: list[VmaUsage] = []
        known = PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.EXCLUSIVE | PageState.TRACKED
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
                    state[sl] |= np.where(present, np.uint16(PageState.TRACKED), 0).astype(STATE_DTYPE)
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
        return segments, {"usage": usage, "warnings": list(self.warnings), "mark_time_ns": self.mark_time_ns,
                          "known": known}


__all__ = ["ClearRefsBackend", "DISTURBS_RECLAIM", "PAGE_SIZE"]
