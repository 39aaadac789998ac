"""OS-level events built from breakpoints plus the guest's kallsyms and BTF: system calls, context
switches, exec and exit of processes, each filterable by pid or comm.

Where the breakpoints sit (functions present in every x86-64 kernel since v5.x, not inlined):

* ``do_syscall_64(struct pt_regs *regs, int nr)``: syscall entry, after the entry code saved the user
  registers in ``pt_regs`` (number in ``orig_ax``; arguments di, si, dx, r10, r8, r9). Names come from
  the guest's own ``sys_call_table``: each slot points at ``__x64_sys_<name>``.
* ``__switch_to(prev, next)``: context switch; CR3 is already the next task's (``switch_mm`` ran first).
* ``setup_new_exec(struct linux_binprm *bprm)``: an exec past its point of no return (failed execve
  attempts, e.g. a shell's PATH search, never get here); ``bprm->filename`` is the name given to execve.
* ``do_exit(long code)``: a task exits.

The current task is read from the per-CPU area the vCPU's ``gs_base`` points to in kernel mode:
``current_task`` (until v6.1 and again from v6.15), else ``pcpu_hot.current_task`` (v6.2, commit
e57ef2ed97c1). Each hit stops the VM (about a TCG translation-cache refill, ~10-30 ms with a busy guest),
filtered or not: filters save the handler and the output, not the stop."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmsight.errors import MemoryAccessError, VmsightError
from vmsight.events.types import (
    Breakpoint,
    ContextSwitch,
    Event,
    Lifecycle,
    ProcessExec,
    ProcessExit,
    Syscall,
    TaskInfo,
    VmLifecycle,
)
from vmsight.linux.tasks import Task, current_task_offset, task_layout
from vmsight.memory.paging import is_kernel_half, is_user_half
from vmsight.memory.virtual import read_cstr

if TYPE_CHECKING:
    from vmsight.events.dispatcher import BreakpointHandle, Dispatcher, Handler
    from vmsight.linux.kernel import Kernel

log = logging.getLogger(__name__)

SYSCALL_ENTRY = "do_syscall_64"
SWITCH = "__switch_to"
EXEC = "setup_new_exec"
EXIT = "do_exit"
PANIC = "panic"
MAX_SYSCALLS = 1024
# x86-64 struct pt_regs (arch/x86/include/asm/ptrace.h), ABI-stable; BTF is asked first anyway.
_PT_REGS_DEFAULT = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "bp": 32, "bx": 40, "r11": 48, "r10": 56,
                    "r9": 64, "r8": 72, "ax": 80, "cx": 88, "dx": 96, "si": 104, "di": 112, "orig_ax": 120,
                    "ip": 128, "cs": 136, "flags": 144, "sp": 152, "ss": 160}
_ARG_REGS = ("di", "si", "dx", "r10", "r8", "r9")
# Syscalls whose arguments include user path strings: name -> argument indexes (decoded for display).
PATH_ARGS: dict[str, tuple[int, ...]] = {
    "open": (0,), "openat": (1,), "openat2": (1,), "creat": (0,), "execve": (0,), "execveat": (1,),
    "stat": (0,), "lstat": (0,), "newfstatat": (1,), "statx": (1,), "access": (0,), "faccessat": (1,),
    "faccessat2": (1,), "readlink": (0,), "readlinkat": (1,), "unlink": (0,), "unlinkat": (1,),
    "mkdir": (0,), "mkdirat": (1,), "rmdir": (0,), "chdir": (0,), "chroot": (0,), "rename": (0, 1),
    "renameat": (1, 3), "renameat2": (1, 3), "link": (0, 1), "symlink": (0, 1), "chmod": (0,),
    "fchmodat": (1,), "chown": (0,), "lchown": (0,), "fchownat": (1,), "truncate": (0,), "utimensat": (1,),
    "mknod": (0,), "mknodat": (1,), "statfs": (0,), "swapon": (0,), "umount2": (0,), "mount": (0, 1, 2),
    "uselib": (0,), "sethostname": (0,),
}


@dataclass(frozen=True)
class Filter:
    """Keep events of a pid (thread-group id or thread id) and/or a comm (exact)."""

    pid: int | None = None
    comm: str | None = None

    def match(self, *tasks: TaskInfo) -> bool:
        return any((self.pid is None or self.pid in (t.pid, t.tid)) and (self.comm is None or self.comm == t.comm)
                   for t in tasks)


@dataclass(frozen=True)
class _EventLayout:
    """The offsets decoders use on every hit, resolved once per kernel (``Kernel.derived``): ``struct
    pt_regs`` members (BTF, else the ABI's) and ``struct linux_binprm``'s filename, p and argc."""

    pt_regs: dict[str, int]
    bprm_filename: int
    bprm_p: int
    bprm_argc: int


def _event_layout(k: Kernel) -> _EventLayout:
    def pt(name: str) -> int:
        try:
            return k.offsetof("pt_regs", name)
        except VmsightError:
            return _PT_REGS_DEFAULT[name]

    return _EventLayout({name: pt(name) for name in ("orig_ax", *_ARG_REGS)}, k.offsetof("linux_binprm", "filename"),
                        k.offsetof("linux_binprm", "p"), k.offsetof("linux_binprm", "argc"))


class LinuxEvents:
    """OS-level event sources over a :class:`~vmsight.events.dispatcher.Dispatcher`."""

    def __init__(self, dispatcher: Dispatcher, kernel: Kernel | None = None) -> None:
        self.d = dispatcher
        self.k = kernel or dispatcher.kernel
        task_layout(self.k)   # a kernel whose task_struct is not understood fails here, not on the first hit
        self._cur_off = current_task_offset(self.k)
        lay = self.k.derived(_event_layout)
        self._pt = lay.pt_regs
        self._names: dict[int, str | None] | None = None
        self._bprm_filename, self._bprm_p, self._bprm_argc = lay.bprm_filename, lay.bprm_p, lay.bprm_argc

    # --- layout ------------------------------------------------------------------------------------

    def syscall_names(self) -> dict[int, str | None]:
        """Syscall number -> name from the guest's ``sys_call_table`` (None for ``sys_ni_syscall``)."""
        if self._names is None:
            names: dict[int, str | None] = {}
            table = self.k.symbol("sys_call_table")
            raw = self.k.read(table, 8 * MAX_SYSCALLS)
            for nr in range(MAX_SYSCALLS):
                ptr = int.from_bytes(raw[8 * nr:8 * nr + 8], "little")
                hit = self.k.lookup(ptr) if is_kernel_half(ptr, la57=self.k.la57) else None
                if hit is None or hit[1] != 0:
                    break
                sym = hit[0]
                if "ni_syscall" in sym:
                    names[nr] = None
                elif sym.startswith("__x64_sys_"):
                    names[nr] = sym[len("__x64_sys_"):]
                elif sym.startswith("sys_"):  # kernels before the pt_regs wrappers (v4.17)
                    names[nr] = sym[4:]
                else:
                    break
            if len(names) < 300:
                log.warning("sys_call_table gave only %d names: kernel layout not understood", len(names))
            self._names = names
        return self._names

    # --- tasks -------------------------------------------------------------------------------------

    def task_info(self, task_gva: int) -> TaskInfo:
        """pid/tid/comm of the ``struct task_struct`` at ``task_gva``."""
        task = Task(self.k, task_gva)
        tid, pid = task.ids
        return TaskInfo(pid=pid, tid=tid, comm=task.comm, task_gva=task_gva)

    def current(self, ev: Event) -> TaskInfo:
        """The task running on the event's vCPU (from its gs_base: the per-CPU area in kernel mode)."""
        gs = ev.registers()["gs_base"]
        if not is_kernel_half(gs, la57=self.k.la57):  # a user gs_base: take __per_cpu_offset
            gs = self.k.per_cpu_offset(ev.vcpu)
        return self.task_info(self.k.read_u64((gs + self._cur_off) & ((1 << 64) - 1)))

    def _exec_argv(self, ev: Event, bprm: int, max_args: int = 64, limit: int = 4096) -> tuple[str, ...]:
        """argv of an exec at ``setup_new_exec``: the strings sit NUL-separated at ``bprm->p`` in the new
        mm, which is already the vCPU's (exec_mmap switched it)."""
        argc = int.from_bytes(self.k.read(bprm + self._bprm_argc, 4), "little", signed=True)
        p = self.k.read_u64(bprm + self._bprm_p)
        if not 0 <= argc <= 100000 or not p or not is_user_half(p, la57=self.k.la57):
            return ()
        out: list[str] = []
        buf = b""
        try:
            while len(out) < min(argc, max_args) and len(buf) < limit:
                n = 0x1000 - (p + len(buf)) % 0x1000
                buf += ev.read(p + len(buf), n)
                parts = buf.split(b"\0")
                out = [x.decode("utf-8", "surrogateescape") for x in parts[:-1]][:min(argc, max_args)]
        except MemoryAccessError:
            pass
        return tuple(out)

    def _user_string(self, ev: Event, gva: int, limit: int = 256) -> str | None:
        if not gva or not is_user_half(gva, la57=self.k.la57):
            return None
        try:
            raw = read_cstr(ev.read, gva, limit)
        except MemoryAccessError:
            return None  # not faulted in yet: the kernel will fault it in, we cannot
        # no NUL within the limit: shown truncated
        return raw.decode("utf-8", "surrogateescape") + ("..." if len(raw) == limit else "")

    # --- event sources -----------------------------------------------------------------------------

    def syscalls(self, handler: Handler | None = None, *, pid: int | None = None, comm: str | None = None,
                 names: Iterable[str] | None = None, decode_strings: bool = True) -> BreakpointHandle:
        """:class:`Syscall` events at each system call entry (optionally only ``names``)."""
        table = self.syscall_names()
        flt = Filter(pid, comm)
        wanted = None if names is None else set(names)
        unknown = None if wanted is None else wanted - {n for n in table.values() if n}
        if unknown:
            raise VmsightError(f"unknown syscall names {sorted(unknown)} (this kernel's table has "
                               f"{len(table)} entries)")
        pt = self._pt

        def decode(bp: Breakpoint) -> Event | None:
            regs_gva = bp.registers()["rdi"]
            raw = bp.read(regs_gva, 168)
            nr = int.from_bytes(raw[pt["orig_ax"]:pt["orig_ax"] + 8], "little", signed=True)
            name = table.get(nr)
            if wanted is not None and name not in wanted:
                return None
            task = self.current(bp)
            if not flt.match(task):
                return None
            args = tuple(int.from_bytes(raw[pt[r]:pt[r] + 8], "little") for r in _ARG_REGS)
            ev = Syscall(vcpu=bp.vcpu, nr=nr, name=name, args=args, pid=task.pid, tid=task.tid, comm=task.comm)
            if decode_strings and name in PATH_ARGS:
                for i in PATH_ARGS[name]:
                    s = self._user_string(bp, args[i])
                    if s is not None:
                        ev.strings[i] = s
            return ev

        return self.d.add_breakpoint(SYSCALL_ENTRY, handler, decode=decode, with_registers=True)

    def context_switches(self, handler: Handler | None = None, *, pid: int | None = None,
                         comm: str | None = None) -> BreakpointHandle:
        """:class:`ContextSwitch` events; a filter keeps switches where either side matches."""
        flt = Filter(pid, comm)

        def decode(bp: Breakpoint) -> Event | None:
            regs = bp.registers()
            prev, nxt = self.task_info(regs["rdi"]), self.task_info(regs["rsi"])
            if not flt.match(prev, nxt):
                return None
            return ContextSwitch(vcpu=bp.vcpu, prev=prev, next=nxt, cr3=regs["cr3"])

        return self.d.add_breakpoint(SWITCH, handler, decode=decode, with_registers=True)

    def execs(self, handler: Handler | None = None, *, pid: int | None = None,
              comm: str | None = None) -> BreakpointHandle:
        """:class:`ProcessExec` events; ``comm`` matches the old name or the new one (basename)."""
        flt = Filter(pid, comm)
        off = self._bprm_filename

        def decode(bp: Breakpoint) -> Event | None:
            regs = bp.registers()
            task = self.current(bp)
            try:
                fname = self.k.read_cstr(self.k.read_u64(regs["rdi"] + off), 4096).decode("utf-8", "surrogateescape")
            except MemoryAccessError:
                fname = "?"
            argv = self._exec_argv(bp, regs["rdi"])
            names = [fname.rsplit("/", 1)[-1][:15]] + ([argv[0].rsplit("/", 1)[-1][:15]] if argv else [])
            if not flt.match(task, *(TaskInfo(task.pid, task.tid, n, task.task_gva) for n in names)):
                return None
            return ProcessExec(vcpu=bp.vcpu, pid=task.pid, tid=task.tid, filename=fname, argv=argv,
                               old_comm=task.comm)

        return self.d.add_breakpoint(EXEC, handler, decode=decode, with_registers=True)

    def exits(self, handler: Handler | None = None, *, pid: int | None = None, comm: str | None = None,
              threads: bool = False) -> BreakpointHandle:
        """:class:`ProcessExit` events (thread-group leaders only unless ``threads``)."""
        flt = Filter(pid, comm)

        def decode(bp: Breakpoint) -> Event | None:
            regs = bp.registers()
            task = self.current(bp)
            if (not threads and task.pid != task.tid) or not flt.match(task):
                return None
            return ProcessExit(vcpu=bp.vcpu, pid=task.pid, tid=task.tid, comm=task.comm,
                               exit_code=regs["rdi"] & 0xFFFFFFFF)

        return self.d.add_breakpoint(EXIT, handler, decode=decode, with_registers=True)


    def panics(self, handler: Handler | None = None) -> BreakpointHandle:
        """A :class:`VmLifecycle` PANIC event when the kernel calls ``panic(fmt, ...)``, before it halts or
        reboots: QEMU reports GUEST_PANICKED only with a pvpanic driver loaded, which a guest may lack."""

        def decode(bp: Breakpoint) -> Event | None:
            try:
                msg = self.k.read_cstr(bp.registers()["rdi"], 512).decode("utf-8", "surrogateescape")
            except MemoryAccessError:
                msg = "?"
            return VmLifecycle(vcpu=bp.vcpu, what=Lifecycle.PANIC, data={"message": msg, "source": "panic()"})

        return self.d.add_breakpoint(PANIC, handler, decode=decode, with_registers=True)


def format_syscall(ev: Syscall, nargs: int = 6) -> str:
    """strace-like one-liner: ``123 cat openat(0xffffff9c, "/proc/version", 0x0, ...)``."""
    parts = []
    for i, a in enumerate(ev.args[:nargs]):
        parts.append(f'"{ev.strings[i]}"' if i in ev.strings else hex(a))
    return f"{ev.pid} {ev.comm} {ev.name or f'syscall_{ev.nr}'}({', '.join(parts)})"


__all__ = ["EXEC", "EXIT", "PANIC", "PATH_ARGS", "SWITCH", "SYSCALL_ENTRY", "Filter", "LinuxEvents", "format_syscall"]
