"""Guest-physical memory backends.

Every backend implements :class:`PhysicalMemory` and refuses any byte outside the RAM layout, so MMIO
(which QEMU really accesses, with side effects) and holes are never touched. Fastest first:

* :class:`MappedRam`: mmap of the guest's shared RAM file (``memory-backend-file,share=on``): a live,
  coherent view, zero-copy ``view()``.
* :class:`ProcMemRam`: ``/proc/<qemu-pid>/mem`` at the host virtual address of each RAM block (root).
* gdbstub physical mode (``vmsight.memory.gdbphys``), slow, always available when a stub is.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from vmsight.errors import PermissionDenied, PhysicalAddressError, TargetError
from vmsight.memory.layout import RamLayout, RamRange

log = logging.getLogger(__name__)


@runtime_checkable
class PhysicalMemory(Protocol):
    """Read/write guest-physical memory. ``name`` says which backend this is."""

    name: str
    layout: RamLayout

    def read_gpa(self, gpa: int, size: int) -> bytes: ...

    def write_gpa(self, gpa: int, data: bytes) -> None: ...


class BufferRam:
    """Guest RAM held in a host buffer, indexed by RAM-block offset. Base of the mapped-file backend;
    also used on its own by unit tests (a ``bytearray`` holding hand-built page tables)."""

    name = "buffer"

    def __init__(self, buf: bytearray | mmap.mmap | memoryview, layout: RamLayout | None = None) -> None:
        self._buf = memoryview(buf)
        if self._buf.ndim != 1 or self._buf.itemsize != 1:
            self._buf = self._buf.cast("B")
        self.layout = layout or RamLayout([RamRange(0, len(self._buf), 0, "buffer")])

    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy view of [gpa, gpa+size); the range must sit inside one RAM range."""
        r = self.layout.find(gpa)
        if r is None or gpa + size > r.end:
            raise PhysicalAddressError(gpa, size, "not inside one contiguous RAM range")
        off = r.offset + (gpa - r.gpa)
        return self._buf[off:off + size]

    def read_gpa(self, gpa: int, size: int) -> bytes:
        r = self.layout.find(gpa)
        if r is not None and gpa + size <= r.end:  # fast path: one range
            off = r.offset + (gpa - r.gpa)
            return self._buf[off:off + size].tobytes()
        return b"".join(self._buf[rr.offset + p - rr.gpa: rr.offset + p - rr.gpa + n].tobytes()
                        for rr, p, n in self.layout.pieces(gpa, size))

    def read_into(self, gpa: int, out: memoryview | bytearray) -> None:
        """Copy [gpa, gpa+len(out)) into ``out`` (no allocation: bulk reads run at memcpy speed)."""
        dst = memoryview(out).cast("B")
        pos = 0
        for rr, p, n in self.layout.pieces(gpa, len(dst)):
            off = rr.offset + p - rr.gpa
            dst[pos:pos + n] = self._buf[off:off + n]
            pos += n

    def read_u64(self, gpa: int) -> int:
        r = self.layout.find(gpa)
        if r is None or gpa + 8 > r.end:
            raise PhysicalAddressError(gpa, 8)
        off = r.offset + (gpa - r.gpa)
        return int.from_bytes(self._buf[off:off + 8], "little")

    def write_gpa(self, gpa: int, data: bytes) -> None:
        if self._buf.readonly:
            raise TargetError(f"guest RAM is mapped read-only: not writing {len(data)} bytes at gpa {gpa:#x}; "
                              "attach with writable=True to write")
        pos = 0
        for rr, p, n in self.layout.pieces(gpa, len(data)):
            off = rr.offset + p - rr.gpa
            self._buf[off:off + n] = data[pos:pos + n]
            pos += n


