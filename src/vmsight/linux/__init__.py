"""Linux guest awareness with no symbol files: the kernel is found in guest memory (kallsyms, BTF).

    from vmsight.vm import attach
    from vmsight import linux

    with attach(DIR) as vm, vm.paused():
        guest = linux.Guest(vm)                      # discovery (cached per kernel build on disk)
        guest.kernel.release, guest.kernel.kaslr_slide
        guest.object("init_task").mm                 # typed objects over the guest's own BTF
        for t in linux.for_each_task(guest.kernel): print(t.pid, t.comm)
        guest.process(1).read(gva, 16)

Helpers are named after the kernel's: ``for_each_task``, ``find_task``, ``current_task``,
``for_each_vma``, ``for_each_module``. Pause the VM for a consistent picture.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vmsight.errors import MemoryAccessError
from vmsight.linux.kernel import NO_LINUX, Kernel, discover, kernel_of, paused_kernel, set_hostname, uname
from vmsight.linux.lists import list_for_each
from vmsight.linux.mm import Vma, d_path, for_each_vma, mt_entries, task_vmas, vmas_of
from vmsight.linux.modules import Module, for_each_module, lsmod
from vmsight.linux.tasks import (
    Task,
    current_task,
    find_task,
    for_each_process,
    for_each_task,
    init_task,
)
from vmsight.memory.virtual import AddressSpace

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vmsight.linux.types import Object
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
        return vmas_of(self.task)

    def cmdline(self) -> list[str]:
        return self.task.cmdline()

    def as_dict(self) -> dict[str, Any]:
        """The record ``ps`` shows: pid, tgid, ppid, uid, gid, state, comm (as /proc shows it:
        :attr:`Task.proc_comm`), task_comm (the raw ``task->comm``), cmdline (space-joined, like ``ps``),
        start_boottime_ns, kthread."""
        t = self.task
        try:
            cmd = " ".join(t.cmdline())
        except MemoryAccessError as e:  # e.g. argument pages swapped out
            log.info("pid %d: cmdline unreadable: %s", self.pid, e)
            cmd = ""
        return {"pid": self.pid, "tgid": t.tgid, "ppid": t.ppid, "uid": t.uid, "gid": t.gid, "state": t.state,
                "comm": t.proc_comm, "task_comm": t.comm, "cmdline": cmd, "start_boottime_ns": t.start_boottime_ns,
                "kthread": t.is_kthread}


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

    def object(self, name: str, type_name: str | None = None, gva: int | None = None) -> Object:
        """A typed view of a kernel variable (``object("init_task")``) or, with ``type_name`` and ``gva``, of
        the object of that type at ``gva`` (:func:`vmsight.linux.types.kernel_object`)."""
        # imported here: typed objects need the BTF parser (and numpy), which ps and maps never load
        from vmsight.linux.types import kernel_object

        return kernel_object(self.kernel, name, type_name, gva)


def processes(vm: Machine, *, threads: bool = False) -> list[dict[str, Any]]:
    """:meth:`Process.as_dict` of every guest process (every task with ``threads``), sorted by pid; the VM
    is paused while they are read. What ``vmsight ps`` lists."""
    with paused_kernel(vm) as k:
        return sorted((Process(k, t).as_dict() for t in for_each_task(k, threads=threads)), key=lambda d: d["pid"])


def process_dtb(vm: Machine, pid: int) -> int:
    """gpa of the page table mapping process ``pid``'s user half (PTI: the user PGD). For
    ``read-virt --pid``. Raises ProcessNotFound, NoLinuxKernel."""
    with paused_kernel(vm) as k:
        return find_task(k, pid).dtb


__all__ = [
    "NO_LINUX", "Guest", "Kernel", "Module", "Process", "Task", "Vma", "current_task", "d_path", "discover",
    "find_task", "for_each_module", "for_each_process", "for_each_task", "for_each_vma", "init_task",
    "kernel_of", "list_for_each", "lsmod", "mt_entries", "paused_kernel", "process_dtb", "processes", "set_hostname",
    "task_vmas", "uname",
]
