"""page_idle backend: exact, page-granular, root only, needs CONFIG_IDLE_PAGE_TRACKING.

mark: /proc/PID/pagemap -> PFNs -> set their bits in /sys/kernel/mm/page_idle/bitmap (which clears the
accessed bits of every mapping of those pages and sets PG_idle). read: read the same bitmap words back (the
kernel re-checks the accessed bits first), then re-read pagemap to check no PFN changed in between.

Kernel facts used (mm/page_idle.c, v6.12): offsets and sizes are multiples of 8 and at most 4 KiB per call;
only LRU pages are tracked (others never read idle); tail pages of a large folio are ignored both ways
(``page_idle_get_folio`` returns NULL for PageTail), so a tail page takes its head page's bit — heads are found
with /proc/kpageflags, which reports folio flags (COMPOUND_HEAD/TAIL, LRU, THP) for every page. Where the
PAGEMAP_SCAN ioctl (v6.7+) says a range is PMD-mapped, the head is the 512-aligned frame and only its
kpageflags are read. ``read_and_mark`` re-marks only what the read did not find idle.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import struct
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
    PAGE_IS_HUGE,
    PAGEMAP_ENTRY,
    PAGEMAP_SCAN,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SCAN_ARG,
    PM_SWAP,
    U64,
    WORD_BITS,
    WORD_BYTES,
    bit,
    has,
    pack_bits,
    pagemap_pfn,
    unpack_bits,
    word_runs,
)
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
from vmsight.idle.errors import AccessDenied
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.procfs import Process
from vmsight.idle.result import STATE_DTYPE, PageState

log = logging.getLogger(__name__)

BITMAP = "kernel/mm/page_idle/bitmap"
KPAGEFLAGS = "kpageflags"
KPF_RUN_WORDS = 1024           # blocks per kpageflags pread (512 KiB)
KPF_GAP_WORDS = 4              # read up to 2 KiB of unneeded kpageflags rather than make another call
HEAD_WINDOW = 512              # a tail's head lies within its naturally aligned folio (<= PMD order for THP)
READ_GAP_WORDS = 4             # bitmap words between needed ones that may be read along (each costs 64 lookups)
WRITE_GAP_WORDS = 16           # zero words written along are ignored by the kernel (cheap)
SCAN_REGIONS = 256             # page_region entries per PAGEMAP_SCAN call

KNOWN = (PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.EXCLUSIVE | PageState.HUGE
         | PageState.SOFT_DIRTY | PageState.TRACKED | PageState.CHANGED | PageState.ZERO_PAGE | PageState.NEW)

I64 = npt.NDArray[np.int64]


class _Frames:
    """The frames a scan looked at, held as whole 64-PFN blocks: block ``w`` is PFNs [64w, 64w + 64), i.e.
    page_idle bitmap word ``w`` and 512 bytes of kpageflags. A PFN's data sits at its *slot*
    (position of its block * 64 + pfn % 64), so mark and read index flat arrays instead of sorting and
    searching PFNs (sorts and binary searches dominated the cost under emulation)."""

    def __init__(self, words: I64, flags: U64) -> None:
        self.words = words          # sorted, unique block indices
        self.flags = flags          # kpageflags, 64 per block
        self._w0 = int(words[0]) if len(words) else 0
        self._slot = np.full(int(words[-1]) - self._w0 + 1 if len(words) else 0, -1, np.int64)
        self._slot[words - self._w0] = np.arange(len(words), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.flags)

    def slots(self, pfns: U64) -> I64:
        """Slot of each PFN, -1 where its block was not read."""
        if len(pfns) == 0:
            return np.zeros(0, np.int64)
        w = (pfns >> np.uint64(6)).astype(np.int64)
        w -= self._w0
        low = pfns.astype(np.int64) & 63
        if w.min() >= 0 and w.max() < len(self._slot):
            s = self._slot[w]
            if s.min() >= 0:                       # the common case: every block was read
                s *= WORD_BITS
                s += low
                return s
        ok = (w >= 0) & (w < len(self._slot))
        out = np.full(len(pfns), -1, np.int64)
        s = self._slot[w[ok]]
        out[ok] = np.where(s >= 0, s * WORD_BITS + low[ok], -1)
        return out

    def pfns(self, slots: I64) -> U64:
        return (self.words[slots >> 6] * WORD_BITS + (slots & 63)).astype(np.uint64)

    def head_slots(self, tail_slots: I64, tail_pfns: U64) -> I64:
        """Slot of each tail page's head: the nearest COMPOUND_HEAD at or below it in the same aligned
        512-page window (folios are naturally aligned), -1 if none (e.g. a hugetlb page above PMD size).
        Needs every block from the window start to the tail read (``_frames`` makes sure), so the window
        starts ``pfn % 512`` slots below the tail."""
        heads = np.flatnonzero((self.flags & np.uint64(1 << KPF_COMPOUND_HEAD)) != 0)
        if len(heads) == 0:
            return np.full(len(tail_slots), -1, np.int64)
        h = heads[np.maximum(np.searchsorted(heads, tail_slots, side="right") - 1, 0)]
        window_start = tail_slots - (tail_pfns & np.uint64(HEAD_WINDOW - 1)).astype(np.int64)
        return np.where((h >= window_start) & (h <= tail_slots), h, -1)


@dataclass
class _Scan:
    """pagemap + kpageflags view of some vfn ranges at one moment, the ranges' pages concatenated."""

    ranges: list[VfnRange]
    entries: U64
    pfn: U64            # 0 where not present
    head_slot: I64      # slot in ``frames`` of the folio head whose idle bit stands for this page (-1 = none)
    kflags: U64         # kpageflags of the page (0 where not present)
    tracked: npt.NDArray[np.bool_]  # present, on the LRU, not the zero page, head known
    frames: _Frames
    tail_words: I64 = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # bitmap words of tails

    def below(self, pfn_limit: int) -> npt.NDArray[np.bool_]:
        """Pages whose head lies below ``pfn_limit`` (the bitmap ends at max_pfn)."""
        out = np.zeros(len(self.head_slot), bool)
        has_head = self.head_slot >= 0
        out[has_head] = self.frames.pfns(self.head_slot[has_head]) < np.uint64(pfn_limit)
        return out

    def offsets(self) -> dict[VfnRange, int]:
        out, off = {}, 0
        for lo, hi in self.ranges:
            out[(lo, hi)] = off
            off += hi - lo
        return out

    def select(self, ranges: list[VfnRange]) -> _Scan:
        """The same scan restricted to ``ranges`` (each one of ours), in that order."""
        if ranges == self.ranges:
            return self
        offs = self.offsets()
        idx = np.concatenate([np.arange(offs[r], offs[r] + r[1] - r[0]) for r in ranges]) if ranges \
            else np.zeros(0, np.int64)
        return _Scan(list(ranges), self.entries[idx], self.pfn[idx], self.head_slot[idx],
                     self.kflags[idx], self.tracked[idx], self.frames, self.tail_words)


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
        self._marked: _Scan | None = None
        self._still_idle: tuple[_Frames, I64] | None = None  # heads the last read found idle
        self._pfn_limit: int | None = None   # first PFN the bitmap does not cover (max_pfn), once seen
        self._no_pagemap_scan = False
        self.pmd_pages_last_scan = 0         # pages the last scan found PMD-mapped (PAGEMAP_SCAN), for diagnosis
        self.mark_time_ns: int | None = None
        sysfs.open_binary(BITMAP, write=True)
        proc.open_binary(f"{process.pid}/pagemap")  # pins the mm: a reused pid cannot leak another's pages

    # --- kernel traffic ---------------------------------------------------------------------------------
    def _read_blocks(self, words: I64, max_gap: int = KPF_GAP_WORDS) -> tuple[I64, U64]:
        """kpageflags of whole blocks: (block indices read, sorted and unique; their flags, 64 per block).
        Blocks closer than ``max_gap`` to a needed one are read along; beyond kpageflags' end reads NOPAGE."""
        runs = word_runs(words, max_gap=max_gap, max_len=KPF_RUN_WORDS)
        if not runs:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        block = WORD_BITS * 8
        datas = [self.proc.pread(KPAGEFLAGS, first * block, count * block) for first, count in runs]
        firsts = np.array([f for f, _ in runs], np.int64)
        counts = np.array([c for _, c in runs], np.int64)
        starts = np.cumsum(counts) - counts
        # one pass for all runs (per-run numpy calls dominated with one short run per THP head)
        got_words = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(firsts - starts, counts)
        if all(len(d) == c * block for d, (_, c) in zip(datas, runs, strict=True)):
            return got_words, np.frombuffer(b"".join(datas), dtype=np.uint64).copy()
        flags = np.full(len(got_words) * WORD_BITS, np.uint64(1 << KPF_NOPAGE), np.uint64)
        for d, s in zip(datas, starts.tolist(), strict=True):
            flags[s * WORD_BITS:s * WORD_BITS + len(d) // 8] = np.frombuffer(d, dtype=np.uint64, count=len(d) // 8)
        return got_words, flags

    def _frames(self, pfns: U64) -> tuple[_Frames, U64, I64]:
        """kpageflags of the blocks holding ``pfns``, plus every block of the 512-page window of each tail
        page (so its head is in view); and for each of ``pfns`` its flags and its folio head's slot."""
        if len(pfns) == 0:
            empty = np.zeros(0, np.int64)
            return _Frames(empty, np.zeros(0, np.uint64)), np.zeros(0, np.uint64), empty
        frames = _Frames(*self._read_blocks(_unique_blocks(pfns)))
        slots = frames.slots(pfns)
        flags = frames.flags[slots]
        tail = bit(flags, KPF_COMPOUND_TAIL)
        if tail.any():
            # windows of the blocks holding tails (a per-block pass: 64x fewer elements than per page)
            has_tail = np.zeros(len(frames.words), bool)
            has_tail[slots[tail] >> 6] = True
            wins = np.unique(frames.words[has_tail] // (HEAD_WINDOW // WORD_BITS))
            want = (wins[:, None] * (HEAD_WINDOW // WORD_BITS) + np.arange(HEAD_WINDOW // WORD_BITS)).ravel()
            missing = want[frames.slots(want.astype(np.uint64) * np.uint64(WORD_BITS)) < 0]
            if len(missing):
                w2, f2 = self._read_blocks(missing, max_gap=1)
                words = np.concatenate((frames.words, w2))
                order = np.argsort(words, kind="stable")
                both = np.concatenate((frames.flags.reshape(-1, WORD_BITS), f2.reshape(-1, WORD_BITS)))[order]
                frames = _Frames(words[order], both.ravel())
                slots = frames.slots(pfns)
            slots[tail] = frames.head_slots(slots[tail], pfns[tail])
        return frames, flags, slots

    def _frames_pmd(self, pfns: U64, pmd: npt.NDArray[np.bool_]) -> tuple[_Frames, U64, I64, I64]:
        """``_frames`` where ``pmd`` marks frames of PMD-mapped THPs: a PMD maps a whole PMD-order folio, so
        its head is the 512-aligned frame and only the head's block of kpageflags is read (not the 511
        tails'). Also returns the bitmap words between such heads (all tails: free to read along)."""
        heads = pfns[pmd] & ~np.uint64(HEAD_WINDOW - 1)
        slow = pfns[~pmd]
        frames, flags, hslot = self._frames(np.concatenate((slow, heads)))
        hs = hslot[len(slow):]
        # check what kpageflags says now: a compound head at the block start, tails after it in the block
        blocks = frames.flags.reshape(-1, WORD_BITS)          # per block read: few (one per THP)
        head_block = bit(blocks[:, 0], KPF_COMPOUND_HEAD) & bit(blocks[:, 1:], KPF_COMPOUND_TAIL).all(axis=1)
        ok = ((hs & 63) == 0) & head_block[hs >> 6]
        if not ok.all():
            # split or migrated since the scan, or a larger hugetlb page: those pages the general way
            log.debug("page_idle: %d PMD-mapped pages failed the head check", int(np.count_nonzero(~ok)))
            pmd = pmd.copy()
            pmd[np.flatnonzero(pmd)[~ok]] = False
            return self._frames_pmd(pfns, pmd) if pmd.any() else (*self._frames(pfns), np.zeros(0, np.int64))
        n = len(pfns)
        out_flags, out_hslot = np.empty(n, np.uint64), np.empty(n, np.int64)
        out_flags[~pmd], out_hslot[~pmd] = flags[:len(slow)], hslot[:len(slow)]
        hflags = flags[len(slow):]
        is_head = (pfns[pmd] & np.uint64(HEAD_WINDOW - 1)) == 0
        tail_flags = (hflags & ~np.uint64(1 << KPF_COMPOUND_HEAD)) | np.uint64(1 << KPF_COMPOUND_TAIL)
        out_flags[pmd] = np.where(is_head, hflags, tail_flags)
        out_hslot[pmd] = hs
        hw = (heads[is_head] >> np.uint64(6)).astype(np.int64)
        between = (hw[:, None] + np.arange(1, HEAD_WINDOW // WORD_BITS)).ravel()
        return frames, out_flags, out_hslot, between

    def _pmd_mapped(self, ranges: list[VfnRange]) -> npt.NDArray[np.bool_] | None:
        """Pages of ``ranges`` (concatenated) mapped by a PMD, by PAGEMAP_SCAN; None where the kernel has no
        PAGEMAP_SCAN (before v6.7) or it failed (then every frame's kpageflags is read)."""
        if self._no_pagemap_scan:
            return None
        out = np.zeros(sum(hi - lo for lo, hi in ranges), bool)
        vec = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
        off = 0
        for lo, hi in ranges:
            start, end = lo << 12, hi << 12
            while start < end:
                arg = bytearray(struct.pack(PM_SCAN_ARG, struct.calcsize(PM_SCAN_ARG), 0, start, end, 0,
                                            ctypes.addressof(vec), SCAN_REGIONS, 0, 0, 0, PAGE_IS_HUGE, PAGE_IS_HUGE))
                try:
                    n = self.proc.ioctl(f"{self.process.pid}/pagemap", PAGEMAP_SCAN, arg)
                except (OSError, AccessDenied) as e:
                    if isinstance(e, OSError) and e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                        self._no_pagemap_scan = True
                    log.debug("page_idle: no PAGEMAP_SCAN (%s): reading every frame's kpageflags", e)
                    return None
                for i in range(n):
                    a = max(int(vec[3 * i]) >> 12, lo) - lo + off
                    b = min(int(vec[3 * i + 1]) >> 12, hi) - lo + off
                    out[a:b] = True
                walk_end = struct.unpack_from("<Q", arg, 32)[0]
                if n < SCAN_REGIONS or walk_end <= start:
                    break
                start = walk_end
            off += hi - lo
        return out

    def _write_bitmap(self, words: I64, values: U64) -> int:
        """Write the non-zero ``values`` at their bitmap ``words`` (offset ``word * 8``, <= 4 KiB a call).
        Returns the number of write calls."""
        nz = values != 0
        words, values = words[nz], values[nz]
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

    def _idle_bits(self, scan: _Scan) -> npt.NDArray[np.bool_]:
        """The bitmap's idle bit for each tracked page of ``scan`` (False elsewhere), reading only the words
        that hold tracked heads (<= 4 KiB a call)."""
        out = np.zeros(len(scan.entries), bool)
        slots = scan.head_slot[scan.tracked]
        if len(slots) == 0:
            return out
        words = scan.frames.words
        need = np.zeros(len(words), bool)
        need[slots >> 6] = True
        # Words of nothing but tail pages cost the kernel almost nothing (page_idle_get_folio refuses tails
        # first thing), so read them along: a THP's head words are then one run, not one call each.
        need |= bit(scan.frames.flags, KPF_COMPOUND_TAIL).reshape(-1, WORD_BITS).all(axis=1)
        to_read = words[need]
        if len(scan.tail_words):
            to_read = _unique_blocks(np.concatenate((to_read, scan.tail_words)).astype(np.uint64), shift=0)
        values = np.zeros(len(words), np.uint64)
        for first, count in word_runs(to_read, max_gap=READ_GAP_WORDS):
            got = np.frombuffer(self.sysfs.pread(BITMAP, first * WORD_BYTES, count * WORD_BYTES), dtype=np.uint64)
            if len(got) < count:
                self._limit_pfn((first + len(got)) * 64)
            i0, i1 = np.searchsorted(words, [first, first + len(got)])
            values[i0:i1] = got[words[i0:i1] - first]
        out[scan.tracked] = unpack_bits(values)[slots]
        return out

    def _limit_pfn(self, pfn: int) -> None:
        if self._pfn_limit is None or pfn < self._pfn_limit:
            log.debug("page_idle: bitmap ends at pfn %#x", pfn)
            self._pfn_limit = pfn

    # --- scanning -----------------------------------------------------------------------------------------
    def _scan(self, ranges: list[VfnRange]) -> _Scan:
        """pagemap of every range, then kpageflags of the blocks holding their frames."""
        entries = [read_pagemap(self.proc, self.process, lo, hi) for lo, hi in ranges]
        allents = np.concatenate(entries) if entries else np.zeros(0, np.uint64)
        present = has(allents, PM_PRESENT)
        ppfn = allents[present] & np.uint64(PM_PFN_MASK)
        if len(ppfn) and not ppfn.any():
            raise AccessDenied(self.proc.path(f"{self.process.pid}/pagemap"),
                               "PFNs read as 0: reading them needs CAP_SYS_ADMIN (run as root)")
        pfn = np.zeros(len(allents), np.uint64)
        pfn[present] = ppfn
        pmd = self._pmd_mapped(ranges) if len(ppfn) else None
        between = np.zeros(0, np.int64)
        if pmd is not None and pmd.any():
            vfn = np.concatenate([np.arange(lo, hi, dtype=np.uint64) for lo, hi in ranges])
            # a PMD maps a naturally aligned folio: the frame's offset in it equals the page's in the 2 MiB
            ppmd = (pmd & ((pfn & np.uint64(HEAD_WINDOW - 1)) == (vfn & np.uint64(HEAD_WINDOW - 1))))[present]
            frames, pflags, hslot, between = self._frames_pmd(ppfn, ppmd)
            self.pmd_pages_last_scan = int(np.count_nonzero(ppmd))
        else:
            frames, pflags, hslot = self._frames(ppfn)
        judge = np.uint64((1 << KPF_LRU) | (1 << KPF_ZERO_PAGE) | (1 << KPF_NOPAGE))
        ptracked = ((pflags & judge) == np.uint64(1 << KPF_LRU)) & (hslot >= 0)
        n = len(allents)
        kflags, tracked = np.zeros(n, np.uint64), np.zeros(n, bool)
        head_slot = np.full(n, -1, np.int64)
        kflags[present], tracked[present], head_slot[present] = pflags, ptracked, hslot
        scan = _Scan(list(ranges), allents, pfn, head_slot, kflags, tracked, frames, between)
        if self._pfn_limit is not None:
            scan.tracked &= scan.below(self._pfn_limit)
        return scan

    # --- interface ----------------------------------------------------------------------------------------
    def mark(self, ranges: list[VfnRange], *, named_ranges: bool,
             keep: tuple[_Frames, I64] | None = None) -> None:
        """Mark every tracked page of ``ranges`` idle (named or not: page_idle marks just them). ``keep``: heads (slots in some frames) whose mark still
        stands — a read just found them idle, which leaves PG_idle set and their accessed bits clear — are not
        written again."""
        self._marked = None
        scan = self._scan(ranges)
        write = scan.tracked.copy()
        if keep is not None and len(keep[1]):
            frames, kslots = keep
            if not np.array_equal(frames.words, scan.frames.words):   # other blocks now: map by PFN
                kslots = scan.frames.slots(frames.pfns(kslots))
                kslots = kslots[kslots >= 0]
            kept = np.zeros(len(scan.frames), bool)
            kept[kslots] = True
            write[write] = ~kept[scan.head_slot[write]]
        bits = np.zeros(len(scan.frames), bool)
        bits[scan.head_slot[write]] = True
        self.process.check_alive("mark")
        calls = self._write_bitmap(scan.frames.words, pack_bits(bits))
        if self._pfn_limit is not None:
            scan.tracked &= scan.below(self._pfn_limit)
        self.mark_time_ns = now_ns()
        self._marked = scan
        log.debug("page_idle: marked %d folios in %d bitmap writes", int(np.count_nonzero(bits)), calls)

    def read(self, ranges: list[VfnRange]) -> BackendResult:
        warnings = list(self.warnings) + self._concurrent_users()
        marked = self._marked.offsets() if self._marked is not None else {}
        views = []
        ours = [r for r in ranges if r in marked]
        if ours:
            assert self._marked is not None
            views.append(self._marked.select(ours))
        unmarked = [r for r in ranges if r not in marked]
        if unmarked:
            # not marked by us: report the idle flags as they are (whoever set them)
            views.append(self._scan(unmarked))
            warnings.extend(f"range {lo << 12:#x}-{hi << 12:#x} was not marked by this tracker: "
                            "idle bits reflect the last mark by anyone" for lo, hi in unmarked)
        bit_idle = [self._idle_bits(v) for v in views]
        if self._pfn_limit is not None:
            for v, b in zip(views, bit_idle, strict=True):
                v.tracked &= v.below(self._pfn_limit)
                b &= v.tracked
        segments = segments_for(ranges)
        order = [r for v in views for r in v.ranges]
        afters = [read_pagemap(self.proc, self.process, *r) for r in order]
        self._still_idle = None
        if order:
            # classify every range in one vectorised pass (per-call overhead dominates for many small VMAs)
            def cat(f: str) -> np.ndarray:
                return np.concatenate([getattr(v, f) for v in views])

            # (head slots of two scans index different frames: not used past this point)
            m = views[0] if len(views) == 1 else _Scan(order, cat("entries"), cat("pfn"),
                                                       cat("head_slot"), cat("kflags"), cat("tracked"),
                                                       views[0].frames)
            after_all = np.concatenate(afters) if len(afters) > 1 else afters[0]
            unchanged = np.array_equal(after_all, m.entries)     # the common case: no page changed
            state, idle, confirmed = self._classify(m, after_all, np.concatenate(bit_idle), unchanged)
            if len(views) == 1:
                self._still_idle = (m.frames, m.head_slot[confirmed])
            pfn_all = m.pfn if unchanged else pagemap_pfn(after_all)
            swapped = bool((state & np.uint16(PageState.SWAPPED)).any())
            off = 0
            for r, after in zip(order, afters, strict=True):
                sl = slice(off, off + len(after))
                # segments start zeroed: swap fields only where some page is swapped
                fill(segments, r[0], r[1], state[sl], idle[sl], entries=after if swapped else None, pfn=pfn_all[sl])
                off += len(after)
        self.process.check_alive("read")
        return BackendResult(segments, KNOWN, self.mark_time_ns, warnings=tuple(warnings))

    def read_and_mark(self, ranges: list[VfnRange], next_ranges: list[VfnRange], *,
                      named_ranges: bool) -> BackendResult:
        """End the interval and start the next one at once. The kernel's read already restarted it for every
        page it found idle (PG_idle still set, accessed bits clear), so only the others are written again:
        for mostly idle memory this halves the kernel's rmap walks."""
        out = self.read(ranges)
        self.mark(next_ranges, named_ranges=named_ranges, keep=self._still_idle)
        return out

    def _classify(self, m: _Scan, after: U64, bit_idle: npt.NDArray[np.bool_], unchanged: bool
                  ) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """State and idle bit per page from the mark-time scan ``m``, the pagemap read after the bitmap and the
        bitmap's idle bits; and which pages the bitmap itself confirmed idle (same frame as at the mark)."""
        n = len(after)
        state = base_state(after)
        big = np.uint64((1 << KPF_THP) | (1 << KPF_HUGE))
        if unchanged:
            # fast path: no page changed between mark and read
            was_swapped = (state & np.uint16(PageState.SWAPPED)) != 0
            tracked = m.tracked | was_swapped
            idle = bit_idle | was_swapped
            state |= ((m.kflags & big) != 0).astype(np.uint16) * np.uint16(PageState.HUGE)
            state |= bit(m.kflags, KPF_ZERO_PAGE).astype(np.uint16) * np.uint16(PageState.ZERO_PAGE)
            state |= tracked.astype(np.uint16) * np.uint16(PageState.TRACKED)
            return state, idle, bit_idle
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
        return state, idle, t1 & bit_idle

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


def _unique_blocks(pfns: U64, shift: int = 6) -> I64:
    """Sorted distinct ``pfn >> shift``, without a sort: a mask over the span they cover."""
    b = (pfns >> np.uint64(shift)).astype(np.int64)
    lo = int(b.min())
    mask = np.zeros(int(b.max()) - lo + 1, bool)
    mask[b - lo] = True
    return np.flatnonzero(mask).astype(np.int64) + lo


__all__ = ["PageIdleBackend", "BITMAP", "KPAGEFLAGS", "PAGEMAP_ENTRY"]
