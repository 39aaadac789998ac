"""The target object: a running QEMU VM attached through QMP, its gdbstub and its RAM.

``attach(target)`` accepts a ``vmsight vm launch`` directory or a QMP socket path. It finds the QEMU
process, parses the RAM layout and picks the fastest physical-memory backend it can use, saying which
(``VM.backend``). The VM keeps running unless the caller pauses it (``with vm.paused(): ...``);
translation caches are dropped whenever it resumes."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsight import runtime
from vmsight.dump import DumpMachine, is_regular_file, open_dump
from vmsight.errors import GdbStubError, PermissionDenied, TargetError, VmsightError
from vmsight.memory.gdbphys import GdbPhysRam
from vmsight.memory.layout import RamLayout
from vmsight.memory.paging import Translation, la57_from_cr4, translate
from vmsight.memory.physical import BlockRam, MappedRam, PhysicalMemory, ProcMemRam
from vmsight.memory.virtual import AddressSpace, AddressSpaces
from vmsight.qemu.launch import stopped_message
from vmsight.qemu.layout import parse_mtree
from vmsight.qemu.monitors import (
    MonitorClaim,
    RunControl,
    connect_monitor,
    run_control_owner,
    take_run_control,
)
from vmsight.qemu.qmp import Qmp
from vmsight.qemu.rsp import GdbStub
from vmsight.target import CONTROL_REGISTERS

if TYPE_CHECKING:
    from vmsight.libvirt import Domain

log = logging.getLogger(__name__)

# Registers vmsight exposes by default (gdbstub names); x87/SSE state is available via registers(all=True).
CORE_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
                  "r13", "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base",
                  "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")


@dataclass(frozen=True)
class Vcpu:
    index: int          # QEMU cpu-index
    thread_id: int      # host thread id of the vCPU
    gdb_thread: str     # gdbstub thread id, e.g. "p1.2"


class VM:
    """An attached VM. Create with :func:`attach`."""

    def __init__(self, qmp: Qmp, *, gdb_address: str | None, ram_file: str | None, directory: str | None,
                 backend: str = "auto", writable: bool = True) -> None:
        self.qmp = qmp
        self.directory = directory
        self._gdb_address = gdb_address
        self._gdb: GdbStub | None = None
        self._lock = threading.RLock()
        self._pause_depth = 0
        self._resume_on_exit = False
        self._spaces = AddressSpaces()
        # Run by close() before QMP closes (vmsight.events.watchdog.supervise settles the run state here).
        self.close_hooks: list[Callable[[], None]] = []
        self.monitor_claim: MonitorClaim | None = None    # the QMP monitor this VM object holds (attach)
        self._run_control: RunControl | None = None
        self._live_warned = False
        cpus = qmp.execute("query-cpus-fast")
        if not cpus:
            raise TargetError("QMP reports no vCPUs")
        # None when QEMU runs on another machine (QMP over TCP): no /proc, no RAM file; the gdbstub remains.
        self.pid: int | None = None if qmp.remote else _tgid(int(cpus[0]["thread-id"]))
        self._cpus = cpus
        self.layout: RamLayout = self._guest_ram(parse_mtree(qmp.hmp("info mtree -f")))
        if not len(self.layout):
            raise TargetError("no RAM found in `info mtree -f`")
        self.phys: PhysicalMemory = self._pick_backend(backend, ram_file, writable)
        self.backend = self.phys.name
        log.info("attached to QEMU pid %s: %d MiB RAM in %d ranges, backend %s", self.pid,
                 self.layout.total_bytes >> 20, len(self.layout), self.backend)

    # --- backends ------------------------------------------------------------------------------------

    def _pick_backend(self, backend: str, ram_file: str | None, writable: bool) -> PhysicalMemory:
        why: list[str] = []
        if self.pid is None and backend == "auto":
            if self._gdb_address is None or not self._gdb_address.startswith("tcp:"):
                raise TargetError("QEMU is remote: its RAM can only be read through its gdbstub; start it with "
                                  "-gdb tcp::PORT and pass --gdb tcp:HOST:PORT")
            return GdbPhysRam(self.stopped_stub, self.layout)
        if backend in ("auto", "mapped-ram-file"):
            try:
                return self._mapped_ram(ram_file, writable)
            except VmsightError as e:
                why.append(str(e))
        if backend in ("auto", "proc-pid-mem"):
            try:
                if self.pid is None:
                    raise TargetError("QEMU is remote: no /proc/<pid>/mem")
                hvas = {r.gpa: self._gpa2hva(r.gpa) for r in self.layout}
                return ProcMemRam(self.pid, self.layout, hvas, writable=writable)
            except VmsightError as e:
                why.append(str(e))
        if backend in ("auto", "gdbstub-physical"):
            return GdbPhysRam(self.stopped_stub, self.layout)
        raise TargetError(f"physical-memory backend {backend!r} is not available: {'; '.join(why)}")

    def _guest_ram(self, layout: RamLayout) -> RamLayout:
        """``layout`` without device RAM: only the machine's memory backends (``-m``, ``-object
        memory-backend-*``, NUMA nodes, DIMMs; QMP ``query-memdev``) are guest RAM. Device RAM such as the
        default VGA's ``vga.vram`` (a PCI BAR) is left out, so that it cannot make the RAM file look
        incomplete and a scan of guest RAM does not include a frame buffer. Unknown (no memdev matches a
        block, an old QEMU): the layout is kept as it is."""
        try:
            memdevs = {d.get("id") for d in self.qmp.execute("query-memdev") if isinstance(d, dict)}
        except VmsightError:
            return layout
        keep = [r for r in layout if r.block in memdevs]
        if not keep or len(keep) == len(layout):
            return layout
        for r in layout:
            if r.block not in memdevs:
                log.info("ignoring device RAM %s at %#x-%#x: not a memory backend", r.block, r.gpa, r.end - 1)
        return RamLayout(keep)

    def _mapped_ram(self, ram_file: str | None, writable: bool) -> PhysicalMemory:
        """Each RAM block's shared file or memfd, mapped (one block: a MappedRam; several: a BlockRam)."""
        blocks = sorted({r.block for r in self.layout})
        if self.pid is None:
            raise TargetError("QEMU is remote: its RAM files are on another host")
        pid = self.pid
        if ram_file and len(blocks) == 1:  # given by vm.json or the caller
            return MappedRam(ram_file, self.layout, writable=writable,
                             verify=lambda st: _mapped_shared_by(pid, st, ram_file))
        parts: dict[str, MappedRam] = {}
        try:
            for block in blocks:
                sub = RamLayout([r for r in self.layout if r.block == block])
                path = self._shared_block_file(block)
                parts[block] = MappedRam(path, sub, writable=writable,
                                         verify=functools.partial(_mapped_shared_by, pid, path=path))
        except BaseException:
            for part in parts.values():
                part.close()
            raise
        return parts[blocks[0]] if len(blocks) == 1 else BlockRam(parts, self.layout)

    def _shared_block_file(self, block: str) -> str:
        """Path of the shared file or memfd behind RAM block ``block`` (its memory backend's QOM object)."""
        hint = "(use -object memory-backend-file,...,share=on -machine memory-backend=ID)"
        obj = f"/objects/{block}"
        try:
            kind = str(self.qmp.execute("qom-get", path=obj, property="type"))
        except VmsightError:
            raise TargetError(f"RAM block {block} is not a memory backend object {hint}") from None
        if kind not in ("memory-backend-file", "memory-backend-memfd"):
            raise TargetError(f"RAM block {block} is {kind}, not a file or memfd {hint}")
        if not self.qmp.execute("qom-get", path=obj, property="share"):
            raise TargetError(f"RAM block {block} is not shared (share=off) {hint}")
        if kind == "memory-backend-memfd":
            path = self._memfd_path(int(self.qmp.execute("qom-get", path=obj, property="size")))
            if path is None:
                raise TargetError(f"the memfd of RAM block {block} is not visible in /proc/{self.pid}/fd")
            return path
        path = str(self.qmp.execute("qom-get", path=obj, property="mem-path"))
        if not os.path.isfile(path):
            raise TargetError(f"RAM file {path} of block {block} is not a file on this host")
        return path

    def _memfd_path(self, size: int) -> str | None:
        """A shared memfd backend is reachable as /proc/<qemu>/fd/N (QEMU names it after the backend type)."""
        hits = []
        if self.pid is None:
            return None
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                p = f"/proc/{self.pid}/fd/{fd}"
                try:
                    if os.readlink(p).startswith("/memfd:memory-backend-memfd") and os.stat(p).st_size == size:
                        hits.append(p)
                except OSError:
                    continue
        except PermissionError:
            return None
        return hits[0] if len(hits) == 1 else None  # ambiguous with several memfd backends of one size

    def _gpa2hva(self, gpa: int) -> int:
        out = self.qmp.hmp(f"gpa2hva {gpa:#x}")
        m = re.search(r"is (0x[0-9a-f]+)", out)
        if not m:
            raise TargetError(f"gpa2hva {gpa:#x} failed: {out.strip()}")
        return int(m.group(1), 16)

    # --- run control ---------------------------------------------------------------------------------

    def status(self) -> str:
        return self.qmp.status()

    def _stop_vm(self) -> None:
        """Stop a running VM (the one primitive pause and paused use; a libvirt domain suspends instead)."""
        self.qmp.execute("stop")
        self._drain_gdb_stop()

    def _cont_vm(self) -> None:
        self.qmp.execute("cont")

    def pause(self) -> None:
        with self._lock:
            if self.status() == "running":
                self._stop_vm()

    def resume(self) -> None:
        with self._lock:
            self.invalidate()
            if self.status() != "running":
                self._cont_vm()

    @contextmanager
    def paused(self) -> Iterator[VM]:
        """Keep the VM stopped inside the block; resume afterwards only if it was running before.

        Where another vmsight command controls the run state (:meth:`run_control_owner`), the VM is not
        touched: the block reads it live (bounded walks stay safe; a list changing under a walk can fail as
        CorruptData) and a warning says so once."""
        with self._lock:
            if self._pause_depth == 0 and (owner := self.run_control_owner()):
                if not self._live_warned:
                    self._live_warned = True
                    log.warning("not pausing the VM: %s controls its run state; reading it live", owner)
                yield self
                return
            if self._pause_depth == 0:
                self._resume_on_exit = self.status() == "running"
                if self._resume_on_exit:
                    self._stop_vm()
            self._pause_depth += 1
            try:
                yield self
            finally:
                self._pause_depth -= 1
                if self._pause_depth == 0 and self._resume_on_exit:
                    self.invalidate()
                    self._cont_vm()

    def _drain_gdb_stop(self) -> None:
        # A QMP stop pushes a T02 stop reply to a connected gdb client; consume it so replies stay in step.
        if self._gdb is not None:
            try:
                self._gdb.wait_stop(0.05)
            except TimeoutError:
                pass

    @property
    def gdb(self) -> GdbStub:
        """The gdbstub connection (made on first use; a stub is added through HMP when QEMU had no -gdb)."""
        with self._lock:
            if self._gdb is None and (owner := self.run_control_owner()):
                raise TargetError(f"the VM's gdbstub serves one client, and {owner} controls the VM through it: "
                                  "wait for that command to end")
            if self._gdb is None:
                with self.paused():  # connecting to a running VM would stop it behind our back
                    self._gdb = self._connect_gdb()
            return self._gdb

    def _connect_gdb(self) -> GdbStub:
        addr = self._gdb_address
        if self.pid is None and (addr is None or not addr.startswith("tcp:")):
            raise GdbStubError("QEMU is remote: start it with -gdb tcp::PORT and pass --gdb tcp:HOST:PORT")
        if addr is None or (not addr.startswith("tcp:") and not os.path.exists(addr)):
            assert self.pid is not None
            # A runtime stub lives only in a fresh private directory (vmsight.runtime): a predictable path
            # let another user plant the socket we talk to, or the directory QEMU's real stub went into.
            try:
                found = runtime.find_runtime_stub(self.pid)  # QEMU allows one: an earlier attach's, if any
                if found is not None:
                    self._gdb_address = found
                    return GdbStub(found)
                addr = runtime.new_runtime_stub_path(self.pid)
            except (runtime.UnsafePath, OSError) as e:
                raise GdbStubError(f"cannot add a gdbstub at runtime: {e}") from None
            out = self.qmp.hmp(f"gdbserver unix:{addr},server=on,wait=off")
            if not runtime.listens_on(self.pid, addr):
                runtime.forget_runtime_stub(self.pid, addr)
                raise GdbStubError(f"cannot add a gdbstub at runtime ({out.strip()}); QEMU already has one "
                                   "(-gdb or an earlier `gdbserver`): pass its socket (attach(..., gdb=PATH))")
            runtime.record_runtime_stub(self.pid, addr)
            self._gdb_address = addr
        return GdbStub(addr)

    @contextmanager
    def stopped_stub(self) -> Iterator[GdbStub]:
        with self.paused():
            yield self.gdb

    def _detach_gdb(self) -> None:
        """Hang up the gdbstub connection, the VM's run state left as it was (caller holds the lock)."""
        if self._gdb is None:
            return
        if self.status() == "running":  # a packet to a running VM would stop it: stop first
            self.qmp.execute("stop")
            self._drain_gdb_stop()
            try:
                self._gdb.detach()  # D;1 resumes
            except VmsightError:
                self._gdb.close()
        else:
            self._gdb.close()  # D would start a paused or -S (prelaunch) VM; hanging up leaves it be
        self._gdb = None

    def close(self) -> None:
        """Detach from the gdbstub (VM left as it was) and close QMP. Idempotent."""
        with self._lock:
            self._detach_gdb()
            for hook in self.close_hooks:
                hook()
            self.close_hooks.clear()
            close = getattr(self.phys, "close", None)
            if close:
                close()
            self.qmp.close()
            if self._run_control is not None:
                self._run_control.release()
                self._run_control = None
            if self.monitor_claim is not None:
                self.monitor_claim.release()

    # --- sharing the VM with other vmsight commands (vmsight.qemu.monitors) ----------------------------

    def run_control_owner(self) -> str | None:
        """The other vmsight command that stops and resumes this VM on its own schedule, or None."""
        if self._run_control is not None or self.directory is None:
            return None
        return run_control_owner(self.directory)

    def take_run_control(self, purpose: str) -> None:
        """Claim the VM's run state for ``purpose`` (trace, watch, idle tracking) until close(); raises,
        naming the holder, when another command has it. VMs not launched by vmsight have no lock: one
        command at a time is then the user's to keep."""
        if self._run_control is None and self.directory is not None:
            self._run_control = take_run_control(self.directory, purpose)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- vCPUs and registers -------------------------------------------------------------------------

    def vcpus(self) -> list[Vcpu]:
        return [Vcpu(int(c["cpu-index"]), int(c["thread-id"]), f"p1.{int(c['cpu-index']) + 1:x}")
                for c in self._cpus]

    def _vcpu(self, index: int) -> Vcpu:
        for v in self.vcpus():
            if v.index == index:
                return v
        raise VmsightError(f"no vCPU {index}: this VM has vCPUs {[v.index for v in self.vcpus()]}")

    def registers(self, vcpu: int = 0, *, all: bool = False) -> dict[str, int]:  # noqa: A002
        """Registers of one vCPU (gdbstub ``g``; the VM is paused for the read). While another command
        controls the VM (and holds its gdbstub), the core registers come from HMP ``info registers``."""
        v = self._vcpu(vcpu)
        if self._gdb is None and self.run_control_owner():
            if all:
                raise TargetError("all registers (x87/SSE) come from the gdbstub, which another vmsight command "
                                  "holds: wait for it to end")
            hmp = self.hmp_registers(vcpu)
            return {k: hmp[k] for k in CORE_REGISTERS if k in hmp}
        with self.stopped_stub() as stub:
            stub.select_thread(v.gdb_thread)
            regs = stub.read_all_registers()
        return regs if all else {k: regs[k] for k in CORE_REGISTERS if k in regs}

    def set_register(self, vcpu: int, name: str, value: int) -> None:
        """Write one register (explicit request only: vmsight never writes registers on its own)."""
        v = self._vcpu(vcpu)
        with self.stopped_stub() as stub:
            stub.select_thread(v.gdb_thread)
            stub.write_register(name, value)
        self.invalidate()

    def hmp_registers(self, vcpu: int = 0) -> dict[str, int]:
        """Registers the gdbstub does not expose (GDTR, IDTR, LDTR, TR, DR0-7) and the rest, from HMP."""
        self._vcpu(vcpu)
        return parse_info_registers(self.qmp.hmp("info registers -a"), vcpu)

    def control_registers(self) -> dict[int, dict[str, int]]:
        """Every vCPU's control and segment registers (:class:`vmsight.target.Machine`), from one HMP
        ``info registers -a``: a few ms, no gdbstub, so it works while another command holds the stub."""
        text = self.qmp.hmp("info registers -a")
        out: dict[int, dict[str, int]] = {}
        for cpu in self.vcpus():
            try:
                regs = parse_info_registers(text, cpu.index)
            except VmsightError:
                continue
            out[cpu.index] = {k: regs[k] for k in CONTROL_REGISTERS if k in regs}
        return out

    @property
    def can_flush_tlb(self) -> bool:
        """Whether :meth:`flush_tlb` can work here (it needs the gdbstub): idle tracking without it counts
        accessed pages as lower bounds."""
        return True

    def flush_tlb(self, vcpu: int | None = None) -> None:
        """Flush the TLB of one vCPU (default: all) by writing CR3 back unchanged through the gdbstub.

        Needed after changing guest page tables from the host (e.g. clearing accessed bits): a translation
        still cached in a vCPU's TLB is used without setting the bit again (FIELD-NOTES, TCG; KVM reloads
        its MMU on a CR3 write as well). QMP stop/cont and ``info tlb`` do not flush."""
        with self.stopped_stub() as stub:
            for v in self.vcpus() if vcpu is None else [self._vcpu(vcpu)]:
                stub.select_thread(v.gdb_thread)
                stub.write_register("cr3", stub.read_register("cr3"))

    # --- memory --------------------------------------------------------------------------------------

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.phys.read_gpa(gpa, size)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory (explicit request only)."""
        self.phys.write_gpa(gpa, data)

    def address_space(self, dtb: int, *, la57: bool | None = None) -> AddressSpace:
        """The address space rooted at ``dtb`` (a CR3 value; PCID/no-flush bits are masked)."""
        return self._spaces.get(self.phys, dtb, self.la57 if la57 is None else la57)

    @property
    def la57(self) -> bool:
        if not hasattr(self, "_la57"):
            # HMP, not the gdbstub: connecting the stub would stop the VM just to learn the paging mode
            self._la57 = la57_from_cr4(self.hmp_registers(0)["cr4"])
        return self._la57

    def current_dtb(self, vcpu: int = 0) -> int:
        return self.registers(vcpu)["cr3"]

    def translate(self, gva: int, dtb: int | None = None) -> Translation:
        return translate(self.phys, self.current_dtb() if dtb is None else dtb, gva, la57=self.la57)

    def read_gva(self, gva: int, size: int, dtb: int | None = None) -> bytes:
        return self.address_space(self.current_dtb() if dtb is None else dtb).read(gva, size)

    def write_gva(self, gva: int, data: bytes, dtb: int | None = None) -> None:
        """Write guest-virtual memory (explicit request only)."""
        self.address_space(self.current_dtb() if dtb is None else dtb).write(gva, data)

    def invalidate(self) -> None:
        """Drop translation caches (done automatically on resume)."""
        self._spaces.invalidate()


_REG = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)")
_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=\s*([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", re.M)
_TBL = re.compile(r"^(GDT|IDT)\s*=\s*([0-9a-f]+) ([0-9a-f]+)", re.M)


def parse_info_registers(text: str, vcpu: int) -> dict[str, int]:
    """Parse one CPU's block of HMP ``info registers -a`` into lower-case names (gdbstub naming where
    both exist: eflags, cs, fs_base, ...)."""
    blocks = re.split(r"^CPU#(\d+)\s*$", text, flags=re.M)
    body = None
    for i in range(1, len(blocks) - 1, 2):
        if int(blocks[i]) == vcpu:
            body = blocks[i + 1]
    if body is None:
        body = text if vcpu == 0 and "CPU#" not in text else None
    if body is None:
        raise VmsightError(f"HMP `info registers -a` has no CPU#{vcpu}")
    out: dict[str, int] = {}
    for line in body.splitlines():
        if _SEG.match(line) or _TBL.match(line) or line.startswith(("XMM", "FPR")):
            continue  # vector/x87 state: use registers(all=True) from the gdbstub
        for name, val in _REG.findall(line):
            out[{"RFL": "eflags"}.get(name, name.lower())] = int(val, 16)
    for m in _SEG.finditer(body):
        n = m.group(1).lower()
        if n in ("ldt", "tr"):
            out[n] = int(m.group(2), 16)
            out[f"{n}_base"] = int(m.group(3), 16)
        else:
            out[n] = int(m.group(2), 16)
            out[f"{n}_base_hmp"] = int(m.group(3), 16)
            if n in ("fs", "gs"):  # the gdbstub's names too, so HMP can stand in for it (beside a tracer)
                out[f"{n}_base"] = int(m.group(3), 16)
    for m in _TBL.finditer(body):
        out[f"{m.group(1).lower()}r_base"] = int(m.group(2), 16)
        out[f"{m.group(1).lower()}r_limit"] = int(m.group(3), 16)
    return out


def _mapped_shared_by(pid: int, st: os.stat_result, path: str) -> None:
    """Refuse a RAM file that QEMU (``pid``) does not itself map shared: vm.json and QMP name the file, and
    neither is trusted to make root map (and write) a file of its choosing (a forged VM directory, a fake
    QMP server)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) >= 5 and fields[3] == dev and fields[4] == str(st.st_ino) and fields[1][3:4] == "s":
                    return
    except OSError as e:
        raise TargetError(f"cannot check QEMU pid {pid}'s mappings ({e.strerror}): run as root or its user") from None
    raise TargetError(f"{path} is not guest RAM of QEMU pid {pid} (QEMU does not map it shared): refusing to map "
                      "it; relaunch the VM or pass --vm QMP_SOCKET")


