"""The event dispatcher: breakpoints, watchpoints, single-step and pause events over QEMU's gdbstub, VM
lifecycle events over QMP, with handlers that run while the VM is stopped.

Run loop (its own, over ``vm.gdb``; it never uses ``vm.paused()``): the VM runs under ``vCont;c`` while
:meth:`Dispatcher.listen` waits for a stop reply. A stop is decoded (which vCPU: the reply's thread; which
breakpoint: the vCPU's ``rip``, which QEMU makes the selected thread), handlers run, their reply is applied,
and the VM resumes. Outside the dispatcher's own calls the VM is always running, except inside handlers.
Where the VM is, as the loop sees it, is one :class:`RunState` with its legal transitions; what other
threads and signal handlers ask for waits in a small request record; what the VM can do is a frozen
:class:`Capabilities`. All RSP framing is :mod:`vmsight.qemu.rsp`'s (the peer is untrusted: bounded
packets, checksums checked, a malformed stop reply is an error, not a crash).

Facts this relies on (FIELD-NOTES, QEMU 7.2 TCG, re-measured): breakpoints are by virtual address on all
vCPUs; QEMU's single step overrides breakpoints, so stepping off a breakpoint needs no remove/reinsert;
a watchpoint traps after the access; every byte sent to a running stub stops it (so a late ``+`` ack
must never follow ``vCont;c``); a stop makes the stopped vCPU the stub's selected thread; QEMU removes a
client's breakpoints when it detaches (``D;1``).

Step-over: a breakpoint on an ``endbr64`` (every function entry of an IBT kernel) or a sealed ``nop4``
is passed by moving ``rip`` (one ``P`` packet) instead of single-stepping (a debug stop + TB flush); any
other instruction is single-stepped. Only under TCG (with KVM's real CET an ``endbr`` must execute).

Clean detach, always: :meth:`close` (also on handler exceptions, SIGINT/SIGTERM/SIGHUP, interpreter
exit) removes every breakpoint and watchpoint and leaves the VM in the run state it was found in (a VM
paused before, or a ``-S`` one in prelaunch, is never resumed: events come once someone resumes it); a
watchdog process (:mod:`vmsight.events.watchdog`) does the same if this process dies by SIGKILL."""

from __future__ import annotations

import atexit
import enum
import itertools
import logging
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from types import FrameType
from typing import TYPE_CHECKING, Any

from vmsight.errors import GdbStubError, TargetError, VmsightError
from vmsight.events.errors import CapabilityError, DispatcherClosed, WatchAliasError
from vmsight.events.types import (
    Access,
    Action,
    Breakpoint,
    Event,
    Lifecycle,
    PageAccess,
    Reply,
    SingleStep,
    VcpuPause,
    VmLifecycle,
)
from vmsight.memory.paging import is_kernel_half
from vmsight.memory.virtual import AddressSpace
from vmsight.qemu.rsp import GdbStub, RspProtocolError, StopReply, in_exchange

if TYPE_CHECKING:
    from vmsight.events.watchdog import WatchdogClient
    from vmsight.linux.kernel import Kernel
    from vmsight.vm import VM

log = logging.getLogger(__name__)

Handler = Callable[[Any], "Action | Reply | None"]
Decoder = Callable[[Breakpoint], "Event | None"]

_Z_SW, _Z_WRITE, _Z_READ, _Z_ACCESS = 0, 2, 3, 4
_Z_OF_ACCESS = {Access.WRITE: _Z_WRITE, Access.READ: _Z_READ, Access.ACCESS: _Z_ACCESS}
_ACCESS_OF_KIND = {"watch": Access.WRITE, "rwatch": Access.READ, "awatch": Access.ACCESS}
# Instructions that do nothing and are never re-patched at run time: endbr64, the nop4 that IBT sealing
# writes over unused endbr64s (arch/x86/kernel/alternative.c, "0f 1f 40 d6"), and single-byte nop.
_NOP_PREFIXES = ((b"\xf3\x0f\x1e\xfa", 4), (b"\x0f\x1f\x40\xd6", 4), (b"\x90", 1))
_SSTEP_QUIET, _SSTEP_WITH_IRQS = 0x7, 0x1   # Qqemu.sstep: ENABLE | NOIRQ | NOTIMER, or ENABLE only
_WAIT_SLICE = 0.1         # longest blocking read, so signals and stop() are seen promptly
_QMP_DRAIN_EVERY = 0.25   # QMP events (a STOP/RESUME pair per gdb stop) are drained this often
_QMP_LIFECYCLE = {"SHUTDOWN": Lifecycle.SHUTDOWN, "RESET": Lifecycle.RESET, "GUEST_PANICKED": Lifecycle.PANIC,
                  "POWERDOWN": Lifecycle.POWERDOWN}
_RUN_STATE_LIFECYCLE = {"guest-panicked": Lifecycle.PANIC, "shutdown": Lifecycle.SHUTDOWN,
                        "internal-error": Lifecycle.PANIC}