class MappedRam(BufferRam):
    """The guest's RAM file (``/dev/shm/...`` or a memfd) mapped shared into this process.

    All RAM ranges must belong to the one block the file backs; the file offset is the block offset."""

    name = "mapped-ram-file"

    def __init__(self, path: str, layout: RamLayout, writable: bool = True,
                 verify: Callable[[os.stat_result], None] | None = None) -> None:
        """``verify`` sees the opened file's stat before anything is mapped (it raises to refuse a file the
        target does not use: the path came from a file or a peer vmsight does not trust)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO named: no hang
        except PermissionError as e:
            raise PermissionDenied(f"cannot open guest RAM file {path}: {e.strerror}; run as root "
                                   "or as the user that started QEMU") from e
        try:
            st = os.fstat(fd)
            if verify is not None:
                verify(st)
            size = st.st_size
            need = max((r.offset + r.size for r in layout), default=0)
            if size < need:
                raise PhysicalAddressError(0, need, f"beyond the RAM file {path} ({size:#x} bytes)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        super().__init__(self._mmap, layout)
        self.path = path

    def close(self) -> None:
        self._buf.release()
        self._mmap.close()


class ProcMemRam:
    """``/proc/<qemu-pid>/mem`` at each RAM block's host virtual address (from HMP ``gpa2hva``)."""

    name = "proc-pid-mem"

    def __init__(self, qemu_pid: int, layout: RamLayout, hva_of_range: dict[int, int], *,
                 writable: bool = False) -> None:
        """``hva_of_range`` maps each range's gpa to the host virtual address of its first byte. Read-only
        unless ``writable``: a write then fails in the kernel, not only in our code."""
        self.layout = layout
        self._hva = hva_of_range
        self.writable = writable
        path = f"/proc/{qemu_pid}/mem"
        try:
            self._fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except PermissionError as e:
            raise PermissionDenied(f"cannot open {path}: {e.strerror}; run as root (ptrace access to QEMU "
                                   "is needed) or give QEMU a shared RAM file") from e

    def _hva_of(self, rr: RamRange, gpa: int) -> int:
        return self._hva[rr.gpa] + (gpa - rr.gpa)

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return b"".join(os.pread(self._fd, n, self._hva_of(rr, p)) for rr, p, n in self.layout.pieces(gpa, size))

    def write_gpa(self, gpa: int, data: bytes) -> None:
        if not self.writable:
            raise TargetError(f"guest RAM was opened read-only (/proc/PID/mem): not writing {len(data)} bytes at "
                              f"gpa {gpa:#x}; attach with writable=True to write")
        pos = 0
        for rr, p, n in self.layout.pieces(gpa, len(data)):
            os.pwrite(self._fd, data[pos:pos + n], self._hva_of(rr, p))
            pos += n

    def close(self) -> None:
        os.close(self._fd)


class BlockRam:
    """Guest RAM held in several RAM blocks (NUMA nodes, DIMMs: one memory backend each), every block read
    through its own backend (a :class:`MappedRam` of that block's file); ranges are dispatched by block."""

    def __init__(self, parts: Mapping[str, PhysicalMemory], layout: RamLayout) -> None:
        missing = {r.block for r in layout} - parts.keys()
        if missing:
            raise ValueError(f"no backend for RAM block(s) {', '.join(sorted(missing))}")
        self.parts = parts
        self.layout = layout
        self.name = next(iter(parts.values())).name

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return b"".join(self.parts[rr.block].read_gpa(p, n) for rr, p, n in self.layout.pieces(gpa, size))

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read_gpa(gpa, 8), "little")

    def write_gpa(self, gpa: int, data: bytes) -> None:
        pos = 0
        for rr, p, n in self.layout.pieces(gpa, len(data)):
            self.parts[rr.block].write_gpa(p, data[pos:pos + n])
            pos += n

    def view(self, gpa: int, size: int) -> memoryview:
        r = self.layout.find(gpa)
        part = self.parts[r.block] if r is not None else None
        if r is None or gpa + size > r.end or not isinstance(part, BufferRam):
            raise PhysicalAddressError(gpa, size, "not inside one contiguous RAM range")
        return part.view(gpa, size)

    def close(self) -> None:
        for part in self.parts.values():
            close = getattr(part, "close", None)
            if close:
                close()
