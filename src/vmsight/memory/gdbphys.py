"""Guest-physical memory through the gdbstub's physical mode (``Qqemu.PhyMemMode:1``): the slowest
backend, available whenever a stub is. Only RAM ranges are accessed; MMIO would really be touched."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from vmsight.memory.layout import RamLayout


class PhysicalModeStub(Protocol):
    """What this backend needs of a gdbstub client (:class:`vmsight.qemu.rsp.GdbStub`; memory/ knows no QEMU)."""

    def set_physical_mode(self, on: bool) -> None: ...
    def read_memory(self, addr: int, size: int) -> bytes: ...
    def write_memory(self, addr: int, data: bytes) -> None: ...


class GdbPhysRam:
    name = "gdbstub-physical"

    def __init__(self, stopped_stub: Callable[[], AbstractContextManager[PhysicalModeStub]], layout: RamLayout) -> None:
        """``stopped_stub()`` yields the stub with the VM stopped (packets to a running VM are lost)."""
        self._stopped_stub = stopped_stub
        self.layout = layout

    def read_gpa(self, gpa: int, size: int) -> bytes:
        self.layout.check(gpa, size)
        with self._stopped_stub() as stub:
            stub.set_physical_mode(True)
            try:
                return stub.read_memory(gpa, size)
            finally:
                stub.set_physical_mode(False)  # the mode is global and sticky: leave QEMU as we found it

    def write_gpa(self, gpa: int, data: bytes) -> None:
        self.layout.check(gpa, len(data))
        with self._stopped_stub() as stub:
            stub.set_physical_mode(True)
            try:
                stub.write_memory(gpa, data)
            finally:
                stub.set_physical_mode(False)
