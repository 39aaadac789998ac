"""Synthetic /proc and /sys for idle-tracker unit tests (imported by the test_idle_* modules).

Text and pagemap/kpageflags files are real files in a temporary directory; only the page_idle bitmap and
DAMON's sysfs need behaviour, so they are small models behind the same KernelFiles chokepoint, recording
every write (offset, bytes) so tests can assert the exact traffic."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

from vmsight.idle.abi import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_LRU,
    KPF_THP,
    PAGE_IS_HUGE,
    PAGEMAP_SCAN,
    PM_PRESENT,
    PM_SCAN_ARG,
    PM_SWAP,
)
from vmsight.idle.kfiles import KernelFiles

BITMAP = "kernel/mm/page_idle/bitmap"
LRU = 1 << KPF_LRU


def stat_line(pid: int, comm: str = "work", state: str = "S", flags: int = 0x400000, start: int = 1234) -> str:
    fields = [state, "1", str(pid), str(pid), "0", "-1", str(flags)] + ["0"] * 12 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


class FakeProc(KernelFiles):
    """A /proc with one process: maps, stat, pagemap entries by vfn, kpageflags by pfn."""

    def __init__(self, root: Path, pid: int = 4242) -> None:
        (root / str(pid)).mkdir(parents=True, exist_ok=True)
        super().__init__(str(root))
        self.pid = pid
        self.set_stat()
        (root / "kpageflags").touch()
        (root / str(pid) / "pagemap").touch()

    def set_stat(self, **kw: object) -> None:
        Path(self.path(f"{self.pid}/stat")).write_text(stat_line(self.pid, **kw))  # type: ignore[arg-type]

    def set_maps(self, vmas: list[tuple[int, int, str, str]]) -> None:
        self.maps_end_vfn = max(hi for _, hi, _, _ in vmas) >> 12
        lines = [f"{lo:x}-{hi:x} {perms} 00000000 00:00 0 {name}".rstrip() for lo, hi, perms, name in vmas]
        Path(self.path(f"{self.pid}/maps")).write_text("\n".join(lines) + "\n")

    def set_pagemap(self, entries: dict[int, int]) -> None:
        """vfn -> raw pagemap entry (others read 0). Rewrites the file (the cached fd sees the new data)."""
        path = self.path(f"{self.pid}/pagemap")
        with open(path, "r+b") as f:
            f.truncate(0)
            if entries:  # like the kernel: every mapped vfn reads (0 when unpopulated); an empty dict = EOF
                f.truncate(max(getattr(self, "maps_end_vfn", 0), max(entries) + 1) * 8)
            for vfn, e in entries.items():
                f.seek(vfn * 8)
                f.write(struct.pack("<Q", e))

    pmd_vfns: list[tuple[int, int]] | None = None   # PMD-mapped [lo, hi) vfn runs; None: no PAGEMAP_SCAN
    kpf_reads: int = 0                               # kpageflags entries read

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        data = super().pread(rel, offset, size)
        if rel == "kpageflags":
            self.kpf_reads += len(data) // 8
        return data

    def ioctl(self, rel: str, request: int, arg: bytearray) -> int:
        """PAGEMAP_SCAN over ``pmd_vfns`` (category PAGE_IS_HUGE only), like fs/proc/task_mmu.c: regions
        clipped to [start, end), at most vec_len of them, walk_end where it stopped."""
        if self.pmd_vfns is None or request != PAGEMAP_SCAN:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        f = list(struct.unpack(PM_SCAN_ARG, arg))
        start, end, vec, vec_len = f[2], f[3], f[5], f[6]
        regions = [(max(lo << 12, start), min(hi << 12, end)) for lo, hi in sorted(self.pmd_vfns)]
        regions = [(a, b) for a, b in regions if a < b]
        out = regions[:vec_len]
        walk_end = end if len(regions) <= vec_len else regions[vec_len][0]
        buf = b"".join(struct.pack("<3Q", a, b, PAGE_IS_HUGE) for a, b in out)
        ctypes.memmove(vec, buf, len(buf))
        struct.pack_into("<Q", arg, 32, walk_end)
        return len(out)

    def set_kpageflags(self, flags: dict[int, int], max_pfn: int = 1 << 16) -> None:
        path = self.path("kpageflags")
        with open(path, "r+b") as f:
            f.truncate(max_pfn * 8)
            for pfn, v in flags.items():
                f.seek(pfn * 8)
                f.write(struct.pack("<Q", v))


def present(pfn: int, exclusive: bool = True) -> int:
    return PM_PRESENT | pfn | ((1 << 56) if exclusive else 0)


def swapped(stype: int, offset: int) -> int:
    return PM_SWAP | stype | (offset << 5)


class FakePageIdleSys(KernelFiles):
    """/sys with a page_idle bitmap model (mm/page_idle.c semantics): writing a set bit marks an LRU, non-tail
    page idle; reading reports idle pages that were not accessed since. ``access(pfn)`` simulates a touch."""

    def __init__(self, root: Path, kflags: dict[int, int], max_pfn: int = 1 << 16) -> None:
        (root / "kernel/mm/page_idle").mkdir(parents=True, exist_ok=True)
        (root / BITMAP).touch()
        super().__init__(str(root))
        self.kflags = kflags
        self.max_pfn = max_pfn
        self.idle: set[int] = set()
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def _trackable(self, pfn: int) -> bool:
        f = self.kflags.get(pfn, 0)
        return bool(f & LRU) and not f & (1 << KPF_COMPOUND_TAIL)

    def _clip(self, offset: int, size: int) -> int:
        """Like mm/page_idle.c: ENXIO at or beyond max_pfn, else stop at the word holding max_pfn - 1."""
        first = offset // 8 * 64
        if first >= self.max_pfn:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return min(size // 8, -(-(self.max_pfn - first) // 64)) * 8

    def access(self, pfn: int) -> None:
        self.idle.discard(pfn)

    def pwrite(self, rel: str, offset: int, data: bytes) -> int:
        if rel != BITMAP:
            return super().pwrite(rel, offset, data)
        assert offset % 8 == 0 and len(data) % 8 == 0 and 0 < len(data) <= 4096, (offset, len(data))
        data = data[:self._clip(offset, len(data))]
        self.writes.append((offset, bytes(data)))
        for i, (word,) in enumerate(struct.iter_unpack("<Q", data)):
            for b in range(64):
                pfn = (offset // 8 + i) * 64 + b
                if word >> b & 1 and pfn < self.max_pfn and self._trackable(pfn):
                    self.idle.add(pfn)
        return len(data)

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        if rel != BITMAP:
            return super().pread(rel, offset, size)
        assert offset % 8 == 0 and size % 8 == 0 and 0 < size <= 4096, (offset, size)
        size = self._clip(offset, size)
        self.reads.append((offset, size))
        out = bytearray()
        for w in range(offset // 8, offset // 8 + size // 8):
            word = 0
            for b in range(64):
                if w * 64 + b in self.idle and self._trackable(w * 64 + b):
                    word |= 1 << b
            out += struct.pack("<Q", word)
        return bytes(out)

    def open_binary(self, rel: str, write: bool = False) -> None:
        if rel != BITMAP:
            super().open_binary(rel, write)


def thp_flags(head: int, nr: int = 512) -> dict[int, int]:
    d = {head: (1 << KPF_COMPOUND_HEAD) | (1 << KPF_THP) | LRU}
    for p in range(head + 1, head + nr):
        d[p] = (1 << KPF_COMPOUND_TAIL) | (1 << KPF_THP) | LRU
    return d


class FakeDamonSys(KernelFiles):
    """An in-memory DAMON sysfs (mm/damon/sysfs.c directory layout, v6.12) that records every write."""

    K = "kernel/mm/damon/admin/kdamonds"

    def __init__(self, root: Path, nr_kdamonds: int = 0) -> None:
        super().__init__(str(root))
        self.files: dict[str, str] = {f"{self.K}/nr_kdamonds": "0"}
        self.writes: list[tuple[str, str]] = []
        self.regions: list[tuple[int, int, int, int]] = []
        self._nr_kdamonds(nr_kdamonds)

    def _nr_kdamonds(self, n: int) -> None:
        for k in [k for k in self.files if k.startswith(f"{self.K}/") and k != f"{self.K}/nr_kdamonds"]:
            del self.files[k]
        self.files[f"{self.K}/nr_kdamonds"] = str(n)
        for i in range(n):
            self.files.update({f"{self.K}/{i}/state": "off", f"{self.K}/{i}/pid": "-1",
                               f"{self.K}/{i}/contexts/nr_contexts": "0"})

    def exists(self, rel: str) -> bool:
        return rel in self.files or any(k.startswith(rel.rstrip("/") + "/") for k in self.files)

    def read_text(self, rel: str) -> str:
        if rel not in self.files:
            raise FileNotFoundError(rel)
        return self.files[rel] + "\n"

    def listdir(self, rel: str) -> list[str]:
        pre = rel.rstrip("/") + "/"
        return sorted({k[len(pre):].split("/")[0] for k in self.files if k.startswith(pre)})

    def write_text(self, rel: str, text: str) -> None:
        v = text.strip()
        self.writes.append((rel[len(self.K) + 1:], v))
        if rel == f"{self.K}/nr_kdamonds":
            if any(self.files[k] == "on" for k in self.files if k.endswith("/state")):
                raise OSError(16, "EBUSY")
            self._nr_kdamonds(int(v))
            return
        if rel.endswith("/contexts/nr_contexts"):
            c = rel[: -len("nr_contexts")] + "0/"
            self.files[c + "avail_operations"] = "vaddr fvaddr paddr"
            self.files[c + "operations"] = "vaddr"
            self.files[c + "targets/nr_targets"] = "0"
            self.files[c + "schemes/nr_schemes"] = "0"
        if rel.endswith("/schemes/nr_schemes"):
            self.files[rel[: -len("nr_schemes")] + "0/action"] = "pageout"
        if rel.endswith("/state"):
            if v == "on":
                self.files[rel[: -len("state")] + "pid"] = "777"
            elif v == "off":
                self.files[rel[: -len("state")] + "pid"] = "-1"
            elif v == "update_schemes_tried_regions":
                base = rel[: -len("state")] + "contexts/0/schemes/0/tried_regions"
                for k in [k for k in self.files if k.startswith(base)]:
                    del self.files[k]
                self.files[f"{base}/total_bytes"] = str(sum(e - s for s, e, _, _ in self.regions))
                for i, (s, e, n, a) in enumerate(self.regions):
                    self.files.update({f"{base}/{i}/start": str(s), f"{base}/{i}/end": str(e),
                                       f"{base}/{i}/nr_accesses": str(n), f"{base}/{i}/age": str(a)})
                return
            else:
                return
        self.files[rel] = v


def lock_dir(tmp: Path) -> str:
    d = tmp / "locks"
    os.makedirs(d, exist_ok=True)
    return str(d)
