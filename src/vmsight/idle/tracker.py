"""``IdleTracker``: per-process idle page tracking by virtual address, over one of three backends.

    with IdleTracker(pid) as t:          # backend="auto": page_idle > damon > clear_refs
        t.mark_idle()                    # all mapped ranges (or "[heap]", "/usr/lib/libc.so.6", (start, end))
        time.sleep(1)
        snap = t.read()                  # IdleSnapshot: bitmap by vfn + per-page state + VMAs + per-VMA usage
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vmsight.idle.abi import PAGE_SHIFT, PAGE_SIZE
from vmsight.idle.backend import Backend, BackendResult, Unavailable, VfnRange, make_snapshot
from vmsight.idle.clear_refs import ClearRefsBackend
from vmsight.idle.damon import DamonBackend
from vmsight.idle.errors import AccessDenied, BackendUnavailable, BadRange
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.lock import TrackerLock
from vmsight.idle.page_idle import PageIdleBackend
from vmsight.idle.procfs import Process, Vma
from vmsight.idle.protocol import Ranges, RangeSpec
from vmsight.idle.result import IdleSnapshot, VmaUsage

log = logging.getLogger(__name__)

# most precise first: page-exact, region-sampled, per-VMA counts
BACKENDS: dict[str, type[Backend]] = {
    "page_idle": PageIdleBackend,
    "damon": DamonBackend,
    "clear_refs": ClearRefsBackend,
}

MAX_DEFAULT_PAGES = 1 << 24   # 64 GiB of VA scanned by default; beyond that the result is flagged partial


def probe_backends(pid: int, proc: KernelFiles | None = None,
                   sysfs: KernelFiles | None = None) -> dict[str, Unavailable | None]:
    """Each backend's availability (None = usable), without writing anything."""
    proc = proc or KernelFiles("/proc")
    sysfs = sysfs or KernelFiles("/sys")
    return {name: cls.probe(proc, sysfs, pid) for name, cls in BACKENDS.items()}


def choose_backend(pid: int, backend: str = "auto", proc: KernelFiles | None = None,
                   sysfs: KernelFiles | None = None) -> tuple[type[Backend], str]:
    """(backend class, reason for the choice). Raises BackendUnavailable / AccessDenied naming what is missing."""
    proc = proc or KernelFiles("/proc")
    sysfs = sysfs or KernelFiles("/sys")
    if backend != "auto":
        if backend not in BACKENDS:
            raise BackendUnavailable(backend, f"unknown backend; choose one of auto, {', '.join(BACKENDS)}")
        cls = BACKENDS[backend]
        why = cls.probe(proc, sysfs, pid)
        if why is not None:
            if why.permission:
                raise AccessDenied(backend, why.reason)
            raise BackendUnavailable(backend, why.reason, why.option)
        return cls, f"{backend} requested"
    reasons: dict[str, str] = {}
    for name, cls in BACKENDS.items():
        why = cls.probe(proc, sysfs, pid)
        if why is None:
            skipped = "; ".join(f"{n}: {r}" for n, r in reasons.items())
            return cls, f"{name} ({cls.granularity}-granular) is the most precise available" + (
                f" ({skipped})" if skipped else "")
        reasons[name] = why.reason
    raise BackendUnavailable("auto", "no idle-tracking backend works here: "
                             + "; ".join(f"{n}: {r}" for n, r in reasons.items()), reasons=reasons)


def resolve_ranges(ranges: Ranges, vmas: list[Vma]) -> tuple[list[VfnRange], bool]:
    """Sorted, merged vfn ranges for a range spec, and whether the default set was truncated.

    A spec is a VMA name ("[heap]", "[stack]", a file path: every VMA with that name), a (start_gva, end_gva)
    pair (end exclusive, rounded out to pages), or a Vma. None = every mapped VMA except PROT_NONE ones
    (reservations and guard gaps hold no pages)."""
    out: list[VfnRange] = []
    truncated = False
    if ranges is None:
        total = 0
        for v in vmas:
            if v.perms.startswith("---"):
                continue
            n = (v.end_gva - v.start_gva) >> PAGE_SHIFT
            if total + n > MAX_DEFAULT_PAGES:
                truncated = True
                continue
            total += n
            out.append((v.start_gva >> PAGE_SHIFT, v.end_gva >> PAGE_SHIFT))
    else:
        specs: Sequence[RangeSpec] = [ranges] if isinstance(ranges, (str, tuple, Vma)) else ranges
        for spec in specs:
            if isinstance(spec, Vma):
                out.append((spec.start_gva >> PAGE_SHIFT, spec.end_gva >> PAGE_SHIFT))
            elif isinstance(spec, str):
                hit = [v for v in vmas if v.name == spec or (spec == "[anon]" and v.kind == "anon")]
                if not hit:
                    raise BadRange(repr(spec), sorted({v.name for v in vmas if v.name}))
                out.extend((v.start_gva >> PAGE_SHIFT, v.end_gva >> PAGE_SHIFT) for v in hit)
            else:
                start_gva, end_gva = int(spec[0]), int(spec[1])
                if not 0 <= start_gva < end_gva or end_gva > 1 << 57:
                    raise BadRange(f"{start_gva:#x}-{end_gva:#x} (need 0 <= start < end)")
                out.append((start_gva >> PAGE_SHIFT, -(-end_gva >> PAGE_SHIFT)))
    out.sort()
    merged: list[VfnRange] = []
    for lo, hi in out:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    # Every page of a named range gets per-page state (~18 bytes): a huge VMA or gva range (a 1 TiB
    # reservation, a corrupt guest VMA) must be refused, not allocated. The default set is truncated above.
    pages = sum(hi - lo for lo, hi in merged)
    if ranges is not None and pages > MAX_DEFAULT_PAGES:
        raise BadRange(f"{str(ranges)[:100]}: {pages << PAGE_SHIFT >> 30} GiB, over the "
                       f"{MAX_DEFAULT_PAGES << PAGE_SHIFT >> 30} GiB one read tracks; name fewer or narrower ranges")
    return merged, truncated