def _tgid(tid: int) -> int:
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except OSError:
        pass
    raise TargetError(f"vCPU thread {tid} is not visible in /proc: QEMU runs on another host or in another "
                      "pid namespace; attach from QEMU's host")


class _NoMonitor:
    """Stands in for QMP on a libvirt domain: libvirt holds the only monitor, and a command sent through it
    behind libvirt's back marks the domain tainted. Any use names the way out."""

    remote = False

    def __init__(self, hint: str) -> None:
        self._hint = hint

    def __getattr__(self, attr: str) -> Any:
        raise TargetError(self._hint)


class LibvirtVM(VM):
    """A running libvirt domain (``attach("libvirt:NAME")``), read without its monitor so that it is never
    tainted (:mod:`vmsight.libvirt`): RAM through its shared memfd/file or /proc/PID/mem (``backend``), the
    RAM layout from its XML, pause/resume through libvirt. No vCPU state can be had this way:
    :meth:`control_registers` is empty (the kernel is found by scanning RAM) and what needs registers, the
    gdbstub or QMP raises TargetError naming the alternatives.

    With ``allow_taint`` QMP goes through libvirt's monitor passthrough (libvirt marks the domain tainted):
    registers, the gdbstub (added at runtime, removed again by :meth:`close`) and run control work as for
    :class:`VM`; RAM is still read as above."""

    def __init__(self, domain: Domain, *, allow_taint: bool = False) -> None:  # noqa: D107 - no VM.__init__
        from vmsight.libvirt import TAINT_HINT, MonitorPassthrough

        self.domain = domain
        self.allow_taint = allow_taint
        self._hint = f"libvirt domain {domain.xml.name}: this command {TAINT_HINT}"
        self.qmp = MonitorPassthrough(domain) if allow_taint else _NoMonitor(self._hint)  # type: ignore[assignment]
        self.directory = None
        self._gdb_address = None
        self._gdb = None
        self._lock = threading.RLock()
        self._pause_depth = 0
        self._resume_on_exit = False
        self._spaces = AddressSpaces()
        self.close_hooks = []
        self.monitor_claim = None
        self._run_control = None
        self._live_warned = False
        self.pid = domain.pid
        self.layout = domain.layout
        self.phys = domain.phys
        self.backend = self.phys.name
        self._added_stub: str | None = None
        if allow_taint:
            self._cpus = self.qmp.execute("query-cpus-fast")
            self._vcpu_list = super().vcpus()
        else:
            self._cpus = []
            self._la57 = False  # unknown without registers; a kernel found by scanning knows its own paging mode
            self._vcpu_list = [Vcpu(i, tid, f"p1.{i + 1:x}") for i, tid in _vcpu_threads(domain.pid, domain.xml.vcpus)]

    def status(self) -> str:
        state = self.domain.state()
        return self.qmp.status() if self.allow_taint and state == "paused" else state  # "debug" at a breakpoint

    def _stop_vm(self) -> None:
        # Through libvirt's own API: no monitor passthrough, so no taint. A QMP stop (libvirt's too) pushes a
        # stop reply to a connected gdb client.
        self.domain.suspend()
        self._drain_gdb_stop()

    def _cont_vm(self) -> None:
        self.domain.resume()

    @property
    def gdb(self) -> GdbStub:
        if not self.allow_taint:
            raise TargetError(self._hint)
        with self._lock:
            had = self._gdb is not None
            stub = VM.gdb.fget(self)  # type: ignore[attr-defined]
            if not had and self._gdb_address and self.pid and runtime.listens_on(self.pid, self._gdb_address):
                self._added_stub = self._gdb_address
            return stub

    def vcpus(self) -> list[Vcpu]:
        return list(self._vcpu_list)

    @property
    def can_flush_tlb(self) -> bool:
        return self.allow_taint  # CR3 write-back through a gdbstub, which only the monitor passthrough adds

    def registers(self, vcpu: int = 0, *, all: bool = False) -> dict[str, int]:  # noqa: A002
        if not self.allow_taint:
            raise TargetError(self._hint)
        return super().registers(vcpu, all=all)

    def hmp_registers(self, vcpu: int = 0) -> dict[str, int]:
        if not self.allow_taint:
            raise TargetError(self._hint)
        return super().hmp_registers(vcpu)

    def control_registers(self) -> dict[int, dict[str, int]]:
        if not self.allow_taint:
            return {}  # libvirt reads no registers without the monitor: discovery scans RAM instead
        return super().control_registers()

    def close(self) -> None:
        """Detach; a gdbstub added at runtime is removed again (``gdbserver none``), so none remains."""
        with self._lock:
            self._detach_gdb()
            if self._added_stub is not None:
                try:
                    self.qmp.hmp("gdbserver none")
                    if self.pid is not None and not runtime.listens_on(self.pid, self._added_stub):
                        runtime.forget_runtime_stub(self.pid, self._added_stub)  # its private directory
                except VmsightError as e:
                    log.warning("could not remove the gdbstub vmsight added to %s: %s", self.domain.xml.name, e)
                self._added_stub = None
            for hook in self.close_hooks:
                hook()
            self.close_hooks.clear()
            if self._run_control is not None:
                self._run_control.release()
                self._run_control = None
            self.domain.close()


