"""Processes and threads: ``for_each_task``, ``find_task``, per-CPU ``current``, and the :class:`Task` view.

The task list is ``init_task.tasks`` (thread-group leaders); each leader's threads hang off
``signal->thread_head`` through ``task->thread_node`` (v3.14+, commit 0c740d0afc3b), which outlived the
older ``task->thread_group`` list (removed in v6.7, "kill task_struct->thread_group") — the latter is
the fallback.
Member offsets come from the guest's BTF; guest memory is untrusted, so every list walk is bounded,
detects cycles and rejects pointers outside the kernel half (:class:`~vmsight.errors.CorruptData`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from vmsight.errors import (
    CorruptData,
    FieldNotFound,
    ProcessNotFound,
    SymbolNotFound,
    TypeNotFound,
    VmsightError,
)
from vmsight.linux.kernel import Kernel
from vmsight.linux.lists import list_for_each
from vmsight.memory.paging import PAGE_SIZE_4K, is_kernel_half, user_half_end
from vmsight.memory.virtual import AddressSpace, cstr

log = logging.getLogger(__name__)

MAX_TASKS = 1 << 17          # PID_MAX_LIMIT is 4M, but a walk this long is corruption in practice
MAX_THREADS = 1 << 16
MAX_CMDLINE = 128 << 10
PF_KTHREAD = 0x00200000      # include/linux/sched.h
PF_WQ_WORKER = 0x00000020

# fs/proc/array.c task_state_array / include/linux/sched.h (stable v5.14 - v6.12)
TASK_REPORT = 0x7F
TASK_UNINTERRUPTIBLE = 0x0002
TASK_NOLOAD = 0x0400
TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
TASK_REPORT_IDLE = TASK_REPORT + 1
TASK_RTLOCK_WAIT = 0x1000
TASK_FROZEN = 0x8000
_STATE_LETTERS = "RSDTtXZPI"


@dataclass(frozen=True)
class TaskLayout:
    """task_struct member offsets (from BTF) the helpers use, resolved once per kernel."""

    tasks: int
    pid: int
    tgid: int
    comm: int
    comm_size: int
    real_parent: int
    mm: int
    flags: int
    state: int
    state_size: int
    exit_state: int
    real_cred: int
    cred_uid: int
    cred_gid: int
    cred_euid: int
    cred_egid: int
    start_time: int
    start_boottime: int | None
    signal: int
    thread_node: int | None
    signal_thread_head: int | None
    thread_group: int | None
    mm_pgd: int
    mm_arg_start: int
    mm_arg_end: int


def task_layout(kernel: Kernel) -> TaskLayout:
    """The kernel's :class:`TaskLayout` (resolved on first use, then kept by the kernel)."""
    return kernel.derived(_resolve_task_layout)


def _resolve_task_layout(kernel: Kernel) -> TaskLayout:
    off = kernel.offsetof
    try:
        # v5.14 renamed task_struct.state to __state (commit 2f064a59a11f "sched: Change
        # task_struct::state"); try the newer member first.
        state = off("task_struct", "__state")
        state_size = kernel.member_size("task_struct", "__state")
    except FieldNotFound:
        state = off("task_struct", "state")
        state_size = kernel.member_size("task_struct", "state")
    try:
        # v5.5 renamed real_start_time to start_boottime (what /proc reports); try the newer name first.
        boot: int | None = off("task_struct", "start_boottime")
    except FieldNotFound:
        boot = off("task_struct", "real_start_time") if kernel.has_member("task_struct", "real_start_time") else None
    thread_node = off("task_struct", "thread_node") if kernel.has_member("task_struct", "thread_node") else None
    thread_head = (off("signal_struct", "thread_head")
                   if kernel.has_member("signal_struct", "thread_head") else None)
    thread_group = off("task_struct", "thread_group") if kernel.has_member("task_struct", "thread_group") else None
    if (thread_node is None or thread_head is None) and thread_group is None:
        raise FieldNotFound("task_struct", "thread_node")
    return TaskLayout(
        tasks=off("task_struct", "tasks"), pid=off("task_struct", "pid"), tgid=off("task_struct", "tgid"),
        comm=off("task_struct", "comm"), comm_size=kernel.member_size("task_struct", "comm"),
        real_parent=off("task_struct", "real_parent"), mm=off("task_struct", "mm"),
        flags=off("task_struct", "flags"), state=state, state_size=state_size,
        exit_state=off("task_struct", "exit_state"), real_cred=off("task_struct", "real_cred"),
        cred_uid=off("cred", "uid"), cred_gid=off("cred", "gid"), cred_euid=off("cred", "euid"),
        cred_egid=off("cred", "egid"), start_time=off("task_struct", "start_time"), start_boottime=boot,
        signal=off("task_struct", "signal"), thread_node=thread_node, signal_thread_head=thread_head,
        thread_group=thread_group, mm_pgd=off("mm_struct", "pgd"), mm_arg_start=off("mm_struct", "arg_start"),
        mm_arg_end=off("mm_struct", "arg_end"))


