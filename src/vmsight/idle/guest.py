"""Idle pages of a process *inside a VM*, from the guest's own page-table Accessed bits, harvested from the
host: no guest kernel support (page_idle, DAMON) and no guest agent needed.

``mark_idle`` clears the A bit (bit 5) of every present leaf entry (PTE, or PMD for a 2 MiB page) in the
ranges, with the VM paused, then flushes every vCPU's TLB (a translation still cached would be used without
the bit being set again). ``read`` walks the same ranges: A set = accessed since the mark; A clear = idle.

What it can see, honestly:
* page granularity for 4 KiB pages; a 2 MiB page has one A bit, so its 512 pages share a state (HUGE);
* swapped-out pages (swap type/offset decoded from the entry): untouched since they were swapped out, since
  touching one faults it back in, so they read as idle;
* "exclusive vs shared" needs the guest's struct page map counts: not determined (``known`` says so);
  FILE comes from the VMA (a file mapping; COW-ed private pages of it count as file).
* Clearing A bits takes them away from the guest's own reclaim (it sees the pages as unreferenced);
  ``restore_accessed`` (default) sets them back after each read, which biases the guest towards
  "referenced", never the other way. The page tables are written: attach with a writable RAM backend.
* If this process dies (SIGKILL included), the VM's watchdog (:mod:`vmsight.events.watchdog`) gives the
  bits back: each mark journals the entries it is about to clear (gpa and value) to it first. Without a
  gdbstub (a libvirt domain without --allow-taint) it does so through the RAM file, with the domain
  suspended through libvirt, and leaves the run state as it was found.
* A target that cannot flush TLBs (``vm.can_flush_tlb`` false: a libvirt domain without --allow-taint has
  no gdbstub) is still tracked, but its counts are lower bounds: a page touched through a translation
  cached before the mark is not seen (as clear_refs without its flush). The tracker and its snapshots are
  then ``approximate``, say so in a warning, and mark idle pages APPROXIMATE."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from vmsight import linux
from vmsight.errors import ProcessNotFound
from vmsight.events.watchdog import WatchdogClient, ram_description, restore_accessed, supervise
from vmsight.idle.abi import PAGE_SHIFT
from vmsight.idle.backend import BackendResult, VfnRange, fill, make_snapshot, now_ns, segments_for
from vmsight.idle.errors import KernelThread, PidReused, ProcessGone
from vmsight.idle.procfs import Vma
from vmsight.idle.protocol import Ranges
from vmsight.idle.result import STATE_DTYPE, IdleSegment, IdleSnapshot, PageState
from vmsight.idle.tracker import resolve_ranges
from vmsight.memory.paging import PAGE_ACCESSED, LeafMapping, clear_accessed, walk_range
from vmsight.vm import VM

log = logging.getLogger(__name__)

BACKEND = "guest-pte"
KNOWN = (PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.HUGE | PageState.TRACKED
         | PageState.NEW)
LOWER_BOUND = ("guest accessed counts are lower bounds: the target cannot flush the vCPUs' TLBs (no gdbstub: "
               "a libvirt domain without --allow-taint), so a page touched through a translation still cached "
               "in a vCPU's TLB does not set its accessed bit again and reads idle; idle pages are APPROXIMATE")
REASON = ("guest page-table accessed bits, harvested from the host (no guest kernel support needed; "
          "A bits are given back after each read)")


def guest_vmas(proc: linux.Process) -> list[Vma]:
    """The process's VMAs in the idle layer's form (what /proc/PID/maps would show)."""
    return [Vma(v.start, v.end, v.perms, v.offset, "00:00", 0, v.path) for v in proc.maps()]


class GuestIdleTracker:
    """Per-process idle tracking for a process in a VM (a :class:`vmsight.idle.protocol.Tracker`, as
    :class:`vmsight.idle.IdleTracker` is). Raises ProcessNotFound, KernelThread, ProcessGone/PidReused."""

    name = BACKEND
    backend_name = BACKEND
    granularity = "page"
    approximate = False
    reason = REASON

    def __init__(self, vm: VM, pid: int, *, restore_accessed: bool = True,
                 guest: linux.Guest | None = None, supervise_vm: bool = True) -> None:
        """``supervise_vm``: arm the VM's watchdog, so that a SIGKILL of this process still gives the
        accessed bits back and resumes the VM (a separate process; off only for tests of the unguarded
        case)."""
        self.vm = vm
        # it pauses the VM and flushes TLBs through the gdbstub: other commands read live meanwhile
        vm.take_run_control("guest idle tracking (vmsight idle --vm)")
        self.pid = pid
        self.restore_accessed = restore_accessed
        self.flushes_tlb = bool(getattr(vm, "can_flush_tlb", True))  # a target that does not say has a gdbstub
        self.warnings: tuple[str, ...] = ()
        if not self.flushes_tlb:
            self.approximate = True
            self.reason = f"{REASON}; counts are lower bounds (no TLB flush)"
            self.warnings = (LOWER_BOUND,)
            log.warning("%s", LOWER_BOUND)
        self._watchdog: WatchdogClient | None = None
        if supervise_vm and restore_accessed:
            self._watchdog = supervise(vm)
            ram = ram_description(vm)
            if ram is None:
                log.warning("guest RAM is read through %s: a SIGKILL would leave this process's accessed "
                            "bits cleared (give QEMU a shared RAM file)", vm.backend)
            else:
                self._watchdog.ram(ram)
            if self.flushes_tlb:
                self._watchdog.gdb(vm.gdb.address)  # the stub it will clean up through (connects it now)
        self.guest = guest or linux.Guest(vm)
        with vm.paused():
            self.guest.kernel.invalidate()
            proc = self.guest.process(pid)
            if proc.task.is_kthread or not proc.task.mm:
                raise KernelThread(pid, proc.task.comm)
            self.comm = proc.task.comm
            self.start_boottime_ns = proc.task.start_boottime_ns
        self._marked: list[VfnRange] | None = None
        self._mark_time_ns: int | None = None
        self._cleared: dict[int, int] = {}   # pte_gpa -> entry value we cleared A in
        log.info("guest idle tracker for pid %d (%s) in QEMU pid %d", pid, self.comm, vm.pid)

    # --- identity --------------------------------------------------------------------------------------
    def _process(self, phase: str) -> linux.Process:
        """The tracked process, re-checked (the VM must be paused): it may have exited, or its pid reused."""
        self.guest.kernel.invalidate()
        try:
            proc = self.guest.process(self.pid)
        except ProcessNotFound:
            raise ProcessGone(self.pid, phase) from None
        start_ns = proc.task.start_boottime_ns
        if start_ns != self.start_boottime_ns:
            raise PidReused(self.pid, self.start_boottime_ns, start_ns)
        if not proc.task.mm:
            raise ProcessGone(self.pid, phase)  # exiting: the mm is already gone
        return proc

    def vmas(self) -> list[Vma]:
        with self.vm.paused():
            return guest_vmas(self._process("maps"))

    def _resolve(self, ranges: Ranges, vmas: list[Vma]) -> list[VfnRange]:
        # Same range language as the host tracker (VMA names, gva pairs, Vma objects, None = all mapped).
        out, _truncated = resolve_ranges(ranges, vmas)
        return out

    def _leaves(self, dtb: int, ranges: Sequence[VfnRange], include_nonpresent: bool) -> list[LeafMapping]:
        out: list[LeafMapping] = []
        for lo, hi in ranges:
            out.extend(walk_range(self.vm.phys, dtb, lo << PAGE_SHIFT, hi << PAGE_SHIFT, la57=self.vm.la57,
                                  include_nonpresent=include_nonpresent))
        return out

    # --- the two operations ----------------------------------------------------------------------------
    def mark_idle(self, ranges: Ranges = None) -> None:
        """Start an interval: clear the accessed bits of ``ranges`` (default: every mapped VMA)."""
        with self.vm.paused():
            proc = self._process("mark")
            vfn_ranges = self._resolve(ranges, guest_vmas(proc))
            leaves = [lf for lf in self._leaves(proc.dtb, vfn_ranges, False) if lf.pte_value & PAGE_ACCESSED]
            gpas = [lf.pte_gpa for lf in leaves]
            # Known before the first bit goes (a signal or SIGKILL mid-clear must still give them back);
            # one not cleared in the end keeps its A bit, which restore_accessed leaves alone.
            self._cleared = {lf.pte_gpa: lf.pte_value for lf in leaves}
            if self._watchdog is not None:
                self._watchdog.accessed(self._cleared)
            done = clear_accessed(self.vm.phys, gpas, [lf.pte_value for lf in leaves])
            self._cleared = {g: lf.pte_value for g, lf, ok in zip(gpas, leaves, done, strict=True) if ok}
            if self.flushes_tlb:
                self.vm.flush_tlb()
            self._marked = vfn_ranges
            self._mark_time_ns = now_ns()
        log.debug("pid %d: cleared %d accessed bits", self.pid, len(self._cleared))

    def read(self, ranges: Ranges = None) -> IdleSnapshot:
        """End an interval: which pages stayed idle since :meth:`mark_idle`."""
        res, vmas, vfn_ranges = self._read(ranges)
        return make_snapshot(res, pid=self.pid, comm=self.comm, start_boottime_ns=self.start_boottime_ns,
                             backend=BACKEND, granularity=self.granularity, approximate=self.approximate,
                             vmas=vmas, vfn_ranges=vfn_ranges)

    def _read(self, ranges: Ranges) -> tuple[BackendResult, list[Vma], list[VfnRange]]:
        """The backend half of :meth:`read`: the page tables' A bits of the ranges, the VMAs, the ranges."""
        warnings = list(self.warnings)
        with self.vm.paused():
            proc = self._process("read")
            vmas = guest_vmas(proc)
            vfn_ranges = self._marked if ranges is None and self._marked is not None else self._resolve(ranges, vmas)
            if self._marked is None:
                warnings.append("read without mark_idle: accessed bits date from whenever the guest last cleared them")
            leaves = self._leaves(proc.dtb, vfn_ranges, True)
            if self.restore_accessed:
                self._restore()
        segments = segments_for(vfn_ranges)
        file_vfns = [(v.start_gva >> PAGE_SHIFT, v.end_gva >> PAGE_SHIFT) for v in vmas if v.kind == "file"]
        for lo, hi in vfn_ranges:
            self._fill_range(segments, lo, hi, leaves, file_vfns)
        known = KNOWN | PageState.APPROXIMATE if self.approximate else KNOWN
        return BackendResult(segments, known, self._mark_time_ns, warnings=tuple(warnings)), vmas, vfn_ranges

    def read_and_mark(self, ranges: Ranges = None) -> IdleSnapshot:
        """``read()`` then ``mark_idle(ranges)``: end this interval and start the next."""
        snap = self.read()
        self.mark_idle(ranges)
        return snap

    def _restore(self) -> None:
        """Give the guest back the A bits we took, where the entry still maps the same frame (VM paused,
        the process checked alive: its page-table pages are not freed)."""
        restore_accessed(self.vm.phys, self._cleared)
        self._cleared = {}
        if self._watchdog is not None:
            self._watchdog.accessed(None)

    def _fill_range(self, segments: list[IdleSegment], lo: int, hi: int, leaves: list[LeafMapping],
                    file_vfns: list[VfnRange]) -> None:
        n = hi - lo
        state = np.zeros(n, STATE_DTYPE)
        idle = np.zeros(n, bool)
        swap_type = np.zeros(n, np.uint8)
        swap_offset = np.zeros(n, np.uint64)
        pfn = np.zeros(n, np.uint64)
        for lf in leaves:
            a = max(lf.gva >> PAGE_SHIFT, lo) - lo
            b = min((lf.gva + lf.page_size) >> PAGE_SHIFT, hi) - lo
            if a >= b:
                continue
            if lf.present:
                st = PageState.PRESENT | PageState.TRACKED
                if lf.page_size > 4096:
                    st |= PageState.HUGE
                if self.approximate and not lf.accessed:
                    st |= PageState.APPROXIMATE  # read idle, but may have been used through a cached translation
                state[a:b] = st
                idle[a:b] = not lf.accessed
                first = (lf.gpa >> PAGE_SHIFT) + ((lo + a) - (lf.gva >> PAGE_SHIFT))
                pfn[a:b] = np.arange(first, first + (b - a), dtype=np.uint64)
            elif lf.swapped:
                # Not touched since it was swapped out: an access would have faulted it back in.
                state[a:b] = PageState.SWAPPED | PageState.TRACKED
                idle[a:b] = True
                swap_type[a:b] = lf.swap_type
                swap_offset[a:b] = lf.swap_offset
        for flo, fhi in file_vfns:
            a, b = max(flo, lo) - lo, min(fhi, hi) - lo
            if a < b:
                state[a:b] |= np.where(state[a:b] != 0, np.uint16(PageState.FILE), np.uint16(0)).astype(STATE_DTYPE)
        fill(segments, lo, hi, state, idle, pfn=pfn)
        for s in segments:
            if s.start_vfn <= lo and hi <= s.end_vfn:
                s.swap_type[lo - s.start_vfn:hi - s.start_vfn] = swap_type
                s.swap_offset[lo - s.start_vfn:hi - s.start_vfn] = swap_offset

    def close(self) -> None:
        """Give back the accessed bits of a mark that was never read."""
        if self._cleared and self.restore_accessed:
            try:
                with self.vm.paused():
                    self._process("close")
                    self._restore()
            except (ProcessGone, PidReused):
                pass  # its page tables are freed: nothing of ours to give back
        self._cleared = {}
        if self._watchdog is not None:
            self._watchdog.accessed(None)

    def __enter__(self) -> GuestIdleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