class RunState(enum.Enum):
    """Where the VM is, as the run loop sees it. Legal transitions are :data:`_TRANSITIONS`; one function,
    ``Dispatcher._enter``, makes each and checks it::

        RUNNING --^C--> INTERRUPTING --its stop reply, or a trap that beat it--> STOPPED
        RUNNING --a trap's stop reply (breakpoint, watch, step)--> STOPPED
        STOPPED --continue--> RUNNING
        STOPPED --the stop was someone else's (QMP stop, shutdown, panic)--> EXTERNAL
        EXTERNAL --QMP reports it running again--> RUNNING
        any open state --close(), or the VM gone--> CLOSING --> CLOSED

    A single step (passing a breakpoint) is one request/reply exchange inside STOPPED."""

    RUNNING = "running"            # runs under our continue: its stop reply is still to be read
    INTERRUPTING = "interrupting"  # ^C sent while RUNNING: the next stop reply is the one it asked for
    STOPPED = "stopped"            # its stop reply was read: ours to resume (handlers run now)
    EXTERNAL = "external"          # paused by someone else, or found so: never resumed by us
    CLOSING = "closing"            # close() is detaching (re-entry is a no-op)
    CLOSED = "closed"


_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset({RunState.INTERRUPTING, RunState.STOPPED, RunState.CLOSING}),
    RunState.INTERRUPTING: frozenset({RunState.STOPPED, RunState.CLOSING}),
    RunState.STOPPED: frozenset({RunState.RUNNING, RunState.EXTERNAL, RunState.CLOSING}),
    RunState.EXTERNAL: frozenset({RunState.RUNNING, RunState.CLOSING}),
    RunState.CLOSING: frozenset({RunState.CLOSED}),
    RunState.CLOSED: frozenset(),
}
_WAITING = (RunState.RUNNING, RunState.INTERRUPTING)   # a stop reply is due
_ENDED = (RunState.CLOSING, RunState.CLOSED)


@dataclass
class _Requests:
    """What other threads and signal handlers ask of the run loop, which acts on it at a safe point (never
    mid-packet). Repeated requests before that point coalesce."""

    pause: bool = False          # pause_vcpus(): one VcpuPause per vCPU at the next stop
    stop: bool = False           # stop(): a blocked listen() returns None
    signal: int | None = None    # SIGINT/SIGTERM/SIGHUP: detach, then KeyboardInterrupt / SystemExit


