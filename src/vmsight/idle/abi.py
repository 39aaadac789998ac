"""Kernel ABIs of idle tracking: ``/proc/PID/pagemap``, ``/proc/kpageflags``, ``/sys/kernel/mm/page_idle/bitmap``
and the proposed (never merged) ``/proc/PID/page_idle``. Constants and vectorised decoders only, no I/O.

Bit positions are from Documentation/admin-guide/mm/pagemap.rst and include/uapi/linux/kernel-page-flags.h.
Every mask is built from ``np.uint64`` / Python ints: a ``1 << bit`` computed in 32 bits is a known bug elsewhere.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
WORD_BITS = 64                # one u64 bitmap word covers 64 pages (vfn or pfn)
WORD_BYTES = 8
BITMAP_IO_MAX = 4096          # page_idle bitmap: at most 4 KiB (512 words) per read/write call
WORDS_PER_IO = BITMAP_IO_MAX // WORD_BYTES
PAGEMAP_ENTRY = 8

# /proc/PID/pagemap entry
PM_PFN_MASK = (1 << 55) - 1   # bits 0-54: PFN (0 without CAP_SYS_ADMIN)
PM_SWAP_TYPE_MASK = 0x1F      # bits 0-4 when swapped
PM_SWAP_OFFSET_SHIFT = 5      # bits 5-54 when swapped
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58            # guard region (v6.14+); always 0 before
PM_FILE = 1 << 61             # file page or shared anon
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# PAGEMAP_SCAN ioctl on /proc/PID/pagemap: runs of pages by category. Since v6.7 ("fs/proc/task_mmu:
# Implement IOCTL to get and optionally clear info about PTEs"); ENOTTY before.
PAGEMAP_SCAN = 0xC0606610     # _IOWR('f', 16, struct pm_scan_arg), sizeof = 96
PM_SCAN_ARG = "<12Q"          # size flags start end walk_end vec vec_len max_pages inverted mask anyof return
PAGE_IS_HUGE = 1 << 6         # mapped by a PMD (THP) or hugetlb; a PTE-mapped large folio is not

# /proc/kpageflags bits
KPF_REFERENCED = 2
KPF_LRU = 5
KPF_MMAP = 11
KPF_ANON = 12
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_NOPAGE = 20
KPF_THP = 22
KPF_ZERO_PAGE = 24
KPF_IDLE = 25

U64 = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


def bit(flags: U64, n: int) -> BoolArray:
    """Boolean array: bit ``n`` of each u64 in ``flags``."""
    return (flags & np.uint64(1 << n)) != 0


def has(entries: U64, mask: int) -> BoolArray:
    return (entries & np.uint64(mask)) != 0


def pagemap_pfn(entries: U64) -> U64:
    """PFN of present entries, 0 elsewhere."""
    return np.where(has(entries, PM_PRESENT), entries & np.uint64(PM_PFN_MASK), np.uint64(0)).astype(np.uint64)


def pagemap_swap(entries: U64) -> tuple[npt.NDArray[np.uint8], U64]:
    """(swap type, swap offset) of swapped entries, 0 elsewhere. Both read 0 without CAP_SYS_ADMIN."""
    swapped = has(entries, PM_SWAP) & ~has(entries, PM_PRESENT)
    low = entries & np.uint64(PM_PFN_MASK)
    stype = np.where(swapped, low & np.uint64(PM_SWAP_TYPE_MASK), 0).astype(np.uint8)
    soff = np.where(swapped, low >> np.uint64(PM_SWAP_OFFSET_SHIFT), 0).astype(np.uint64)
    return stype, soff


def word_runs(words: npt.NDArray[np.int64], max_gap: int = 8, max_len: int = WORDS_PER_IO) -> list[tuple[int, int]]:
    """Group sorted unique word indices into I/O runs ``(first_word, count)``: words closer than ``max_gap``
    share a run (the words between are read too / written as 0, which page_idle ignores), and no run is longer
    than ``max_len`` words (the 4 KiB per call limit)."""
    runs: list[tuple[int, int]] = []
    if len(words) == 0:
        return runs
    w = np.asarray(words, dtype=np.int64)
    breaks = np.nonzero(np.diff(w) > max_gap)[0]
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(w) - 1]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first, last = int(w[s]), int(w[e])
        while first <= last:
            n = min(max_len, last - first + 1)
            runs.append((first, n))
            first += n
    return runs


def pack_bits(flags: BoolArray) -> U64:
    """Pack a per-page boolean array (length a multiple of 64) into u64 words, bit i%64 of word i//64."""
    b = np.asarray(flags, dtype=bool)
    if len(b) % WORD_BITS:
        b = np.concatenate((b, np.zeros(WORD_BITS - len(b) % WORD_BITS, bool)))
    packed = np.packbits(b.reshape(-1, 8), axis=1, bitorder="little").reshape(-1)
    return packed.view("<u8").astype(np.uint64)


def unpack_bits(words: U64) -> BoolArray:
    """Inverse of :func:`pack_bits`."""
    le = np.asarray(words, dtype=np.uint64).astype("<u8")
    return np.unpackbits(le.view(np.uint8), bitorder="little").astype(bool)
