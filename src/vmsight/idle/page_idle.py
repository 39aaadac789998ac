"""page_idle backend: exact, page-granular, root only, needs CONFIG_IDLE_PAGE_TRACKING.

mark: /proc/PID/pagemap -> PFNs -> set their bits in /sys/kernel/mm/page_idle/bitmap (which clears the
accessed bits of every mapping of those pages and sets PG_idle). read: read the same bitmap words back (the
kernel re-checks the accessed bits first), then re-read pagemap to check no PFN changed in between.

Kernel facts used (mm/page_idle.c, v6.12): offsets and sizes are multiples of 8 and at most 4 KiB per call;
only LRU pages are tracked (others never read idle); tail pages of a large folio are ignored both ways
(``page_idle_get_folio`` returns NULL for PageTail), so a tail page takes its head page's bit — heads are found
with /proc/kpageflags, which reports folio flags (COMPOUND_HEAD/TAIL, LRU, THP) for every page.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmsight.idle.abi import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_HUGE,
    KPF_LRU,
    KPF_NOPAGE,
    KPF_THP,
    KPF_ZERO_PAGE,
    PAGEMAP_ENTRY,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SWAP,
    U64,
    WORD_BYTES,
    bit,
    bits_at,
    has,
    pagemap_pfn,
    pfn_bitmap_words,
    sorted_unique,
    word_runs,
)
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
from vmsight.idle.errors import AccessDenied
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.procfs import Process
from vmsight.idle.result import STATE_DTYPE, IdleSegment, PageState

log = logging.getLogger(__name__)

BITMAP = "kernel/mm/page_idle/bitmap"
KPAGEFLAGS = "kpageflags"
KPF_CHUNK = 1 << 16            # kpageflags entries per pread
KPF_GAP = 256                  # read up to 2 KiB of unneeded kpageflags rather than make another call
HEAD_WINDOW = 512              # a tail's head lies within its naturally aligned folio (<= PMD order for THP)
READ_GAP_WORDS = 4             # bitmap words between needed ones that may be read along (each costs 64 lookups)
WRITE_GAP_WORDS = 16           # zero words written along are ignored by the kernel (cheap)

KNOWN = (PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.EXCLUSIVE | PageState.HUGE
         | PageState.SOFT_DIRTY | PageState.TRACKED | PageState.CHANGED | PageState.ZERO_PAGE | PageState.NEW)


@dataclass
class _Scan:
    """pagemap + kpageflags view of [lo, hi) at one moment."""

    lo: int
    hi: int
    entries: U64
    pfn: U64            # 0 where not present
    head: U64           # PFN whose idle bit stands for this page (the folio head), 0 = none
    kflags: U64         # kpageflags of the page (0 where not present)
    tracked: npt.NDArray[np.bool_]  # present, on the LRU, not the zero page, head known


class PageIdleBackend(Backend):
    name = "page_idle"
    granularity = "page"
    approximate = False
    option = "CONFIG_IDLE_PAGE_TRACKING"

    @classmethod
    def probe(cls, proc: KernelFiles, sysfs: KernelFiles, pid: int) -> Unavailable | None:
        if not sysfs.exists(BITMAP):
            return Unavailable(f"{sysfs.path(BITMAP)} does not exist: the kernel was built without "
                               "CONFIG_IDLE_PAGE_TRACKING", cls.option)
        if not proc.exists(KPAGEFLAGS):
            return Unavailable(f"{proc.path(KPAGEFLAGS)} does not exist (CONFIG_PROC_PAGE_MONITOR)",
                               "CONFIG_PROC_PAGE_MONITOR")
        if proc.root == "/proc" and os.geteuid() != 0:
            return Unavailable("page_idle needs root: the bitmap is mode 0600 and pagemap hides PFNs without "
                               "CAP_SYS_ADMIN", "root (CAP_SYS_ADMIN)", permission=True)
        return None

    def __init__(self, process: Process, proc: KernelFiles, sysfs: KernelFiles) -> None:
        super().__init__(process, proc, sysfs)
        self._marked: dict[VfnRange, _Scan] = {}
        self._pfn_limit: int | None = None   # first PFN the bitmap does not cover (max_pfn), once seen
        self.mark_time_ns: int | None = None
        sysfs.open_binary(BITMAP, write=True)
        proc.open_binary(f"{process.pid}/pagemap")  # pins the mm: a reused pid cannot leak another's pages

    # --- kernel traffic ---------------------------------------------------------------------------------
    def _kpageflags(self, pfns: U64) -> U64:
        """kpageflags of each pfn (any order, repeats allowed), reading sorted runs in batches."""
        if len(pfns) == 0:
            return np.zeros(0, np.uint64)
        uniq = sorted_unique(pfns)
        firsts, bases, lens, parts = [], [], [], []
        base = 0
        for first, count in word_runs(uniq.astype(np.int64), max_gap=KPF_GAP, max_len=KPF_CHUNK):
            got = np.frombuffer(self.proc.pread(KPAGEFLAGS, first * 8, count * 8), dtype=np.uint64)
            firsts.append(first)
            bases.append(base)
            lens.append(len(got))
            parts.append(got)
            base += len(got)
        flat = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        fa, ba, la = np.array(firsts, np.int64), np.array(bases, np.int64), np.array(lens, np.int64)
        u = uniq.astype(np.int64)
        run = np.searchsorted(fa, u, side="right") - 1
        off = u - fa[run]
        ok = off < la[run]                    # beyond the end of kpageflags: no page there
        vals = np.full(len(uniq), np.uint64(1 << KPF_NOPAGE), np.uint64)
        vals[ok] = flat[ba[run[ok]] + off[ok]]
        return vals[np.searchsorted(uniq, pfns)]

    def _write_bitmap(self, pfns: U64) -> int:
        """Set exactly ``pfns``' bits in the page_idle bitmap: words at offset ``pfn // 64 * 8``, <= 4 KiB a call.
        Returns the number of write calls."""
        words, values = pfn_bitmap_words(pfns)
        calls = 0
        for first, count in word_runs(words, max_gap=WRITE_GAP_WORDS):
            buf = np.zeros(count, np.uint64)
            i0, i1 = np.searchsorted(words, [first, first + count])
            buf[words[i0:i1] - first] = values[i0:i1]
            try:
                n = self.sysfs.pwrite(BITMAP, first * WORD_BYTES, buf.tobytes())
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: the run starts at or beyond max_pfn
                    raise
                n = 0
            calls += 1
            if n != count * WORD_BYTES:
                # the kernel stops at max_pfn (mm/page_idle.c); PFNs beyond it (the rest of a memory section
                # that kpageflags still reports) cannot be tracked
                self._limit_pfn(first * 64 + n // WORD_BYTES * 64)
                break
        return calls

    def _read_bitmap(self, pfns: U64) -> npt.NDArray[np.bool_]:
        """Idle bit of each pfn, reading only the words that hold them (<= 4 KiB a call)."""
        if len(pfns) == 0:
            return np.zeros(0, bool)
        words, _ = pfn_bitmap_words(pfns)
        idx_parts, val_parts = [], []
        for first, count in word_runs(words, max_gap=READ_GAP_WORDS):
            data = self.sysfs.pread(BITMAP, first * WORD_BYTES, count * WORD_BYTES)
            got = np.frombuffer(data, dtype=np.uint64)
            if len(got) < count:
                self._limit_pfn((first + len(got)) * 64)
            idx_parts.append(np.arange(first, first + len(got), dtype=np.int64))
            val_parts.append(got)
        return bits_at(np.concatenate(idx_parts), np.concatenate(val_parts), pfns)

    def _limit_pfn(self, pfn: int) -> None:
        if self._pfn_limit is None or pfn < self._pfn_limit:
            log.debug("page_idle: bitmap ends at pfn %#x", pfn)
            self._pfn_limit = pfn

    # --- scanning -----------------------------------------------------------------------------------------
    def _scan(self, ranges: list[VfnRange]) -> list[_Scan]:
        """pagemap of every range, then one batched kpageflags lookup for all their frames."""
        entries = [read_pagemap(self.proc, self.process, lo, hi) for lo, hi in ranges]
        if not entries:
            return []
        allents = np.concatenate(entries)
        present = (allents >> np.uint64(63)).astype(bool)
        pfn = pagemap_pfn(allents)
        if present.any() and not pfn[present].any():
            raise AccessDenied(self.proc.path(f"{self.process.pid}/pagemap"),
                               "PFNs read as 0: reading them needs CAP_SYS_ADMIN (run as root)")
        kflags = np.zeros(len(allents), np.uint64)
        kflags[present] = self._kpageflags(pfn[present])
        head = pfn.copy()
        tail = present & bit(kflags, KPF_COMPOUND_TAIL)
        if tail.any():
            head[tail] = self._heads(pfn[tail])
        judge = np.uint64((1 << KPF_LRU) | (1 << KPF_ZERO_PAGE) | (1 << KPF_NOPAGE))
        tracked = present & ((kflags & judge) == np.uint64(1 << KPF_LRU)) & (head != 0)
        if self._pfn_limit is not None:
            tracked &= head < np.uint64(self._pfn_limit)
        out, off = [], 0
        for (lo, hi), e in zip(ranges, entries, strict=True):
            sl = slice(off, off + len(e))
            out.append(_Scan(lo, hi, e, pfn[sl], head[sl], kflags[sl], tracked[sl]))
            off += len(e)
        return out

    def _heads(self, tails: U64) -> U64:
        """Head PFN of each tail PFN: the nearest COMPOUND_HEAD at or below it within its aligned 512-page
        window (folios are naturally aligned). 0 where none is found (e.g. a hugetlb page above PMD size)."""
        blocks = sorted_unique(tails & ~np.uint64(HEAD_WINDOW - 1))
        out = np.zeros(len(tails), np.uint64)
        for b in blocks.tolist():
            data = self.proc.pread(KPAGEFLAGS, b * 8, HEAD_WINDOW * 8)
            flags = np.frombuffer(data, dtype=np.uint64)
            heads = np.nonzero(bit(flags, KPF_COMPOUND_HEAD))[0]
            sel = (tails & ~np.uint64(HEAD_WINDOW - 1)) == np.uint64(b)
            off = (tails[sel] - np.uint64(b)).astype(np.int64)
            pos = np.searchsorted(heads, off, side="right") - 1
            ok = pos >= 0
            res = np.zeros(len(off), np.uint64)
            res[ok] = np.uint64(b) + heads[pos[ok]].astype(np.uint64)
            out[sel] = res
        return out

    # --- interface ----------------------------------------------------------------------------------------
    def mark(self, ranges: list[VfnRange]) -> None:
        self._marked.clear()
        scans = self._scan(ranges)
        heads = [s.head[s.tracked] for s in scans]
        pfns = sorted_unique(np.concatenate(heads)) if heads else np.zeros(0, np.uint64)
        self.process.check_alive("mark")
        calls = self._write_bitmap(pfns)
        if self._pfn_limit is not None:
            for s in scans:
                s.tracked &= s.head < np.uint64(self._pfn_limit)
        self.mark_time_ns = now_ns()
        for s in scans:
            self._marked[(s.lo, s.hi)] = s
        log.debug("page_idle: marked %d folios in %d bitmap writes", len(pfns), calls)

    def read(self, ranges: list[VfnRange]) -> tuple[list[IdleSegment], dict[str, object]]:
        warnings = list(self.warnings) + self._concurrent_users()
        before = {r: self._marked[r] for r in ranges if r in self._marked}
        unmarked = [r for r in ranges if r not in self._marked]
        for r, m in zip(unmarked, self._scan(unmarked), strict=True):
            # not marked by us: report the idle flags as they are (whoever set them)
            before[r] = m
            warnings.append(f"range {r[0] << 12:#x}-{r[1] << 12:#x} was not marked by this tracker: "
                            "idle bits reflect the last mark by anyone")
        all_heads = np.concatenate([m.head[m.tracked] for m in before.values()]) if before else np.zeros(0, np.uint64)
        uniq = sorted_unique(all_heads)
        idle_uniq = self._read_bitmap(uniq)
        if self._pfn_limit is not None:
            for m in before.values():
                m.tracked &= m.head < np.uint64(self._pfn_limit)
        segments = segments_for(ranges)
        order = list(before)
        afters = [read_pagemap(self.proc, self.process, *r) for r in order]
        if order:
            # classify every range in one vectorised pass (per-call overhead dominates for many small VMAs)
            ms = [before[r] for r in order]
            cat = _Scan(0, 0, np.concatenate([m.entries for m in ms]), np.concatenate([m.pfn for m in ms]),
                        np.concatenate([m.head for m in ms]), np.concatenate([m.kflags for m in ms]),
                        np.concatenate([m.tracked for m in ms]))
            after_all = np.concatenate(afters)
            state, idle = self._classify(cat, after_all, uniq, idle_uniq)
            pfn_all = pagemap_pfn(after_all)
            off = 0
            for r, after in zip(order, afters, strict=True):
                sl = slice(off, off + len(after))
                fill(segments, r[0], r[1], state[sl], idle[sl], entries=after, pfn=pfn_all[sl])
                off += len(after)
        self.process.check_alive("read")
        return segments, {"warnings": warnings, "mark_time_ns": self.mark_time_ns, "known": KNOWN}

    def _classify(self, m: _Scan, after: U64, uniq: U64, idle_uniq: npt.NDArray[np.bool_]
                  ) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.bool_]]:
        """State and idle bit per page from the mark-time scan ``m`` and the pagemap read after the bitmap."""
        n = len(after)
        state = base_state(after)
        bit_idle = np.zeros(n, bool)
        if len(uniq):
            pos = np.minimum(np.searchsorted(uniq, m.head), len(uniq) - 1)
            bit_idle = m.tracked & (uniq[pos] == m.head) & idle_uniq[pos]
        big = np.uint64((1 << KPF_THP) | (1 << KPF_HUGE))
        if np.array_equal(after, m.entries):
            # fast path, the common case: no page changed between mark and read
            was_swapped = (state & np.uint16(PageState.SWAPPED)) != 0
            tracked = m.tracked | was_swapped
            idle = bit_idle | was_swapped
            state |= ((m.kflags & big) != 0).astype(np.uint16) * np.uint16(PageState.HUGE)
            state |= bit(m.kflags, KPF_ZERO_PAGE).astype(np.uint16) * np.uint16(PageState.ZERO_PAGE)
            state |= tracked.astype(np.uint16) * np.uint16(PageState.TRACKED)
            return state, idle
        was_present = has(m.entries, PM_PRESENT)
        was_swapped = has(m.entries, PM_SWAP) & ~was_present
        now_present = has(after, PM_PRESENT)
        now_swapped = has(after, PM_SWAP) & ~now_present
        pfn_now = pagemap_pfn(after)
        same = was_present & now_present & (pfn_now == m.pfn)
        idle = np.zeros(n, bool)
        tracked = np.zeros(n, bool)
        # 1. same frame mapped at mark and read: the kernel's re-checked idle bit is the answer
        t1 = same & m.tracked
        tracked |= t1
        idle |= t1 & bit_idle
        # 2. resident at mark, swapped at read: reclaim found it unreferenced and pushed it out -> idle
        t2 = was_present & now_swapped & m.tracked
        # 3. swapped at both with the same swap entry: nobody faulted it in -> idle
        t3 = was_swapped & now_swapped & (after == m.entries)
        tracked |= t2 | t3
        idle |= t2 | t3
        # 4. faulted in during the interval (was absent or swapped, or a copy-on-write of a shared/zero page
        #    gave it a new frame): accessed
        was_zero = bit(m.kflags, KPF_ZERO_PAGE)
        cow = (was_present & now_present & (pfn_now != m.pfn)
               & (was_zero | (~has(m.entries, PM_MMAP_EXCLUSIVE) & has(after, PM_MMAP_EXCLUSIVE))))
        new = now_present & (~was_present | cow)
        swapped_again = was_swapped & now_swapped & (after != m.entries)
        tracked |= new | swapped_again
        state |= np.where(new | swapped_again, np.uint16(PageState.NEW), np.uint16(0)).astype(STATE_DTYPE)
        # 5. frame changed otherwise (migration, compaction, THP collapse): not judged
        changed = was_present & now_present & (pfn_now != m.pfn) & ~cow
        state |= np.where(changed, np.uint16(PageState.CHANGED), np.uint16(0)).astype(STATE_DTYPE)
        huge = same & ((m.kflags & big) != 0)
        state |= np.where(huge, np.uint16(PageState.HUGE), np.uint16(0)).astype(STATE_DTYPE)
        zero = now_present & same & was_zero
        state |= np.where(zero, np.uint16(PageState.ZERO_PAGE), np.uint16(0)).astype(STATE_DTYPE)
        state |= np.where(tracked, np.uint16(PageState.TRACKED), np.uint16(0)).astype(STATE_DTYPE)
        return state, idle

    def _concurrent_users(self) -> list[str]:
        """Running kdamonds flip the same PG_idle/accessed bits (read-only check, never writes DAMON)."""
        out = []
        base = "kernel/mm/damon/admin/kdamonds"
        try:
            for k in self.sysfs.listdir(base):
                if k.isdigit() and self.sysfs.read_text(f"{base}/{k}/state").strip() == "on":
                    out.append(f"DAMON kdamond {k} is running: it clears the same accessed bits, so pages it "
                               "sampled may read idle although accessed")
        except (OSError, AccessDenied):
            pass
        return out


__all__ = ["PageIdleBackend", "BITMAP", "KPAGEFLAGS", "PAGEMAP_ENTRY"]