class Task:
    """A ``struct task_struct`` at ``gva``. Fields are read from guest memory when asked for (pause the
    VM for a consistent picture)."""

    __slots__ = ("kernel", "gva", "_l")

    def __init__(self, kernel: Kernel, gva: int) -> None:
        if not is_kernel_half(gva, la57=kernel.la57):
            raise CorruptData(f"task pointer {gva:#x} is not a kernel address", gva)
        self.kernel = kernel
        self.gva = gva
        self._l = task_layout(kernel)

    def __repr__(self) -> str:
        try:
            return f"<Task pid={self.pid} comm={self.comm!r} at {self.gva:#x}>"
        except VmsightError:
            return f"<Task at {self.gva:#x} (unreadable)>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.gva == self.gva and other.kernel is self.kernel

    def __hash__(self) -> int:
        return hash(self.gva)

    def _u32(self, off: int) -> int:
        return int.from_bytes(self.kernel.read(self.gva + off, 4), "little")

    def _ptr(self, off: int) -> int:
        return int.from_bytes(self.kernel.read(self.gva + off, 8), "little")

    @property
    def pid(self) -> int:
        return self._u32(self._l.pid)

    @property
    def ids(self) -> tuple[int, int]:
        """(pid, tgid): the thread's id and its group's, in one read where they sit side by side (always
        so far), as event decoders need them on every hit."""
        lay = self._l
        if lay.tgid == lay.pid + 4:
            raw = self.kernel.read(self.gva + lay.pid, 8)
            return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
        return self.pid, self.tgid

    @property
    def tgid(self) -> int:
        return self._u32(self._l.tgid)

    @property
    def comm(self) -> str:
        raw = self.kernel.read(self.gva + self._l.comm, self._l.comm_size)
        # guest strings keep their exact bytes (surrogateescape): the CLI escapes them for terminals and
        # gives the bytes in JSON (vmsight.cli.common.escape, json_safe)
        return cstr(raw).decode("utf-8", "surrogateescape")

    @property
    def proc_comm(self) -> str:
        """The name /proc shows (``proc_task_name``): ``comm``, plus for workqueue workers
        ``wq_worker_comm()``'s "+desc" (running) or "-desc" (last work) suffix."""
        comm = self.comm
        flags = self.flags
        try:
            if flags & PF_WQ_WORKER:
                return comm + _wq_worker_suffix(self)
            if flags & PF_KTHREAD:
                # get_kthread_comm(): kthread->full_name when the name did not fit (v5.17, commit
                # d6986ce24fc0 "kthread: dynamically allocate memory to store kthread's full name").
                kt = _to_kthread(self)
                if kt and self.kernel.has_member("kthread", "full_name"):
                    name = self.kernel.read_u64(kt + self.kernel.offsetof("kthread", "full_name"))
                    if is_kernel_half(name, la57=self.kernel.la57):
                        return self.kernel.read_cstr(name, 63).decode("utf-8", "surrogateescape")
        except VmsightError as e:
            log.debug("pid %d: kernel-thread name unreadable: %s", self.pid, e)
        return comm

    @property
    def flags(self) -> int:
        return self._u32(self._l.flags)

    @property
    def is_kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def real_parent(self) -> Task:
        return Task(self.kernel, self._ptr(self._l.real_parent))

    @property
    def ppid(self) -> int:
        """``task_tgid_nr(real_parent)`` as /proc/PID/status reports it (0 for pid 1 and kthreadd)."""
        if self.pid == 0:
            return 0
        parent = self._ptr(self._l.real_parent)
        if parent == self.kernel.symbols.get("init_task"):
            return 0
        return Task(self.kernel, parent).tgid

    @property
    def state_value(self) -> int:
        return int.from_bytes(self.kernel.read(self.gva + self._l.state, self._l.state_size), "little")

    @property
    def exit_state(self) -> int:
        return self._u32(self._l.exit_state)

    @property
    def state(self) -> str:
        """One letter as in /proc/PID/stat (``task_state_index()``): R S D T t X Z P I."""
        st = self.state_value
        state = (st | self.exit_state) & TASK_REPORT
        if st & TASK_IDLE == TASK_IDLE:
            state = TASK_REPORT_IDLE
        if st & (TASK_RTLOCK_WAIT | TASK_FROZEN):
            state = TASK_UNINTERRUPTIBLE
        return _STATE_LETTERS[min(state.bit_length(), len(_STATE_LETTERS) - 1)]

    def _cred(self, off: int) -> int:
        cred = self._ptr(self._l.real_cred)
        if not is_kernel_half(cred, la57=self.kernel.la57):
            raise CorruptData(f"task {self.gva:#x} has cred pointer {cred:#x}", self.gva)
        return int.from_bytes(self.kernel.read(cred + off, 4), "little")

    @property
    def uid(self) -> int:
        return self._cred(self._l.cred_uid)

    @property
    def gid(self) -> int:
        return self._cred(self._l.cred_gid)

    @property
    def euid(self) -> int:
        return self._cred(self._l.cred_euid)

    @property
    def egid(self) -> int:
        return self._cred(self._l.cred_egid)

    @property
    def start_time_ns(self) -> int:
        """Monotonic ns at fork (``task->start_time``)."""
        return int.from_bytes(self.kernel.read(self.gva + self._l.start_time, 8), "little")

    @property
    def start_boottime_ns(self) -> int:
        """Boot-time ns at fork (``start_boottime``, what /proc/PID/stat field 22 is derived from)."""
        off = self._l.start_boottime if self._l.start_boottime is not None else self._l.start_time
        return int.from_bytes(self.kernel.read(self.gva + off, 8), "little")

    @property
    def mm(self) -> int:
        """gva of ``struct mm_struct`` (0 for kernel threads and exited tasks)."""
        return self._ptr(self._l.mm)

    @property
    def pgd(self) -> int:
        """gva of the task's top-level page table (``mm->pgd``); CorruptData without an mm."""
        mm = self.mm
        if not mm:
            raise CorruptData(f"task {self.pid} has no mm (kernel thread or exited)", self.gva)
        if not is_kernel_half(mm, la57=self.kernel.la57):
            raise CorruptData(f"task {self.gva:#x} has mm pointer {mm:#x}", self.gva)
        return self.kernel.read_u64(mm + self._l.mm_pgd)

    @property
    def dtb(self) -> int:
        """gpa of the page table that maps this task's user half: ``mm->pgd``, or with PTI its user copy
        (kernel PGD + 4 KiB, arch/x86/mm/pti.c)."""
        gpa = self.kernel.gva_to_gpa(self.pgd)
        if gpa & 0xFFF:
            raise CorruptData(f"mm->pgd of task {self.pid} is not page aligned", self.gva)
        return gpa + PAGE_SIZE_4K if self.kernel.pti else gpa

    @property
    def kernel_dtb(self) -> int:
        """gpa of ``mm->pgd`` (maps both halves, also under PTI)."""
        return self.kernel.gva_to_gpa(self.pgd)

    def address_space(self) -> AddressSpace:
        """The task's user address space (its own page tables, PTI aware)."""
        vm = self.kernel.vm
        if vm is not None:
            return vm.address_space(self.dtb, la57=self.kernel.la57)
        return AddressSpace(self.kernel.phys, self.dtb, la57=self.kernel.la57)

    def cmdline_raw(self) -> bytes:
        """``mm->arg_start .. arg_end`` read through the task's page tables (what /proc/PID/cmdline
        holds); b"" for tasks without an mm."""
        mm = self.mm
        if not mm:
            return b""
        start = self.kernel.read_u64(mm + self._l.mm_arg_start)
        end = self.kernel.read_u64(mm + self._l.mm_arg_end)
        if end <= start or end > user_half_end(la57=self.kernel.la57):
            return b""
        return self.address_space().read(start, min(end - start, MAX_CMDLINE))

    def cmdline(self) -> list[str]:
        """argv as a list (NUL-separated arguments)."""
        raw = self.cmdline_raw()
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")] if raw else []

    def threads(self) -> Iterator[Task]:
        """Every thread of this task's thread group (the leader included)."""
        lay = self._l
        k = self.kernel
        if lay.thread_node is not None and lay.signal_thread_head is not None:
            sig = self._ptr(lay.signal)
            if not is_kernel_half(sig, la57=k.la57):
                raise CorruptData(f"task {self.gva:#x} has signal pointer {sig:#x}", self.gva)
            for node in list_for_each(k.read_u64, sig + lay.signal_thread_head, max_nodes=MAX_THREADS,
                                      la57=k.la57, what="signal->thread_head"):
                yield Task(k, node - lay.thread_node)
            return
        assert lay.thread_group is not None
        yield self
        for node in list_for_each(k.read_u64, self.gva + lay.thread_group, max_nodes=MAX_THREADS,
                                  la57=k.la57, what="task->thread_group"):
            yield Task(k, node - lay.thread_group)


