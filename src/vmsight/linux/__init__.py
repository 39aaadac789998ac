"""Linux guest awareness with no symbol files: the kernel is found in guest memory (kallsyms, BTF).

    from vmsight.vm import attach
    from vmsight import linux

    with attach(DIR) as vm, vm.paused():
        guest = linux.Guest(vm)                      # discovery (cached per kernel build on disk)
        guest.kernel.release, guest.kernel.kaslr_slide
        guest.kernel.object("init_task").mm          # typed objects over the guest's own BTF
        for t in linux.for_each_task(guest.kernel): print(t.pid, t.comm)
        guest.process(1).read(gva, 16)

Helpers are named after the kernel's: ``for_each_task``, ``find_task``, ``current_task``,
``for_each_vma``, ``for_each_module``. Pause the VM for a consistent picture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmsight.linux.kernel import NO_LINUX, Kernel, discover, kernel_of, set_hostname, uname
from vmsight.linux.lists import list_for_each
from vmsight.linux.mm import Vma, d_path, for_each_vma, mt_entries, task_vmas
from vmsight.linux.modules import Module, for_each_module, lsmod
from vmsight.linux.tasks import (
    Task,
    current_task,
    find_task,
    for_each_process,
    for_each_task,
    init_task,
)
from vmsight.linux.tasks import processes as task_dicts
from vmsight.memory.virtual import AddressSpace

if TYPE_CHECKING:
    from vmsight.target import Machine


class Process:
    """A guest process (or thread) seen from outside: its task and its own address space."""

    def __init__(self, kernel: Kernel, task: Task) -> None:
        self.kernel = kernel
        self.task = task
        self.pid = task.pid

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} comm={self.task.comm!r}>"

    @property
    def dtb(self) -> int:
        """gpa of the page table for the user half (PTI aware)."""
        return self.task.dtb

    @property
    def address_space(self) -> AddressSpace:
        return self.task.address_space()

    def read(self, gva: int, size: int) -> bytes:
        """Read the process's virtual memory through its own page tables."""
        return self.task.address_space().read(gva, size)

    def write(self, gva: int, data: bytes) -> None:
        """Write the process's virtual memory (explicit request only)."""
        self.task.address_space().write(gva, data)

    def maps(self) -> list[Vma]:
        mm = self.task.mm
        return list(for_each_vma(self.kernel, mm)) if mm else []

    def cmdline(self) -> list[str]:
        return self.task.cmdline()


class Guest:
    """A Linux guest: ``Guest(vm)`` discovers the kernel (or raises NoLinuxKernel)."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.kernel = kernel_of(vm)

    def __repr__(self) -> str:
        return f"<Guest {self.kernel!r}>"

    def process(self, pid: int) -> Process:
        """Raises ProcessNotFound."""
        return Process(self.kernel, find_task(self.kernel, pid))

    def processes(self, *, threads: bool = False) -> list[dict[str, Any]]:
        return task_dicts(self.kernel, threads=threads)

    def tasks(self, *, threads: bool = True) -> list[Task]:
        return list(for_each_task(self.kernel, threads=threads))

    def uname(self) -> dict[str, str]:
        return uname(self.kernel)

    def set_hostname(self, hostname: str) -> None:
        set_hostname(self.kernel, hostname)

    def modules(self) -> list[Module]:
        return list(for_each_module(self.kernel))

    def symbol(self, name: str) -> int:
        return self.kernel.symbol(name)

    def symbolize(self, gva: int) -> str:
        return self.kernel.symbolize(gva)


def processes(vm: Machine, *, threads: bool = False) -> list[dict[str, Any]]:
    """Simple dicts (pid, tgid, ppid, uid, gid, state, comm, cmdline, ...) of every guest process,
    sorted by pid; the VM is paused while they are read."""
    k = kernel_of(vm)
    with vm.paused():
        k.invalidate()
        return task_dicts(k, threads=threads)


def process_dtb(vm: Machine, pid: int) -> int:
    """gpa of the page table mapping process ``pid``'s user half (PTI: the user PGD). For
    ``read-virt --pid``. Raises ProcessNotFound, NoLinuxKernel."""
    k = kernel_of(vm)
    with vm.paused():
        k.invalidate()
        return find_task(k, pid).dtb


__all__ = [
    "NO_LINUX", "Guest", "Kernel", "Module", "Process", "Task", "Vma", "current_task", "d_path", "discover",
    "find_task", "for_each_module", "for_each_process", "for_each_task", "for_each_vma", "init_task",
    "kernel_of", "list_for_each", "lsmod", "mt_entries", "process_dtb", "processes", "set_hostname",
    "task_vmas", "uname",
]
