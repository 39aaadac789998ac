"""A controllable workload for idle-tracking tests: maps N MiB, populates every page, then touches exactly
the pages it is told to and says which. Run as a child process; one command per stdin line, one reply line:

  ready <addr hex> <bytes> <guard addr hex>   (at start; with --split the mapping is two VMAs around a guard page)
  touch i,j,k   -> "touched <n>"      write one byte in each listed page (page index within the mapping)
  read i,j,k    -> "read <n>"         read one byte in each listed page
  pageout i n   -> "pageout <rc>"     madvise(MADV_PAGEOUT) pages [i, i+n) (push them to swap)
  loop i,j secs -> "looped <passes>"  touch the pages continuously for secs, flushing this CPU's TLB each pass
  exit
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time

PAGE = 4096
HUGE = 2 << 20
MADV_PAGEOUT = 21
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def addr_of(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def parse_pages(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x] if text != "-" else []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--thp", action="store_true", help="2 MiB-aligned, MADV_HUGEPAGE")
    ap.add_argument("--split", action="store_true", help="guard page in the middle: two VMAs")
    ap.add_argument("--cpu", type=int, default=None)
    a = ap.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    size = a.mib << 20
    # over-allocate so the working area can start 2 MiB-aligned
    raw = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = addr_of(raw)
    off0 = (-base) % HUGE
    addr = base + off0
    if libc.madvise(addr, size, MADV_HUGEPAGE if a.thp else MADV_NOHUGEPAGE) != 0:
        print(f"madvise failed errno {ctypes.get_errno()}", file=sys.stderr)
    guard = 0
    if a.split:
        guard = addr + size // 2
        libc.mprotect(guard, PAGE, 0)
    npages = size // PAGE
    view = memoryview(raw)
    for i in range(npages):  # populate (and dirty) every page
        if guard and addr + i * PAGE == guard:
            continue
        view[off0 + i * PAGE] = 1
    scratch = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    sview = memoryview(scratch)
    for i in range(64):
        sview[i * PAGE] = 1
    saddr = addr_of(scratch)
    print(f"ready {addr:#x} {size} {guard:#x}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "touch":
            pages = parse_pages(args[0])
            for i in pages:
                view[off0 + i * PAGE] = (view[off0 + i * PAGE] + 1) & 0xFF
            print(f"touched {len(pages)}", flush=True)
        elif cmd == "read":
            pages = parse_pages(args[0])
            s = 0
            for i in pages:
                s += view[off0 + i * PAGE]
            print(f"read {len(pages)}", flush=True)
        elif cmd == "pageout":
            i, n = int(args[0]), int(args[1])
            rc = libc.madvise(addr + i * PAGE, n * PAGE, MADV_PAGEOUT)
            print(f"pageout {rc if rc == 0 else -ctypes.get_errno()}", flush=True)
        elif cmd == "loop":
            pages = parse_pages(args[0])
            end = time.monotonic() + float(args[1])
            passes = 0
            while time.monotonic() < end:
                # mprotect of 64 populated pages changes > 33 PTEs: Linux flushes the whole local TLB, so
                # under TCG the next touches walk the page tables and set accessed bits again.
                libc.mprotect(saddr, 64 * PAGE, 1)
                libc.mprotect(saddr, 64 * PAGE, 3)
                for i in pages:
                    view[off0 + i * PAGE] = (view[off0 + i * PAGE] + 1) & 0xFF
                passes += 1
                time.sleep(0.002)
            print(f"looped {passes}", flush=True)
        elif cmd == "exit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