def _vcpu_threads(pid: int, count: int) -> list[tuple[int, int]]:
    """(cpu-index, host thread id) of each vCPU: libvirt starts QEMU with debug-threads=on, which names them
    "CPU N/TCG" or "CPU N/KVM"; a thread id is 0 where that is not visible."""
    tids: dict[int, int] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            m = re.fullmatch(r"CPU (\d+)/\w+", comm)
            if m:
                tids[int(m.group(1))] = int(tid)
    except OSError:
        pass
    return [(i, tids.get(i, 0)) for i in range(max(count, len(tids)))]


_VM_JSON_MAX = 1 << 20


def attach(target: str, *, gdb: str | None = None, ram_file: str | None = None, backend: str = "auto",
           writable: bool = True, purpose: str = "a vmsight command", uri: str | None = None,
           allow_taint: bool = False) -> VM:
    """Attach to a VM: ``target`` is a ``vmsight vm launch`` directory or a QMP socket path. A directory's
    VM has spare QMP monitors: the first free one is used (``purpose`` names this command to others).
    ``libvirt:DOMAIN`` (name, UUID or id) attaches to a libvirt domain at ``uri`` (default as virsh's),
    read-only and without tainting it (:class:`LibvirtVM`; ``allow_taint`` adds run control through libvirt's
    monitor passthrough)."""
    if target.startswith("libvirt:"):
        from vmsight.libvirt import Domain

        ref = target.removeprefix("libvirt:")
        if not ref:
            raise TargetError("libvirt: needs a domain: --vm libvirt:NAME (or its UUID or id)")
        if gdb or ram_file or backend != "auto":
            raise TargetError("a libvirt domain is read through libvirt (no --gdb, RAM file or backend choice): "
                              "for a QMP socket of your own, pass --vm QMP_SOCKET")
        return LibvirtVM(Domain(ref, uri, writable=writable), allow_taint=allow_taint)
    if uri is not None:
        raise TargetError(f"a libvirt URI (-c/--connect) applies to --vm libvirt:DOMAIN, not to {target}")
    directory = None
    if target.startswith("tcp:"):  # QEMU on another machine: -qmp tcp:HOST:PORT,server=on,wait=off
        qmp = Qmp(target)
        try:
            return VM(qmp, gdb_address=gdb, ram_file=None, directory=None, backend=backend, writable=writable)
        except BaseException:
            qmp.close()
            raise
    p = Path(target)
    try:
        p.stat()
        if p.is_dir():
            os.listdir(p)
    except PermissionError:
        raise PermissionDenied(f"permission denied on {target}: run as root or as the user that started "
                               "the VM") from None
    except FileNotFoundError:
        pass
    if p.is_dir():
        info_path = p / "vm.json"
        if not info_path.is_file():
            raise TargetError(f"{target} is a directory without vm.json: pass a `vmsight vm launch` directory "
                              "or a QMP socket")
        try:
            with info_path.open("rb") as f:
                raw = f.read(_VM_JSON_MAX + 1)  # launch writes ~1 KiB: a huge file is not one
            if len(raw) > _VM_JSON_MAX:
                raise TargetError(f"{info_path} is over {_VM_JSON_MAX >> 10} KiB: not a vm.json from `vmsight vm "
                                  "launch`; relaunch the VM or pass --vm QMP_SOCKET")
            info: dict[str, Any] = json.loads(raw)
        except PermissionError:
            raise PermissionDenied(f"cannot read {info_path}: run as root or as the VM's user") from None
        except ValueError as e:  # empty, truncated, not JSON, not UTF-8
            raise TargetError(f"{info_path} is not valid JSON ({e}): not written by `vmsight vm launch`, "
                              "or damaged; relaunch the VM or pass --vm QMP_SOCKET") from None
        if not (isinstance(info, dict) and isinstance(info.get("qmp"), str)
                and all(isinstance(info.get(k), str | None) for k in ("gdb", "ram_file"))):
            raise TargetError(f"{info_path} lacks the fields `vmsight vm launch` writes (qmp, gdb, ram_file as "
                              "strings): relaunch the VM or pass --vm QMP_SOCKET")
        directory = str(p)
        stopped = stopped_message(p, info)  # one line, not a refused connection to a dead QEMU's socket
        if stopped:
            raise TargetError(stopped)
        qmp_path = info["qmp"]
        gdb = gdb or info.get("gdb")
        ram_file = ram_file or info.get("ram_file")
    elif p.exists() and stat.S_ISSOCK(p.stat().st_mode):
        qmp_path = str(p)
    elif not p.exists():
        raise TargetError(f"{target} does not exist: pass a `vmsight vm launch` directory or a QMP socket")
    elif is_regular_file(target):
        raise TargetError(f"{target} is a file, not a running VM: memory dumps are read by ps, maps, lsmod, uname "
                          "(vmsight.vm.open_target)")
    else:
        raise TargetError(f"{target} is neither a directory nor a socket")
    claim = None
    if directory is None:
        qmp = Qmp(qmp_path)
    else:
        aux = info.get("qmp_aux") or []
        if not (isinstance(aux, list) and len(aux) <= 8 and all(isinstance(a, str) for a in aux)):
            raise TargetError(f"{directory}/vm.json: qmp_aux is not a list of socket paths: relaunch the VM")
        qmp, claim = connect_monitor(directory, [qmp_path, *aux], purpose, Qmp)
    try:
        vm = VM(qmp, gdb_address=gdb, ram_file=ram_file, directory=directory, backend=backend,
                writable=writable)
    except BaseException:
        qmp.close()
        if claim is not None:
            claim.release()
        raise
    vm.monitor_claim = claim
    return vm


def open_target(target: str, *, cr3: int | None = None, **attach_kw: Any) -> VM | DumpMachine:
    """A :class:`vmsight.target.Machine` for ``target``: a regular file is a memory dump (an ELF core from
    ``dump-guest-memory``, else a raw ``pmemsave`` image; ``cr3`` for one without registers), anything else
    is attached as a live VM (:func:`attach`, which keeps its VM-only type for its callers)."""
    if is_regular_file(target):
        return open_dump(target, cr3=cr3)
    return attach(target, **attach_kw)


__all__ = ["VM", "LibvirtVM", "Vcpu", "attach", "open_target", "parse_info_registers", "PermissionDenied"]
