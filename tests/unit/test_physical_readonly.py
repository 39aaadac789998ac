"""Read-only by default at the backend: RAM opened without ``writable`` refuses writes with one TargetError
and changes nothing (the /proc/PID/mem file is opened O_RDONLY, so the kernel would refuse it too)."""

from __future__ import annotations

import ctypes
import os

import pytest

from vmsight.errors import TargetError
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import BufferRam, ProcMemRam

SIZE = 8192


def _own_ram(writable: bool) -> tuple[ProcMemRam, ctypes.Array[ctypes.c_char]]:
    """This process's own memory as 'guest RAM': a ctypes buffer at a known host address."""
    buf = ctypes.create_string_buffer(b"\x5a" * SIZE, SIZE)
    layout = RamLayout([RamRange(0, SIZE, 0, "ram")])
    return ProcMemRam(os.getpid(), layout, {0: ctypes.addressof(buf)}, writable=writable), buf


def test_proc_mem_read_only_refuses_writes() -> None:
    ram, buf = _own_ram(writable=False)
    try:
        assert ram.read_gpa(100, 4) == b"\x5a" * 4
        with pytest.raises(TargetError, match="read-only.*writable=True"):
            ram.write_gpa(100, b"XXXX")
        assert buf.raw == b"\x5a" * SIZE
        with pytest.raises(OSError):              # the descriptor itself cannot write
            os.pwrite(ram._fd, b"X", ctypes.addressof(buf))  # noqa: SLF001
        assert buf.raw == b"\x5a" * SIZE
    finally:
        ram.close()


def test_proc_mem_writable_writes_only_what_was_asked() -> None:
    ram, buf = _own_ram(writable=True)
    try:
        ram.write_gpa(4095, b"AB")                  # across a page boundary
        assert buf.raw == b"\x5a" * 4095 + b"AB" + b"\x5a" * (SIZE - 4097)
    finally:
        ram.close()


def test_buffer_ram_over_read_only_memory_refuses_writes() -> None:
    data = bytes(SIZE)
    ram = BufferRam(memoryview(data), RamLayout([RamRange(0, SIZE, 0, "ram")]))
    with pytest.raises(TargetError, match="read-only"):
        ram.write_gpa(0, b"x")
    assert data == bytes(SIZE)