def _to_kthread(task: Task) -> int:
    """``to_kthread()``: gva of the task's struct kthread, or 0."""
    k = task.kernel
    # task->worker_private since v5.17 (commit e32cf5dfbe22 "kthread: Generalize pf_io_worker so it
    # can point to struct kthread"), task->set_child_tid before.
    try:
        kt_off = k.offsetof("task_struct", "worker_private")
    except FieldNotFound:
        kt_off = k.offsetof("task_struct", "set_child_tid")
    kthread = k.read_u64(task.gva + kt_off)
    return kthread if is_kernel_half(kthread, la57=k.la57) else 0


def _wq_worker_suffix(task: Task) -> str:
    k = task.kernel
    kthread = _to_kthread(task)
    if not kthread:
        return ""
    worker = k.read_u64(kthread + k.offsetof("kthread", "data"))
    if not is_kernel_half(worker, la57=k.la57):
        return ""
    prefix = ""
    if task.comm.startswith("kworker/R-"):
        # Newer kernels (workqueue: "Rename rescuer kworker", after v6.1) name rescuers
        # "kworker/R-<wq name>" and format_worker_id() prints the full wq name, not the 16-byte comm.
        wq = k.read_u64(worker + k.offsetof("worker", "rescue_wq"))
        if is_kernel_half(wq, la57=k.la57):
            name = cstr(k.read(wq + k.offsetof("workqueue_struct", "name"),
                               k.member_size("workqueue_struct", "name")))
            prefix = "kworker/R-" + name.decode("utf-8", "surrogateescape")
    if not is_kernel_half(k.read_u64(worker + k.offsetof("worker", "pool")), la57=k.la57):
        return prefix[len(task.comm):] if prefix.startswith(task.comm) else ""
    desc = cstr(k.read(worker + k.offsetof("worker", "desc"), k.member_size("worker", "desc")))
    if not desc:
        return prefix[len(task.comm):] if prefix.startswith(task.comm) else ""
    running = k.read_u64(worker + k.offsetof("worker", "current_work"))
    # proc_task_name() formats into a 64-byte buffer
    head = prefix if prefix.startswith(task.comm) else task.comm
    full = head + ("+" if running else "-") + desc.decode("utf-8", "surrogateescape")
    return full[len(task.comm):63]


