"""DAMON backend: region-granular and approximate, through DAMON's sysfs interface (CONFIG_DAMON_SYSFS +
CONFIG_DAMON_VADDR), root only.

DAMON samples one page per region every ``sample_us`` and adapts regions (split/merge) between ``min`` and
``max`` regions; a region's ``nr_accesses`` counts sampled hits in the last aggregation interval and ``age``
how many aggregation intervals it kept that level. A page reads idle when its region had no sampled hit in the last
``min_idle_aggr + 1`` aggregation intervals (200 ms by default): DAMON's age restarts on region splits and
merges, so it cannot vouch for the whole time since ``mark``. Named ranges use the ``fvaddr`` operations (fixed
regions); the default (all VMAs) uses ``vaddr``. Snapshot procedure: a ``stat`` scheme
matching every region, ``update_schemes_tried_regions`` written to the kdamond's ``state`` (the write returns
once the next scheme pass has filled ``tried_regions``), then ``tried_regions/N/{start,end,nr_accesses,age}``.

Only a kdamond this backend created is ever touched. Writing ``nr_kdamonds`` removes and recreates every
kdamond directory (mm/damon/sysfs.c ``damon_sysfs_kdamonds_add_dirs``), so a kdamond can only be created when
there is none — or when the only one is ours from a crashed earlier run (recorded in an ownership file with the
boot id). Any other kdamond present -> unavailable, nothing written."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import time

import numpy as np

from vmsight.idle.abi import PAGE_SHIFT
from vmsight.idle.backend import (
    Backend,
    BackendResult,
    Unavailable,
    VfnRange,
    base_state,
    fill,
    now_ns,
    read_pagemap,
    segments_for,
)
from vmsight.idle.errors import AccessDenied, BackendUnavailable
from vmsight.idle.kfiles import KernelFiles
from vmsight.idle.lock import default_lock_dir
from vmsight.idle.procfs import Process
from vmsight.idle.result import STATE_DTYPE, AccessRegion, PageState

log = logging.getLogger(__name__)

_REGION_TRIES = 5   # update requests before an empty region list is believed

ADMIN = "kernel/mm/damon/admin"
KDAMONDS = f"{ADMIN}/kdamonds"
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

KNOWN = (PageState.PRESENT | PageState.SWAPPED | PageState.FILE | PageState.EXCLUSIVE | PageState.SOFT_DIRTY
         | PageState.TRACKED | PageState.APPROXIMATE)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner_path() -> str:
    return os.path.join(default_lock_dir(), "idle-damon-owner.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stale_own_kdamond(sysfs: KernelFiles) -> bool:
    """True if the single kdamond is one we created in an earlier run whose owner is dead."""
    try:
        with open(_owner_path()) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    return (rec.get("boot_id") == _boot_id() and rec.get("sysfs") == sysfs.root
            and not _pid_alive(int(rec.get("owner_pid", 0))) and sysfs.read_text(f"{KDAMONDS}/nr_kdamonds").strip() == "1")


class DamonBackend(Backend):
    name = "damon"
    granularity = "region"
    approximate = True
    option = "CONFIG_DAMON_SYSFS + CONFIG_DAMON_VADDR"

    # sampling 5 ms / aggregation 100 ms (DAMON's defaults); regions updated every second
    sample_us = 5_000
    aggr_us = 100_000
    update_us = 1_000_000
    min_regions = 10
    max_regions = 1000
    min_idle_aggr = 1

    @classmethod
    def probe(cls, proc: KernelFiles, sysfs: KernelFiles, pid: int) -> Unavailable | None:
        if not sysfs.exists(f"{KDAMONDS}/nr_kdamonds"):
            return Unavailable(f"{sysfs.path(ADMIN)} does not exist: the kernel lacks CONFIG_DAMON_SYSFS "
                               "(and CONFIG_DAMON_VADDR)", cls.option)
        try:
            nr = int(sysfs.read_text(f"{KDAMONDS}/nr_kdamonds").strip() or 0)
        except AccessDenied:
            return Unavailable("DAMON's sysfs files are root only", "root", permission=True)
        if nr and not _stale_own_kdamond(sysfs):
            return Unavailable(f"DAMON already has {nr} kdamond(s) that vmsight did not create; making our own "
                               "would rewrite nr_kdamonds, which destroys them — refusing to touch DAMON",
                               "no foreign kdamonds")
        return None

    def __init__(self, process: Process, proc: KernelFiles, sysfs: KernelFiles) -> None:
        super().__init__(process, proc, sysfs)
        self.mark_time_ns: int | None = None
        self.start_time_ns: int | None = None
        self._created = False
        self._ranges: list[VfnRange] | None = None
        self._atexit = False

    # --- sysfs traffic (all writes go through _w, under KDAMONDS of the kdamond we created) -------------------
    def _w(self, rel: str, value: object) -> None:
        self.sysfs.write_text(f"{KDAMONDS}/{rel}", f"{value}\n")

    def _r(self, rel: str) -> str:
        return self.sysfs.read_text(f"{KDAMONDS}/{rel}").strip()

    def _create(self, ranges: list[VfnRange] | None) -> None:
        why = self.probe(self.proc, self.sysfs, self.process.pid)
        if why is not None:
            raise BackendUnavailable(self.name, why.reason, why.option)
        if self._r("nr_kdamonds") == "1" and self._r("0/state") == "on":  # ours, left by a crashed run
            self._w("0/state", "off")
        self._w("nr_kdamonds", 1)
        self._created = True
        self._record_owner()
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True
        ctx = "0/contexts/0"
        self._w("0/contexts/nr_contexts", 1)
        avail = self._r(f"{ctx}/avail_operations").split()
        if "vaddr" not in avail:
            self.close()
            raise BackendUnavailable(self.name, f"DAMON operations {avail} lack vaddr (CONFIG_DAMON_VADDR)",
                                     "CONFIG_DAMON_VADDR")
        # vaddr re-derives its regions from the VMAs every update interval (damon_va_update), dropping ranges
        # we set; fvaddr keeps them, so named ranges use fvaddr
        ops = "fvaddr" if ranges and "fvaddr" in avail else "vaddr"
        self._w(f"{ctx}/operations", ops)
        self._w(f"{ctx}/monitoring_attrs/intervals/sample_us", self.sample_us)
        self._w(f"{ctx}/monitoring_attrs/intervals/aggr_us", self.aggr_us)
        self._w(f"{ctx}/monitoring_attrs/intervals/update_us", self.update_us)
        self._w(f"{ctx}/monitoring_attrs/nr_regions/max", self.max_regions)
        self._w(f"{ctx}/monitoring_attrs/nr_regions/min", self.min_regions)
        self._w(f"{ctx}/targets/nr_targets", 1)
        self._w(f"{ctx}/targets/0/pid_target", self.process.pid)
        if ranges:
            self._w(f"{ctx}/targets/0/regions/nr_regions", len(ranges))
            for i, (lo, hi) in enumerate(ranges):
                self._w(f"{ctx}/targets/0/regions/{i}/start", lo << PAGE_SHIFT)
                self._w(f"{ctx}/targets/0/regions/{i}/end", hi << PAGE_SHIFT)
        sch = f"{ctx}/schemes/0"
        self._w(f"{ctx}/schemes/nr_schemes", 1)
        self._w(f"{sch}/action", "stat")
        self._w(f"{sch}/access_pattern/sz/max", U64_MAX)
        self._w(f"{sch}/access_pattern/nr_accesses/max", U32_MAX)
        self._w(f"{sch}/access_pattern/age/max", U32_MAX)
        self._w("0/state", "on")
        self.start_time_ns = now_ns()
        log.info("damon: kdamond 0 (pid %s) monitors pid %d", self._r("0/pid"), self.process.pid)

    def _record_owner(self) -> None:
        path = _owner_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"owner_pid": os.getpid(), "boot_id": _boot_id(), "sysfs": self.sysfs.root,
                       "kdamond": 0, "target_pid": self.process.pid}, f)

    # --- interface ----------------------------------------------------------------------------------------
    def mark(self, ranges: list[VfnRange], *, named_ranges: bool) -> None:
        # the kdamond is set up once, by the first mark: named ranges become its fixed regions
        if not self._created:
            self._ranges = ranges
            self._create(ranges if named_ranges else None)
        self.mark_time_ns = now_ns()


    def _regions(self) -> list[AccessRegion]:
        # A monitored target always has regions (at least min_nr_regions); an empty tried_regions list means
        # the kdamond had not yet applied the scheme since the update request (the in-guest suite read 0
        # regions once in 7 runs). Ask again, a bounded number of aggregation intervals.
        for attempt in range(_REGION_TRIES):
            self._w("0/state", "update_schemes_tried_regions")
            if self._r("0/state") != "on":
                self.process.check_alive("DAMON read")
                raise BackendUnavailable(self.name, "our kdamond stopped (its target exited?)")
            base = "0/contexts/0/schemes/0/tried_regions"
            out = []
            for d in self.sysfs.listdir(f"{KDAMONDS}/{base}"):
                if not d.isdigit():
                    continue
                out.append(AccessRegion(int(self._r(f"{base}/{d}/start")), int(self._r(f"{base}/{d}/end")),
                                        int(self._r(f"{base}/{d}/nr_accesses")), int(self._r(f"{base}/{d}/age"))))
            if out:
                break
            log.debug("DAMON: no tried regions yet (attempt %d)", attempt + 1)
            time.sleep(self.aggr_us / 1e6)
        out.sort(key=lambda r: r.start_gva)
        return out

    def read(self, ranges: list[VfnRange]) -> BackendResult:
        if not self._created:   # read without a mark: monitor every VMA from now
            self.mark(ranges, named_ranges=False)
        regions = self._regions()
        t = now_ns()
        since = self.mark_time_ns or self.start_time_ns or t
        elapsed_us = (t - since) / 1000
        starts = np.array([r.start_gva >> PAGE_SHIFT for r in regions], np.int64)
        ends = np.array([-(-r.end_gva >> PAGE_SHIFT) for r in regions], np.int64)
        # DAMON's age restarts when regions are split or merged, so it cannot vouch for the whole time since
        # mark; a region counts as idle when no sample hit it for at least ``min_idle_aggr`` + 1 aggregation
        # intervals (or since mark, if that is shorter)
        need = min(self.min_idle_aggr, max(0, int(elapsed_us // self.aggr_us) - 1))
        cold = np.array([r.nr_accesses == 0 and r.age >= need for r in regions], bool)
        segments = segments_for(ranges)
        for lo, hi in ranges:
            entries = read_pagemap(self.proc, self.process, lo, hi)
            state = base_state(entries)
            vfn = np.arange(lo, hi, dtype=np.int64)
            pos = np.searchsorted(starts, vfn, side="right") - 1
            inside = (pos >= 0) & (vfn < ends[np.maximum(pos, 0)]) if len(regions) else np.zeros(hi - lo, bool)
            region_cold = inside & cold[np.maximum(pos, 0)] if len(regions) else np.zeros(hi - lo, bool)
            resident = (state & np.uint16(PageState.PRESENT | PageState.SWAPPED)) != 0
            judged = inside & resident
            state |= np.where(judged, np.uint16(PageState.TRACKED | PageState.APPROXIMATE), 0).astype(STATE_DTYPE)
            fill(segments, lo, hi, state, judged & region_cold, entries=entries)
        self.process.check_alive("read")
        warn = [f"DAMON is approximate: region-granular sampling ({len(regions)} regions, sample "
                f"{self.sample_us} us, aggregation {self.aggr_us} us)"]
        return BackendResult(segments, KNOWN, self.mark_time_ns, warnings=tuple(warn), regions=tuple(regions))

    def close(self) -> None:
        if not self._created:
            return
        self._created = False
        try:
            # only our kdamond: the sole one, targeting our pid
            if (self._r("nr_kdamonds") == "1"
                    and self._r("0/contexts/0/targets/0/pid_target") == str(self.process.pid)):
                if self._r("0/state") == "on":
                    self._w("0/state", "off")
                self._w("nr_kdamonds", 0)
            else:
                log.warning("damon: kdamond layout changed under us; leaving DAMON untouched")
        except (OSError, AccessDenied) as e:
            log.warning("damon: cleanup failed: %s", e)
        with contextlib.suppress(OSError):
            os.unlink(_owner_path())
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False