@dataclass(frozen=True)
class Capabilities:
    """What this VM's accelerator and gdbstub allow (``None`` = no practical limit). Watches are by
    guest-virtual address: a gpa watch covers its kernel aliases only, never user mappings of the page."""

    accelerator: str                        # "kvm" or "tcg" (QMP query-kvm)
    breakpoint_kind: str
    watchpoints: int | None                 # KVM: the four debug registers
    watch_lengths: tuple[int, ...] | None   # None: any length >= 1
    watch_aligned: bool                     # a watch must start at a multiple of its length
    read_watch: bool                        # read-only watches (KVM watches reads and writes together)
    nop_skip: bool                          # a breakpoint on endbr64/nop4 is passed by moving rip
    multiprocess: bool                      # the stub names vCPUs p<pid>.<tid> and takes vCont (qSupported)
    breakpoints: int | None = None
    single_step: bool = True
    watch_by: str = "gva"
    gpa_watch_aliases: tuple[str, ...] = ("direct_map", "kernel_image")
    user_aliases_covered: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON form (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def accelerator_capabilities(kvm: bool, *, multiprocess: bool = True) -> Capabilities:
    """The capabilities of QEMU's gdbstub under KVM (hardware debug registers, int3 in guest memory) or
    TCG (breakpoints and watches in the translator, guest memory untouched)."""
    if kvm:
        return Capabilities("kvm", "int3 written to guest memory", watchpoints=4, watch_lengths=(1, 2, 4, 8),
                            watch_aligned=True, read_watch=False, nop_skip=False, multiprocess=multiprocess)
    return Capabilities("tcg", "TCG, guest memory untouched", watchpoints=None, watch_lengths=None,
                        watch_aligned=False, read_watch=True, nop_skip=True, multiprocess=multiprocess)


@dataclass(eq=False)
class BreakpointHandle:
    """A registered breakpoint (returned by :meth:`Dispatcher.add_breakpoint`)."""

    id: int
    gva: int
    symbol: str | None
    handler: Handler | None
    decode: Decoder | None
    with_registers: bool
    skip_len: int = 0     # > 0: the instruction at gva is a pure nop of this length (step over by rip += n)
    hits: int = 0


@dataclass(eq=False)
class WatchHandle:
    """A registered watchpoint (returned by :meth:`Dispatcher.add_watchpoint`)."""

    id: int
    gva: int
    length: int
    access: Access
    handler: Handler | None
    cr3: int | None = None       # only report accesses made under this page-table root
    alias_of_gpa: int | None = None
    hits: int = 0
    filtered: int = 0


@dataclass
class Stats:
    events: int = 0
    breakpoint_hits: int = 0
    watch_hits: int = 0
    filtered: int = 0          # hits that a decoder or cr3 filter dropped (the vCPU still stopped)
    steps: int = 0             # single steps used to pass a breakpoint
    skips: int = 0             # breakpoints passed by moving rip over a nop
    spurious: int = 0          # T05 stops that matched nothing (a stale single-step flag)
    stops: int = 0
    handler_ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Live:
    """The live view of one stopped vCPU, handed to its event (valid until the VM resumes)."""

    def __init__(self, d: Dispatcher, vcpu: int, thread: str, regs: dict[str, int] | None = None) -> None:
        self.d = d
        self.vcpu = vcpu
        self.thread = thread
        self.valid = True
        self._regs = regs
        self.rip_changed = False

    def registers(self) -> dict[str, int]:
        if self._regs is None:
            self.d._select(self.thread)
            self._regs = self.d._stub.read_all_registers()
        return self._regs

    def set_register(self, name: str, value: int) -> None:
        self.d._select(self.thread)
        self.d._stub.write_register(name, value)
        if self._regs is not None:
            self._regs[name] = value
        if name in ("rip", "pc"):
            self.rip_changed = True

    def read(self, gva: int, size: int) -> bytes:
        return self.d._space(self.registers()["cr3"]).read(gva, size)

    def write(self, gva: int, data: bytes) -> None:
        self.d._select(self.thread)
        self.d._stub.write_memory(gva, data)
        self.d.vm.invalidate()   # the write may have changed page tables: no translation is trusted after it


class Dispatcher:
    """Introspection events of one VM. Use as a context manager (or call :meth:`close`).

    ``kernel`` (a :class:`vmsight.linux.kernel.Kernel`) resolves symbols; it is discovered on first need
    when omitted. ``supervise`` arms the VM's SIGKILL watchdog; ``handle_signals`` turns SIGINT/SIGTERM/
    SIGHUP into a clean detach followed by KeyboardInterrupt / SystemExit(128 + signal) (main thread only).
    A VM that is not running when the dispatcher starts stays so until someone else resumes it.

    Handlers receive the event and return ``None`` (continue), an :class:`Action` or a :class:`Reply`.
    They run while the VM is stopped; an exception in a handler closes the dispatcher (clean detach) and
    propagates out of :meth:`listen`. Not thread-safe, except :meth:`stop` and :meth:`pause_vcpus`."""

    def __init__(self, vm: VM, *, kernel: Kernel | None = None, supervise: bool = True,
                 handle_signals: bool = True) -> None:
        if any(other.vm is vm and not other._closed for other in _live_dispatchers()):
            raise VmsightError("this VM already has an open event dispatcher: the gdbstub serves one "
                               "run loop; close it first")
        self.vm: VM = vm
        self._kernel = kernel
        # other vmsight commands read the VM live meanwhile instead of pausing it under this run loop
        vm.take_run_control("an event dispatcher (vmsight trace/watch)")
        self._stub: GdbStub = vm.gdb
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._bps: dict[int, BreakpointHandle] = {}          # gva -> handle
        self._watches: dict[int, list[WatchHandle]] = {}     # gva -> handles (same start, several kinds)
        self._subscribers: dict[type[Event], list[Handler]] = {}
        self._stepping: set[str] = set()                    # threads in single-step mode
        self._pending: deque[Event] = deque()
        self._step_over: dict[str, BreakpointHandle] = {}   # thread -> breakpoint it sits on
        self._live: list[_Live] = []
        self._selected: str | None = None
        self._sstep = _SSTEP_QUIET
        self._close_reason = "closed"
        self._requests = _Requests()
        self._busy = 0     # dispatcher calls on the stack: a signal waits for the outermost to reach a safe point
        self._old_handlers: dict[int, Any] = {}
        self._io_lock = threading.RLock()
        self._last_qmp_drain = 0.0
        self.stats = Stats()
        self._vcpu_of_thread = {_norm_thread(v.gdb_thread): v.index for v in vm.vcpus()}
        self._threads = {v.index: v.gdb_thread for v in vm.vcpus()}
        self._caps = self._probe_capabilities()
        # Found paused (or prelaunch): not ours to resume, as if someone else had paused it.
        self._state = RunState.RUNNING if vm.status() == "running" else RunState.EXTERNAL
        self._watchdog: WatchdogClient | None = None
        if supervise:
            from vmsight.events.watchdog import supervise as arm

            self._watchdog = arm(vm)
            self._watchdog.gdb(self._stub.address)
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        _open_dispatchers.add(self)
        self._drain_qmp(force=True)

    # --- context manager ---------------------------------------------------------------------------

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- capabilities and symbols ------------------------------------------------------------------

    def _probe_capabilities(self) -> Capabilities:
        try:
            kvm = bool(self.vm.qmp.execute("query-kvm").get("enabled"))
        except VmsightError:
            kvm = False
        return accelerator_capabilities(kvm, multiprocess=self._stub.multiprocess)

    def capabilities(self) -> Capabilities:
        """What this VM's accelerator and gdbstub allow (see :class:`Capabilities`)."""
        return self._caps

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def _closed(self) -> str | None:
        """Why the dispatcher is closed (or closing); None while open."""
        return self._close_reason if self._state in _ENDED else None

    def _enter(self, new: RunState) -> None:
        """The one place the run state changes; an illegal transition is a bug in this module."""
        with self._io_lock:
            old = self._state
            if new not in _TRANSITIONS[old]:
                raise AssertionError(f"dispatcher run state {old.name} -> {new.name} is not a legal transition")
            self._state = new

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            from vmsight.linux.kernel import kernel_of

            # The target's one Kernel (shared with ps, LinuxEvents...), found with the VM stopped by us: the
            # QMP pause kernel_of would make is skipped, as the VM is not running then.
            with self._stopped():
                self._kernel = kernel_of(self.vm)
        return self._kernel

    def resolve(self, where: int | str) -> tuple[int, str | None]:
        """(gva, symbol) for a gva, ``"symbol"`` or ``"symbol+0x10"``."""
        if isinstance(where, int):
            return where, None
        text = where.strip()
        try:
            return int(text, 0), None
        except ValueError:
            pass
        name, plus, off = text.partition("+")
        return self.kernel.symbol(name) + (int(off, 0) if plus else 0), text

    # --- registration ------------------------------------------------------------------------------

    def on(self, event_type: type[Event], handler: Handler) -> None:
        """Call ``handler`` for every event of ``event_type`` (or a subclass), after per-breakpoint ones."""
        self._subscribers.setdefault(event_type, []).append(handler)

    def add_breakpoint(self, where: int | str, handler: Handler | None = None, *, decode: Decoder | None = None,
                       with_registers: bool = False) -> BreakpointHandle:
        """Break at a gva or kernel symbol. ``decode`` turns the raw :class:`Breakpoint` into the event to
        report (or None to drop the hit silently: filters); ``with_registers`` fetches all registers at
        each hit (one round trip) instead of on first use."""
        self._check_open()
        gva, symbol = self.resolve(where)
        if gva in self._bps:
            raise VmsightError(f"a breakpoint at {gva:#x} is already registered")
        bp = BreakpointHandle(next(self._ids), gva, symbol, handler, decode, with_registers)
        with self._stopped():
            if self._caps.nop_skip and is_kernel_half(gva, la57=self._la57()):
                bp.skip_len = self._nop_length(gva)
            self._stub.insert_breakpoint(_Z_SW, gva, 1)
            self._bps[gva] = bp
            if self._watchdog:
                self._watchdog.record(True, _Z_SW, gva, 1)
        log.debug("breakpoint #%d at %#x (%s), skip %d", bp.id, gva, symbol, bp.skip_len)
        return bp

    def _nop_length(self, gva: int) -> int:
        try:
            code = self._stub.read_memory(gva, 4)
        except GdbStubError:
            return 0
        for prefix, n in _NOP_PREFIXES:
            if code.startswith(prefix):
                return n
        return 0

    def add_watchpoint(self, gva: int, length: int, access: Access | str = Access.WRITE,
                       handler: Handler | None = None, *, cr3: int | None = None) -> WatchHandle:
        """Watch ``length`` bytes at ``gva`` for reads, writes or both (``"r"``, ``"w"``, ``"rw"``). Watches are
        by virtual address in every address space: ``cr3`` keeps only accesses made under that root (for
        user addresses; the other hits still stop the VM briefly). Raises CapabilityError past KVM's
        limits instead of failing silently."""
        self._check_open()
        acc = Access.parse(access)
        self._check_watch_caps(gva, length, acc)
        w = WatchHandle(next(self._ids), gva, length, acc, handler, cr3)
        with self._stopped():
            self._stub.insert_breakpoint(_Z_OF_ACCESS[acc], gva, length)
            self._watches.setdefault(gva, []).append(w)
            if self._watchdog:
                self._watchdog.record(True, _Z_OF_ACCESS[acc], gva, length)
        return w

    def _check_watch_caps(self, gva: int, length: int, acc: Access) -> None:
        if length < 1:
            raise VmsightError(f"watch length must be >= 1, not {length}")
        caps = self._caps
        if caps.watchpoints is not None:
            n = sum(len(v) for v in self._watches.values())
            if n >= caps.watchpoints:
                raise CapabilityError(f"add watchpoint #{n + 1}", "the number of watchpoints", caps.watchpoints)
        if caps.watch_lengths is not None and (length not in caps.watch_lengths
                                               or (caps.watch_aligned and gva % length)):
            raise CapabilityError(f"watch {length} bytes at {gva:#x}", "watch length/alignment",
                                  list(caps.watch_lengths))
        if acc is Access.READ and not caps.read_watch:
            raise CapabilityError("watch reads only", "read-only watching", "read+write (use rw)")

    def watch_gpa(self, gpa: int, length: int, access: Access | str = Access.WRITE,
                  handler: Handler | None = None) -> list[WatchHandle]:
        """Watch guest-physical memory through its kernel aliases: the direct map
        (``page_offset_base + gpa``) and, if the range lies in the kernel image, the image mapping.
        Limits: user-space mappings of the same page are not covered (a watch is by virtual address and
        a page can be mapped anywhere), nor vmalloc/module aliases."""
        k = self.kernel
        aliases: list[int] = []
        end = self.vm.layout.end_gpa if hasattr(self.vm.layout, "end_gpa") else None
        if end is None or gpa + length <= end:
            aliases.append(k.page_offset_base + gpa)
        off = gpa - k.text_gpa
        if 0 <= off and off + length <= k.image_size:
            aliases.append(k.text_gva + off)
        if not aliases:
            raise WatchAliasError(gpa, length, "outside guest RAM and the kernel image")
        out = []
        for gva in aliases:
            w = self.add_watchpoint(gva, length, access, handler)
            w.alias_of_gpa = gpa
            out.append(w)
        return out

    def remove(self, handle: BreakpointHandle | WatchHandle) -> None:
        """Remove a breakpoint or watchpoint (may be called from a handler)."""
        if self._closed:
            return
        with self._stopped():
            if isinstance(handle, BreakpointHandle):
                if self._bps.get(handle.gva) is handle:
                    self._stub.remove_breakpoint(_Z_SW, handle.gva, 1)
                    del self._bps[handle.gva]
                    if self._watchdog:
                        self._watchdog.record(False, _Z_SW, handle.gva, 1)
            else:
                lst = self._watches.get(handle.gva, [])
                if handle in lst:
                    kind = _Z_OF_ACCESS[handle.access]
                    self._stub.remove_breakpoint(kind, handle.gva, handle.length)
                    lst.remove(handle)
                    if not lst:
                        del self._watches[handle.gva]
                    if self._watchdog:
                        self._watchdog.record(False, kind, handle.gva, handle.length)

    def single_step(self, vcpu: int, enable: bool = True) -> None:
        """Single-step mode for one vCPU: every instruction it executes raises a :class:`SingleStep`
        event (~0.4 ms each under TCG; interrupts and timers are held off while stepping: qqemu.sstep)."""
        self._check_open()
        t = self._threads[vcpu]
        with self._stopped():  # the next resume applies the new mode
            if enable:
                self._stepping.add(t)
            else:
                self._stepping.discard(t)

    def pause_vcpus(self) -> None:
        """Ask for a :class:`VcpuPause` event per vCPU (all-stop: the whole VM pauses). Thread-safe."""
        self._requests.pause = True
        self._interrupt_if_running()

    def stop(self) -> None:
        """Make a blocked :meth:`listen` return None and iteration end (thread-safe; the VM keeps running)."""
        self._requests.stop = True

    # --- listening ---------------------------------------------------------------------------------

    def listen(self, timeout: float | None = None) -> Event | None:
        """Wait for the next event, run its handlers (VM stopped), resume the VM and return the event.
        None after ``timeout`` seconds or after :meth:`stop`. Raises DispatcherClosed once closed."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._busy += 1
        try:
            while True:
                if self._requests.signal is not None:
                    self._exit_on_signal()
                if self._pending:
                    return self._pending.popleft()
                if self._state in _ENDED:
                    raise DispatcherClosed(self._close_reason)
                if self._requests.stop:
                    self._requests.stop = False
                    return None
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if now - self._last_qmp_drain > _QMP_DRAIN_EVERY:
                    self._drain_qmp()
                    if self._pending:
                        continue
                if self._state is RunState.EXTERNAL:
                    self._poll_external_resume()
                    time.sleep(0.02)
                    continue
                if self._state is RunState.STOPPED:
                    with self._io_lock:
                        self._resume()
                    continue
                slice_s = _WAIT_SLICE if deadline is None else max(0.0, min(_WAIT_SLICE, deadline - now))
                try:
                    reply = self._stub.wait_stop(slice_s)
                except TimeoutError:
                    continue
                except RspProtocolError:
                    raise      # out of step: closed below (the watchdog undoes what a detach cannot)
                except GdbStubError as e:
                    self._vm_gone(str(e))
                    continue
                with self._io_lock:
                    self._on_stop_reply(reply)
                    if self._state is RunState.STOPPED:
                        self._resume()
        except BaseException:
            self.close()
            raise
        finally:
            self._busy -= 1

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self, timeout: float | None = None, count: int | None = None,
               duration: float | None = None) -> Iterator[Event]:
        """Events until ``count`` were seen, ``timeout`` seconds passed with none, ``duration`` seconds passed
        in all, :meth:`stop`, or close."""
        deadline = None if duration is None else time.monotonic() + duration
        n = 0
        while count is None or n < count:
            if self._closed and not self._pending:
                return
            wait = timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = left if wait is None else min(wait, left)
            ev = self.listen(wait)
            if ev is None:
                return
            n += 1
            yield ev

    # --- stop handling -----------------------------------------------------------------------------

    def _on_stop_reply(self, reply: StopReply) -> None:
        """The stop reply the run state waited for (RUNNING or INTERRUPTING): the VM is stopped now."""
        interrupted = self._state is RunState.INTERRUPTING
        self._enter(RunState.STOPPED)
        self._handle_stop(reply, interrupted)

    def _handle_stop(self, reply: StopReply, interrupted: bool) -> None:
        self.stats.stops += 1
        # QEMU selects the stopping vCPU (gdb_set_stop_cpu); a reply without a thread leaves which unknown.
        self._selected = _norm_thread(reply.thread) if reply.thread else None
        if reply.exited:
            self._vm_gone(f"QEMU reported exit ({reply.raw})")
            return
        thread = _norm_thread(reply.thread) if reply.thread else self._threads[0]
        vcpu = self._vcpu_of_thread.get(thread, 0)
        if reply.signal == 5:
            # A trap that beat our ^C is the stop it asked for: QEMU drops a ^C that reaches a stopped VM.
            if reply.kind in _ACCESS_OF_KIND:
                self._on_watch(reply, thread, vcpu)
            elif thread in self._stepping:
                self._emit_raw(SingleStep(vcpu=vcpu, rip=0), thread, rip_field="rip")
            else:
                self._on_breakpoint(thread, vcpu)
        elif reply.signal == 2 and interrupted:
            pass
        elif reply.signal == 2:
            status = self._status()
            log.info("VM stopped by someone else (QMP status %s)", status)
            self._enter(RunState.EXTERNAL)
            if self._watchdog and status == "paused":
                self._watchdog.want("paused")  # theirs: a dying tracer leaves it paused
            self._queue(VmLifecycle(vcpu=-1, what=Lifecycle.STOP, data={"status": status}))
        else:
            status = self._status()
            what = _RUN_STATE_LIFECYCLE.get(status, Lifecycle.STOP)
            self._enter(RunState.EXTERNAL)
            self._queue(VmLifecycle(vcpu=-1, what=what, data={"status": status, "signal": reply.signal}))
        if self._requests.pause and self._state not in _ENDED:
            self._requests.pause = False
            for index, t in sorted(self._threads.items()):
                self._emit(VcpuPause(vcpu=index), _Live(self, index, _norm_thread(t)), [])

    def _on_breakpoint(self, thread: str, vcpu: int) -> None:
        # Always read rip: when two vCPUs hit at once QEMU reports one and keeps the other's debug request
        # pending, so the next resume can stop at once, reporting a vCPU that already moved on.
        regs: dict[str, int] | None = None
        if any(b.with_registers for b in self._bps.values()):
            regs = self._stub.read_all_registers()
            rip = regs["rip"]
        else:
            rip = self._stub.read_register("rip")
        bp = self._bps.get(rip)
        if bp is None:
            self.stats.spurious += 1
            log.debug("stop on %s matches no breakpoint (stale single-step)", thread)
            return
        bp.hits += 1
        self.stats.breakpoint_hits += 1
        self._step_over[thread] = bp
        live = _Live(self, vcpu, thread, regs)
        ev: Event = Breakpoint(vcpu=vcpu, gva=bp.gva, symbol=bp.symbol)
        if bp.decode is not None:
            ev._live = live
            decoded = bp.decode(ev)  # type: ignore[arg-type]
            if decoded is None:
                self.stats.filtered += 1
                live.valid = False
                return
            ev = decoded
        reply = self._emit(ev, live, [bp.handler] if bp.handler else [])
        if reply.action is Action.RETRY or live.rip_changed:
            self._step_over.pop(thread, None)

    def _on_watch(self, reply: StopReply, thread: str, vcpu: int) -> None:
        assert reply.address is not None and reply.kind is not None
        acc = _ACCESS_OF_KIND[reply.kind]
        cands = self._watches.get(reply.address, [])
        w = next((c for c in cands if c.access is acc), cands[0] if cands else None)
        if w is None:
            self.stats.spurious += 1
            return
        live = _Live(self, vcpu, thread)
        if w.cr3 is not None and (live.registers()["cr3"] & ~0xFFF) != (w.cr3 & ~0xFFF):
            w.filtered += 1
            self.stats.filtered += 1
            live.valid = False
            return
        w.hits += 1
        self.stats.watch_hits += 1
        rip = live.registers()["rip"]
        self._emit(PageAccess(vcpu=vcpu, gva=w.gva, length=w.length, access=acc, rip=rip, watch_id=w.id), live,
                   [w.handler] if w.handler else [])

    def _emit_raw(self, ev: Event, thread: str, rip_field: str) -> None:
        live = _Live(self, ev.vcpu, thread)
        setattr(ev, rip_field, live.registers()["rip"])
        self._emit(ev, live, [])

    def _emit(self, ev: Event, live: _Live, handlers: list[Handler]) -> Reply:
        ev.seq = next(self._seq)
        ev.time_ns = time.time_ns()
        ev._live = live
        self._live.append(live)
        for t, hs in self._subscribers.items():
            if isinstance(ev, t):
                handlers = handlers + hs
        reply = Reply()
        t0 = time.perf_counter_ns()
        for h in handlers:
            r = h(ev)
            if r is None:
                continue
            if isinstance(r, Action):
                r = Reply(r)
            if not isinstance(r, Reply):
                raise VmsightError(f"handler {h!r} returned {r!r}: return None, an Action or a Reply")
            if r.action is Action.RETRY:
                reply.action = Action.RETRY
            for gva, data in r.memory.items():
                live.write(gva, data)
            for name, value in r.registers.items():
                live.set_register(name, value)
        self.stats.handler_ns += time.perf_counter_ns() - t0
        self.stats.events += 1
        self._pending.append(ev)
        return reply

    def _queue(self, ev: Event) -> None:
        ev.seq = next(self._seq)
        ev.time_ns = time.time_ns()
        for t, hs in self._subscribers.items():
            if isinstance(ev, t):
                for h in hs:
                    h(ev)
        self.stats.events += 1
        self._pending.append(ev)

    # --- run control -------------------------------------------------------------------------------

    def _select(self, thread: str) -> None:
        if self._selected != thread:
            self._stub.select_thread(thread)
            self._selected = thread

    def _space(self, cr3: int) -> AddressSpace:
        return self.vm.address_space(cr3, la57=self._la57())

    def _la57(self) -> bool:
        if self._kernel is not None:
            return self._kernel.la57
        return self.vm.la57

    def _drop_live_views(self) -> None:
        """The guest runs (or ran) again: every event's live view expires, and every translation cache of
        the VM is dropped with them (``vm.address_space()`` spaces and the kernel's, not only this loop's)."""
        for live in self._live:
            live.valid = False
        self._live.clear()
        self.vm.invalidate()
        if self._kernel is not None:
            self._kernel.invalidate()

    def _resume(self) -> None:
        """Pass the breakpoints vCPUs sit on, then continue (STOPPED -> RUNNING)."""
        self._drop_live_views()
        while self._step_over:
            thread, bp = self._step_over.popitem()
            if self._bps.get(bp.gva) is not bp:
                continue  # removed by its handler: nothing to pass
            if bp.skip_len:
                self._select(thread)
                self._stub.write_register("rip", bp.gva + bp.skip_len)
                self.stats.skips += 1
                continue
            self._step_off(thread, bp)
        if self._stepping:
            # Single-step mode lets interrupts and timers run (sstep 0x1): a halted vCPU must wake up.
            self._set_sstep(_SSTEP_WITH_IRQS)
            actions = ";".join(f"s:{t}" for t in sorted(self._stepping))
            self._stub.send(f"vCont;{actions};c")
        else:
            self._stub.cont()
        self._enter(RunState.RUNNING)

    def _step_off(self, thread: str, bp: BreakpointHandle) -> None:
        """Single-step ``thread`` off ``bp``; re-step while it has not moved (a pending debug request of
        another vCPU can end a step before it ran)."""
        # Stepping off a breakpoint holds interrupts and timers off (sstep 0x7, QEMU's default): otherwise
        # the "step" could enter an interrupt handler and the breakpoint would be hit again on return.
        self._set_sstep(_SSTEP_QUIET)
        for _ in range(8):
            self.stats.steps += 1
            reply = self._stub.step(thread)
            self._selected = _norm_thread(reply.thread) if reply.thread else None
            if reply.signal == 5 and reply.kind in _ACCESS_OF_KIND:
                self._on_watch(reply, self._selected or thread,
                               self._vcpu_of_thread.get(self._selected or thread, 0))
                self._drop_live_views()
            elif reply.signal != 5:
                log.warning("single step of %s ended with %s", thread, reply.raw)
            self._select(thread)
            if self._stub.read_register("rip") != bp.gva:
                return
        log.warning("vCPU %s does not step off the breakpoint at %#x", thread, bp.gva)

    def _set_sstep(self, flags: int) -> None:
        if self._sstep != flags:
            reply = self._stub.request(f"Qqemu.sstep={flags:x}")
            if reply != "OK":
                log.warning("this gdbstub refuses Qqemu.sstep=%x: %r", flags, reply)
            self._sstep = flags

    def _interrupt_if_running(self) -> None:
        with self._io_lock:
            if self._state is RunState.RUNNING:
                self._interrupt()

    def _interrupt(self) -> None:
        """RUNNING -> INTERRUPTING: ^C, whose stop reply the run loop reads itself."""
        self._enter(RunState.INTERRUPTING)
        self._stub.send_break()

    class _StoppedCtx:
        def __init__(self, d: Dispatcher) -> None:
            self.d = d
            self.resume = False

        def __enter__(self) -> None:
            d = self.d
            d._busy += 1
            d._io_lock.acquire()
            try:
                if d._state in _WAITING:
                    d._stop_now()
                    self.resume = True
            except BaseException:
                d._io_lock.release()
                d._busy -= 1
                raise

        def __exit__(self, *exc: object) -> None:
            d = self.d
            try:
                if self.resume and d._state is RunState.STOPPED:
                    d._resume()
            finally:
                d._io_lock.release()
                d._busy -= 1
            if d._requests.signal is not None and d._busy == 0 and d._state not in _ENDED:
                d._exit_on_signal()

    def _stopped(self) -> Dispatcher._StoppedCtx:
        """Stop the VM for a registration change (events that beat the interrupt are handled and queued)."""
        return Dispatcher._StoppedCtx(self)

    def _stop_now(self, timeout: float = 3.0) -> None:
        if self._state is RunState.RUNNING:
            self._interrupt()     # INTERRUPTING already: another thread's ^C is on its way
        try:
            reply = self._stub.wait_stop(timeout)
        except TimeoutError:
            raise TargetError(f"the VM did not stop within {timeout:.0f} s of a gdbstub interrupt") from None
        self._on_stop_reply(reply)

    def _status(self) -> str:
        try:
            return self.vm.qmp.status()
        except VmsightError as e:
            return f"unknown ({e})"

    def _poll_external_resume(self) -> None:
        status = self._status()
        if status == "running":
            self._enter(RunState.RUNNING)
            if self._watchdog:
                self._watchdog.want("running")
            self._queue(VmLifecycle(vcpu=-1, what=Lifecycle.RESUME, data={"status": status}))
        elif status.startswith("unknown"):
            self._vm_gone(status)

    def _drain_qmp(self, force: bool = False) -> None:
        self._last_qmp_drain = time.monotonic()
        for _ in range(100000):
            try:
                msg = self.vm.qmp.pull_event(0.0)
            except Exception:  # noqa: BLE001 - a dead QMP connection ends the drain; gdb notices too
                return
            if msg is None:
                return
            what = _QMP_LIFECYCLE.get(str(msg.get("event")))
            if what is Lifecycle.RESET and not force and self._bps:
                log.warning("guest reset: breakpoints stay at their gvas, which the rebooted kernel may not "
                            "use (KASLR): register them again once it is up")
            if what is not None and not force:
                self._queue(VmLifecycle(vcpu=-1, what=what, data=dict(msg.get("data") or {})))

    def _vm_gone(self, why: str) -> None:
        log.info("VM gone: %s", why)
        if not any(isinstance(e, VmLifecycle) and e.what is Lifecycle.SHUTDOWN for e in self._pending):
            self._drain_qmp()
        if not any(isinstance(e, VmLifecycle) and e.what is Lifecycle.SHUTDOWN for e in self._pending):
            self._queue(VmLifecycle(vcpu=-1, what=Lifecycle.SHUTDOWN, data={"reason": why}))
        if self._watchdog:     # nothing left to remove: the watchdog need not try
            for p in list(self._watchdog.points):
                self._watchdog.record(False, *p)
        self._bps.clear()
        self._watches.clear()
        self._finish("closed: the VM is gone", detach=False)

    # --- signals and closing -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requests.signal = signum
        if self._busy:
            return  # the run loop acts on it at a safe point (never mid-packet)
        if in_exchange(frame):  # e.g. kernel discovery reading registers: try again in a moment
            t = threading.Timer(0.005, signal.pthread_kill, (threading.main_thread().ident, signum))
            t.daemon = True
            t.start()
            return
        self._exit_on_signal()

    def _exit_on_signal(self) -> None:
        signum = self._requests.signal
        self.close()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + (signum or 0))

    def _check_open(self) -> None:
        if self._state in _ENDED:
            raise DispatcherClosed(self._close_reason)

    def close(self) -> None:
        """Remove every breakpoint and watchpoint and leave the VM running. Idempotent; never raises
        for a VM that is already gone."""
        self._finish("closed", detach=True)

    def _finish(self, reason: str, *, detach: bool) -> None:
        # Under the lock throughout: another thread's pause_vcpus() must not ^C the VM once it is let go.
        with self._io_lock:
            if self._state in _ENDED:
                return
            was = self._state
            self._close_reason = reason
            self._enter(RunState.CLOSING)
            try:
                if detach:
                    self._clean_stub(was)
            finally:
                self._release()
                self._enter(RunState.CLOSED)

    def _release(self) -> None:
        self._drop_live_views()
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        # The watchdog keeps what could not be removed; it is released when the VM closes.
        self._watchdog = None
        _open_dispatchers.discard(self)

    def _clean_stub(self, was: RunState) -> None:
        """Remove every point and leave the VM as found. ``was``: the run state when closing began."""
        stub = self._stub
        try:
            if was in _WAITING:
                if was is RunState.RUNNING:
                    stub.send_break()
                self._drain_until_stopped()
            for gva in list(self._bps):
                try:
                    stub.remove_breakpoint(_Z_SW, gva, 1)
                    del self._bps[gva]
                    if self._watchdog:
                        self._watchdog.record(False, _Z_SW, gva, 1)
                except GdbStubError as e:
                    log.warning("cannot remove breakpoint at %#x: %s", gva, e)
            for gva, lst in list(self._watches.items()):
                for w in list(lst):
                    try:
                        stub.remove_breakpoint(_Z_OF_ACCESS[w.access], w.gva, w.length)
                        lst.remove(w)
                        if self._watchdog:
                            self._watchdog.record(False, _Z_OF_ACCESS[w.access], w.gva, w.length)
                    except GdbStubError as e:
                        log.warning("cannot remove watchpoint at %#x: %s", gva, e)
                if not lst:
                    del self._watches[gva]
            self._step_over.clear()
            self._stepping.clear()
            if self._sstep != _SSTEP_QUIET:
                self._set_sstep(_SSTEP_QUIET)  # QEMU's default: the setting outlives this client
            if was is not RunState.EXTERNAL:
                stub.cont()  # vm.close() detaches later (it stops first: a packet to a running stub)
        except (GdbStubError, OSError, TimeoutError) as e:
            log.warning("clean detach failed (%s); the watchdog detaches instead", e)

    def _drain_until_stopped(self) -> None:
        """After an interrupt: read until its stop reply (wait_stop skips the replies of an interrupted
        exchange)."""
        self._selected = None
        try:
            self._stub.wait_stop(1.0)
        except TimeoutError:
            pass  # already stopped: QEMU ignores ^C then


def _norm_thread(t: str) -> str:
    """'p01.02' -> 'p1.2' (what Vcpu.gdb_thread and vCont use)."""
    if t.startswith("p") and "." in t:
        pid, _, tid = t[1:].partition(".")
        try:
            return f"p{int(pid, 16):x}.{int(tid, 16):x}"
        except ValueError:
            return t
    return t


_open_dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _live_dispatchers() -> list[Dispatcher]:
    return list(_open_dispatchers)


@atexit.register
def _close_all() -> None:
    for d in list(_open_dispatchers):
        try:
            d.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


__all__ = ["BreakpointHandle", "Capabilities", "Dispatcher", "Handler", "RunState", "Stats", "WatchHandle",
           "accelerator_capabilities"]