class IdleTracker:
    """Track which pages of host process ``pid`` are idle, by virtual page (a :class:`Tracker`).

    ``backend``: "auto" (most precise available; ``reason`` says why), "page_idle", "damon" or "clear_refs".
    Raises ProcessGone / KernelThread / BackendUnavailable / AccessDenied / TrackerBusy (another vmsight
    tracker holds this backend's lock; ``wait_lock=True`` waits for it instead)."""

    def __init__(self, pid: int, backend: str = "auto", *, proc: KernelFiles | None = None,
                 sysfs: KernelFiles | None = None, lock_dir: str | None = None, wait_lock: bool = False) -> None:
        self.proc = proc or KernelFiles("/proc")
        self.sysfs = sysfs or KernelFiles("/sys")
        self.process = Process(pid, self.proc)
        self.pid = pid
        cls, self.reason = choose_backend(pid, backend, self.proc, self.sysfs)
        self.backend_name = cls.name
        self._lock: TrackerLock | None = None
        self._backend: Backend | None = None
        try:
            lock_name = f"clear_refs-{pid}" if cls is ClearRefsBackend else cls.name
            self._lock = TrackerLock(lock_name, lock_dir, wait=wait_lock)
            self._backend = cls(self.process, self.proc, self.sysfs)
        except BaseException:
            self.close()
            raise
        self._marked: list[VfnRange] | None = None
        self._mark_partial = False
        log.info("idle tracker for pid %d (%s): %s", pid, self.process.comm, self.reason)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise ValueError("tracker is closed")
        return self._backend

    @property
    def granularity(self) -> str:
        return self.backend.granularity

    @property
    def approximate(self) -> bool:
        return self.backend.approximate   # clear_refs may find out only at its first mark

    @property
    def comm(self) -> str:
        return self.process.comm

    # --- ranges ---------------------------------------------------------------------------------------------
    def vmas(self) -> list[Vma]:
        return self.process.maps()

    def resolve(self, ranges: Ranges = None, vmas: list[Vma] | None = None) -> tuple[list[VfnRange], bool]:
        """:func:`resolve_ranges` against this process's VMAs (read only when the spec names some)."""
        needs_maps = ranges is None or isinstance(ranges, str) or (
            not isinstance(ranges, (tuple, Vma)) and any(isinstance(r, str) for r in ranges))
        if vmas is None:
            vmas = self.vmas() if needs_maps else []
        return resolve_ranges(ranges, vmas)

    # --- the two operations -------------------------------------------------------------------------------
    def mark_idle(self, ranges: Ranges = None) -> None:
        """Start an interval: mark the pages of ``ranges`` (default: all mapped) idle."""
        vfn_ranges, self._mark_partial = self.resolve(ranges)
        self.backend.mark(vfn_ranges, named_ranges=ranges is not None)
        self._marked = vfn_ranges

    def read(self, ranges: Ranges = None) -> IdleSnapshot:
        """End an interval: which pages stayed idle since ``mark_idle``. Default ranges: those marked last,
        else all mapped. Pages mapped later than the mark read as NEW (accessed) where the backend sees them."""
        vmas = self.vmas()
        vfn_ranges, partial = self._read_ranges(ranges, vmas)
        return self._snapshot(self.backend.read(vfn_ranges), vmas, vfn_ranges, partial)

    def read_and_mark(self, ranges: Ranges = None) -> IdleSnapshot:
        """End this interval and start the next one at the same moment, for continuous tracking: ``read()``
        of what was marked, then ``mark_idle(ranges)``. With page_idle only the pages that were accessed are
        marked again (the read leaves idle pages marked), so a tracking round costs about half as much."""
        vmas = self.vmas()
        vfn_ranges, partial = self._read_ranges(None, vmas)
        next_ranges, next_partial = self.resolve(ranges, vmas)
        res = self.backend.read_and_mark(vfn_ranges, next_ranges, named_ranges=ranges is not None)
        self._marked, self._mark_partial = next_ranges, next_partial
        return self._snapshot(res, vmas, vfn_ranges, partial)

    def _read_ranges(self, ranges: Ranges, vmas: list[Vma]) -> tuple[list[VfnRange], bool]:
        if ranges is None and self._marked is not None:
            return self._marked, self._mark_partial
        return self.resolve(ranges, vmas)

    def _snapshot(self, res: BackendResult, vmas: list[Vma], vfn_ranges: list[VfnRange],
                  partial: bool) -> IdleSnapshot:
        b = self.backend
        return make_snapshot(
            res, pid=self.pid, comm=self.process.comm, start_boottime_ns=self.process.start_boottime_ns,
            backend=b.name, granularity=b.granularity, approximate=b.approximate, vmas=vmas,
            vfn_ranges=vfn_ranges, partial=partial,
            warnings=(f"default ranges truncated at {MAX_DEFAULT_PAGES * PAGE_SIZE >> 30} GiB of VA",) if partial
            else ())

    # --- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.process.close()
        self.proc.forget(f"{self.pid}/")

    def __enter__(self) -> IdleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IdleTracker", "resolve_ranges", "BACKENDS", "choose_backend", "probe_backends", "RangeSpec", "Ranges", "VmaUsage"]
