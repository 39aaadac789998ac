"""What the Linux layer needs from a target: the :class:`Machine` protocol.

A live QEMU VM (:class:`vmsight.vm.VM`) and a memory dump (:class:`vmsight.dump.DumpMachine`) both
implement it, so ``vmsight.linux`` reads either the same way and never sees QMP, HMP or file formats.
Imports point down: this module knows only ``memory/``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from vmsight.memory.physical import PhysicalMemory
from vmsight.memory.virtual import AddressSpace

# Keys of :meth:`Machine.control_registers` (gdbstub naming). A target gives those it knows: a raw image
# knows none, ``--cr3`` only cr3, QEMU's ELF notes everything but efer.
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "efer", "rip", "rsp", "eflags", "cs", "ss", "ds", "es", "fs",
                     "gs", "fs_base", "gs_base", "k_gs_base")


class VcpuRef(Protocol):
    """A vCPU as the Linux layer names it: by QEMU cpu-index."""

    @property
    def index(self) -> int: ...


@runtime_checkable
class Machine(Protocol):
    """A target the Linux layer can read: guest-physical memory, address spaces over it, and what is
    known of each vCPU's control state."""

    @property
    def phys(self) -> PhysicalMemory:
        """Guest-physical memory (RAM only: holes and MMIO are refused)."""
        ...

    @property
    def la57(self) -> bool:
        """5-level paging (CR4.LA57 of vCPU 0; False when unknown)."""
        ...

    def address_space(self, dtb: int, *, la57: bool | None = None) -> AddressSpace:
        """The address space rooted at ``dtb`` (cached per target; dropped when a live target resumes)."""
        ...

    def vcpus(self) -> Sequence[VcpuRef]: ...

    def control_registers(self) -> dict[int, dict[str, int]]:
        """{vCPU index: {register: value}} with the :data:`CONTROL_REGISTERS` this target knows (a
        vCPU whose state is unknown is left out; an empty dict means no vCPU state at all)."""
        ...

    def paused(self) -> AbstractContextManager[Any]:
        """Keep the target still inside the block (a no-op for a dump)."""
        ...


__all__ = ["CONTROL_REGISTERS", "Machine", "VcpuRef"]
