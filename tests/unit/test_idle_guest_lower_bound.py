"""GuestIdleTracker on a target that cannot flush TLBs (a libvirt domain without --allow-taint): it still
clears and reads the accessed bits, never asks for a flush, and its snapshots say the counts are lower
bounds (approximate, the warning, idle pages APPROXIMATE). Synthetic page tables, as test_idle_protocol.py."""

from __future__ import annotations

from typing import Any

from tests.unit.pagetables import A, PageTables
from tests.unit.test_idle_protocol import PAGES, WL, FakeGuest, FakeVM
from vmsight.idle import PageState
from vmsight.idle.guest import LOWER_BOUND, GuestIdleTracker


class NoFlushVM(FakeVM):
    can_flush_tlb = False

    def flush_tlb(self) -> None:
        raise AssertionError("no TLB flush without a gdbstub")


def _tracker(vm: Any, pt: PageTables) -> GuestIdleTracker:
    return GuestIdleTracker(vm, 77, guest=FakeGuest(pt.root), supervise_vm=False)


def test_no_flush_marks_snapshots_lower_bound() -> None:
    pt = PageTables()
    ptes = [pt.map(WL + i * 4096, 0x10_0000 + i * 4096) for i in range(PAGES)]
    with _tracker(NoFlushVM(pt), pt) as t:
        assert t.approximate and "lower bounds" in t.reason
        t.mark_idle()
        assert all(not pt.get(g) & A for g in ptes)       # cleared all the same
        for i in (3, 17):
            pt.put(ptes[i], pt.get(ptes[i]) | A)
        snap = t.read()
        assert snap.approximate and LOWER_BOUND in snap.warnings
        got = [int(v) - (WL >> 12) for v in snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)]
        assert got == [3, 17]
        # every idle page is a guess (it may have been used through a cached translation); accessed ones are not
        assert snap.count(PageState.APPROXIMATE, idle=True) == PAGES - 2
        assert snap.count(PageState.APPROXIMATE, idle=False) == 0
        assert all(pt.get(g) & A for g in ptes)           # given back after the read


def test_flushing_target_is_exact() -> None:
    pt = PageTables()
    for i in range(PAGES):
        pt.map(WL + i * 4096, 0x10_0000 + i * 4096)
    vm = FakeVM(pt)
    vm.can_flush_tlb = True  # type: ignore[attr-defined]
    with _tracker(vm, pt) as t:
        t.mark_idle()
        snap = t.read()
    assert vm.flushes == 1 and not t.approximate and not snap.approximate and LOWER_BOUND not in snap.warnings
    assert snap.count(PageState.APPROXIMATE) == 0
