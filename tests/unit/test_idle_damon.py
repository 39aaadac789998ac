"""DAMON backend against an in-memory DAMON sysfs: the exact write sequence, the refusal to touch a kdamond we
did not create, region -> page mapping. (The real DAMON is exercised only inside the test guest: the host's
DAMON belongs to the machine.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_idle_fakes import LRU, FakeDamonSys, FakeProc, lock_dir, present
from vmsight.idle import BackendUnavailable, IdleTracker, PageState
from vmsight.idle.damon import DamonBackend

BASE = 0x10000000
VFN0 = BASE >> 12
N = 256


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    p = FakeProc(tmp_path / "proc")
    p.set_maps([(BASE, BASE + N * 4096, "rw-p", "")])
    p.set_pagemap({VFN0 + i: present(0x1000 + i) for i in range(N)})
    p.set_kpageflags({0x1000 + i: LRU for i in range(N)})
    return p


def test_exact_sysfs_write_sequence_and_cleanup(proc: FakeProc, tmp_path: Path) -> None:
    sysfs = FakeDamonSys(tmp_path / "sys")
    t = IdleTracker(proc.pid, "damon", proc=proc, sysfs=sysfs)
    t.mark_idle([(BASE, BASE + N * 4096)])
    c = "0/contexts/0"
    assert sysfs.writes == [
        ("nr_kdamonds", "1"),
        ("0/contexts/nr_contexts", "1"),
        (f"{c}/operations", "fvaddr"),   # named range: fixed regions
        (f"{c}/monitoring_attrs/intervals/sample_us", "5000"),
        (f"{c}/monitoring_attrs/intervals/aggr_us", "100000"),
        (f"{c}/monitoring_attrs/intervals/update_us", "1000000"),
        (f"{c}/monitoring_attrs/nr_regions/max", "1000"),
        (f"{c}/monitoring_attrs/nr_regions/min", "10"),
        (f"{c}/targets/nr_targets", "1"),
        (f"{c}/targets/0/pid_target", str(proc.pid)),
        (f"{c}/targets/0/regions/nr_regions", "1"),
        (f"{c}/targets/0/regions/0/start", str(BASE)),
        (f"{c}/targets/0/regions/0/end", str(BASE + N * 4096)),
        (f"{c}/schemes/nr_schemes", "1"),
        (f"{c}/schemes/0/action", "stat"),
        (f"{c}/schemes/0/access_pattern/sz/max", str(2**64 - 1)),
        (f"{c}/schemes/0/access_pattern/nr_accesses/max", str(2**32 - 1)),
        (f"{c}/schemes/0/access_pattern/age/max", str(2**32 - 1)),
        ("0/state", "on"),
    ]
    # first half hot, second half cold for long enough -> second half idle, approximate
    sysfs.regions = [(BASE, BASE + 128 * 4096, 7, 3), (BASE + 128 * 4096, BASE + N * 4096, 0, 50)]
    snap = t.read()
    assert snap.backend == "damon" and snap.granularity == "region" and snap.approximate
    assert snap.count(PageState.TRACKED | PageState.APPROXIMATE, idle=True) == 128
    assert set((snap.pages(PageState.TRACKED, idle=False) - VFN0).tolist()) == set(range(128))
    assert len(snap.regions) == 2 and any("approximate" in w for w in snap.warnings)
    n = len(sysfs.writes)
    t.close()
    assert sysfs.writes[n:] == [("0/state", "off"), ("nr_kdamonds", "0")]


def test_just_cooled_region_is_not_idle_yet(proc: FakeProc, tmp_path: Path) -> None:
    sysfs = FakeDamonSys(tmp_path / "sys")
    with IdleTracker(proc.pid, "damon", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        assert ("0/contexts/0/operations", "vaddr") in sysfs.writes  # all VMAs: DAMON follows them
        t.backend.mark_time_ns -= 2_000_000_000  # type: ignore[attr-defined]  # two seconds ago
        sysfs.regions = [(BASE, BASE + N * 4096, 0, 0)]  # no hit in the last aggregation interval only
        assert t.read().count(PageState.TRACKED, idle=True) == 0
        sysfs.regions = [(BASE, BASE + N * 4096, 0, 1)]
        assert t.read().count(PageState.TRACKED, idle=True) == N


def test_never_touches_a_foreign_kdamond(proc: FakeProc, tmp_path: Path) -> None:
    sysfs = FakeDamonSys(tmp_path / "sys", nr_kdamonds=1)
    with pytest.raises(BackendUnavailable, match="did not create"):
        IdleTracker(proc.pid, "damon", proc=proc, sysfs=sysfs)
    assert sysfs.writes == []
    assert DamonBackend.probe(proc, sysfs, proc.pid) is not None


def test_auto_prefers_damon_over_clear_refs_without_page_idle(proc: FakeProc, tmp_path: Path) -> None:
    sysfs = FakeDamonSys(tmp_path / "sys")
    with IdleTracker(proc.pid, "auto", proc=proc, sysfs=sysfs) as t:
        assert t.backend_name == "damon"
        assert "page_idle" in t.reason and "CONFIG_IDLE_PAGE_TRACKING" in t.reason
    assert sysfs.writes == []  # nothing is created before the first mark