def init_task(kernel: Kernel) -> Task:
    return Task(kernel, kernel.symbol("init_task"))


def for_each_process(kernel: Kernel) -> Iterator[Task]:
    """Thread-group leaders, from ``init_task.tasks`` (init_task itself, pid 0, is not yielded, as in
    the kernel's ``for_each_process``)."""
    lay = task_layout(kernel)
    head = kernel.symbol("init_task") + lay.tasks
    for node in list_for_each(kernel.read_u64, head, max_nodes=MAX_TASKS, la57=kernel.la57,
                              what="init_task.tasks"):
        yield Task(kernel, node - lay.tasks)


def for_each_task(kernel: Kernel, *, threads: bool = True) -> Iterator[Task]:
    """Every task: processes and (with ``threads``) all their threads (``for_each_process_thread``)."""
    for leader in for_each_process(kernel):
        if threads:
            yield from leader.threads()
        else:
            yield leader


def find_task(kernel: Kernel, pid: int) -> Task:
    """The task (process or thread) with this pid (pid 0: init_task). Raises ProcessNotFound."""
    if pid == 0:
        return init_task(kernel)
    for leader in for_each_process(kernel):
        if leader.pid == pid:
            return leader
    for t in for_each_task(kernel):
        if t.pid == pid:
            return t
    raise ProcessNotFound(pid)


def current_task_offset(kernel: Kernel) -> int:
    """Per-cpu offset of the ``current`` task pointer: add a CPU's per-cpu base (``__per_cpu_offset[cpu]``,
    or its gs_base in kernel mode). Raises SymbolNotFound."""
    return kernel.derived(_resolve_current_task_offset)


def _resolve_current_task_offset(kernel: Kernel) -> int:
    # The per-cpu variable current_task (until v6.1 and again from v6.15) ...
    if kernel.has_symbol("current_task"):
        return kernel.symbol("current_task")
    # ... moved into struct pcpu_hot in v6.2 (commit e57ef2ed97c1 "x86: Put hot per CPU variables into a struct").
    try:
        return kernel.symbol("pcpu_hot") + kernel.offsetof("pcpu_hot", "current_task")
    except (SymbolNotFound, FieldNotFound, TypeNotFound) as e:
        raise SymbolNotFound("current_task (nor pcpu_hot.current_task)") from e


def current_task(kernel: Kernel, cpu: int) -> Task:
    """The task running on ``cpu`` (its idle task when idle)."""
    try:
        off = current_task_offset(kernel)
    except SymbolNotFound as e:
        raise CorruptData(f"cannot locate the current task of cpu {cpu}: {e}") from e
    return Task(kernel, kernel.read_u64((kernel.per_cpu_offset(cpu) + off) & ((1 << 64) - 1)))


__all__ = [
    "MAX_TASKS", "Task", "TaskLayout", "current_task", "current_task_offset", "find_task", "for_each_process", "for_each_task",
    "init_task", "task_layout",
]
