"""The Tracker protocol (issue 11): the host tracker and the guest tracker both implement it, so reports and the
CLI need nothing else; every backend's read is a typed BackendResult; named ranges reach mark() explicitly; start
times are in ns since boot. The guest tracker runs here on synthetic page tables in a bytearray (the guest-side
truth: the entries' Accessed bits the test sets), through a fake VM and a fake guest kernel."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.pagetables import A, PageTables
from tests.unit.test_idle_clear_refs import BASE, ClearRefsProc, N
from tests.unit.test_idle_fakes import FakeDamonSys, FakeProc, lock_dir, present
from vmsight.idle import IdleTracker, PageState, PidReused, Tracker
from vmsight.idle.backend import BackendResult
from vmsight.idle.guest import GuestIdleTracker

CLK_TCK = os.sysconf("SC_CLK_TCK")
WL = 0x7F00_0000_0000     # the guest workload's mapping
PAGES = 64


class FakeVM:
    def __init__(self, pt: PageTables) -> None:
        self.phys = pt.mem
        self.la57 = False
        self.pid = 1
        self.backend = "buffer"
        self.flushes = 0
        self.pauses = 0

    def take_run_control(self, who: str) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pauses += 1
        yield

    def flush_tlb(self) -> None:
        self.flushes += 1


class FakeGuest:
    """linux.Guest as the tracker uses it: one process with one anonymous mapping."""

    def __init__(self, dtb: int) -> None:
        self.start_boottime_ns = 5_123_456_789
        self.dtb = dtb
        self.kernel = SimpleNamespace(invalidate=lambda: None)

    def process(self, pid: int) -> Any:
        task = SimpleNamespace(is_kthread=False, mm=0xFFFF_8880_0000_1000, comm="work",
                               start_boottime_ns=self.start_boottime_ns)
        vma = SimpleNamespace(start=WL, end=WL + PAGES * 4096, perms="rw-p", offset=0, path="")
        return SimpleNamespace(task=task, dtb=self.dtb, maps=lambda: [vma])


@pytest.fixture
def guest_tracker() -> Iterator[tuple[GuestIdleTracker, PageTables, list[int]]]:
    pt = PageTables()
    ptes = [pt.map(WL + i * 4096, 0x10_0000 + i * 4096) for i in range(PAGES)]   # A set, as the guest left them
    with GuestIdleTracker(FakeVM(pt), 77, guest=FakeGuest(pt.root), supervise_vm=False) as t:  # type: ignore[arg-type]
        yield t, pt, ptes


@pytest.fixture
def host_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IdleTracker]:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = ClearRefsProc(tmp_path / "proc", False)
    with IdleTracker(proc.pid, "clear_refs", proc=proc) as t:
        yield t


def test_both_trackers_are_trackers(host_tracker: IdleTracker,
                                    guest_tracker: tuple[GuestIdleTracker, PageTables, list[int]]) -> None:
    g, _, _ = guest_tracker
    for t in (host_tracker, g):
        assert isinstance(t, Tracker)
        assert not hasattr(t, "process") or t.process is not t          # no self.process = self shim
        assert not hasattr(t, "backend") or t.backend is not t
    assert (host_tracker.comm, host_tracker.backend_name, host_tracker.granularity) == ("work", "clear_refs", "vma")
    assert (g.comm, g.backend_name, g.granularity, g.approximate) == ("work", "guest-pte", "page", False)
    assert not isinstance(object(), Tracker)

    class NoReadAndMark:   # one member short: not a Tracker
        pid, comm, backend_name, reason, granularity, approximate = 1, "x", "b", "r", "page", False

        def vmas(self) -> list[Any]:
            return []

        def mark_idle(self, ranges: Any = None) -> None: ...
        def read(self, ranges: Any = None) -> Any: ...
        def close(self) -> None: ...
        def __enter__(self) -> Any: ...
        def __exit__(self, *exc: object) -> None: ...

    assert not isinstance(NoReadAndMark(), Tracker)


def test_guest_tracker_sees_exactly_the_accessed_bits_set(
        guest_tracker: tuple[GuestIdleTracker, PageTables, list[int]]) -> None:
    t, pt, ptes = guest_tracker
    t.mark_idle()
    assert all(not pt.get(g) & A for g in ptes)          # cleared, and the TLBs flushed after
    assert t.vm.flushes == 1                              # type: ignore[attr-defined]
    touched = [3, 17, 40]
    for i in touched:                                     # the guest's MMU sets A on these
        pt.put(ptes[i], pt.get(ptes[i]) | A)
    snap = t.read()
    got = [int(v) - (WL >> 12) for v in snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)]
    assert got == touched and snap.count(PageState.TRACKED, idle=True) == PAGES - len(touched)
    assert snap.start_boottime_ns == 5_123_456_789 and snap.comm == "work" and snap.backend == "guest-pte"
    assert snap.mark_time_ns is not None and snap.mark_time_ns <= snap.read_time_ns
    assert all(pt.get(g) & A for g in ptes)               # given back after the read
    t.guest.start_boottime_ns += 1                        # type: ignore[attr-defined]  # another process, same pid
    with pytest.raises(PidReused, match=r"started 5\.123 s after boot.*started 5\.123 s") as ei:
        t.read()
    assert (ei.value.old_start_boottime_ns, ei.value.new_start_boottime_ns) == (5_123_456_789, 5_123_456_790)


def test_host_start_time_is_in_ns(host_tracker: IdleTracker) -> None:
    host_tracker.mark_idle()
    snap = host_tracker.read()
    assert snap.start_boottime_ns == 1234 * 1_000_000_000 // CLK_TCK      # stat field 22 = 1234 ticks


def test_every_backend_returns_a_typed_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = ClearRefsProc(tmp_path / "proc", False)
    with IdleTracker(proc.pid, "clear_refs", proc=proc) as t:
        t.mark_idle()
        res = t.backend.read([(BASE >> 12, (BASE >> 12) + N)])
    assert isinstance(res, BackendResult) and res.usage is not None and res.usage[0].idle_bytes == N * 4096
    assert res.known & PageState.TRACKED and res.mark_time_ns is not None and res.regions == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.mark_time_ns = 0  # type: ignore[misc]
    assert {f.name: f.type for f in dataclasses.fields(BackendResult)} == {
        "segments": "list[IdleSegment]", "known": "PageState", "mark_time_ns": "int | None",
        "usage": "list[VmaUsage] | None", "warnings": "tuple[str, ...]", "regions": "tuple[AccessRegion, ...]"}


@pytest.mark.parametrize("named", [None, [(BASE, BASE + 4096)]])
def test_named_ranges_reach_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: Any) -> None:
    """mark() is told whether the caller named the ranges: DAMON monitors named ranges as fixed regions (fvaddr),
    the default set with vaddr; read_and_mark passes it on for the next interval."""
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + N * 4096, "rw-p", "")])
    proc.set_pagemap({(BASE >> 12) + i: present(0x1000 + i) for i in range(N)})
    sysfs = FakeDamonSys(tmp_path / "sys")
    sysfs.regions = [(BASE, BASE + N * 4096, 0, 10)]
    calls: list[bool] = []
    with IdleTracker(proc.pid, "damon", proc=proc, sysfs=sysfs) as t:
        orig = t.backend.mark

        def mark(r: Any, *, named_ranges: bool) -> None:
            calls.append(named_ranges)
            orig(r, named_ranges=named_ranges)

        t.backend.mark = mark  # type: ignore[method-assign]
        t.mark_idle(named)
        t.read_and_mark(named)
        ops = sysfs.read_text("kernel/mm/damon/admin/kdamonds/0/contexts/0/operations").strip()
    assert calls == [named is not None] * 2
    assert ops == ("fvaddr" if named else "vaddr")
