"""Idle tracking of a process inside a VM from its page tables' accessed bits, harvested from the host.
Ground truth: the workload touches exactly the pages we choose; the guest's own /proc/PID/pagemap gives
presence and frame numbers; /proc/PID/smaps says whether THP backs the range."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tests.guest.workload import GuestWorkload
from vmsight.idle import Tracker
from vmsight.idle.errors import KernelThread, ProcessGone
from vmsight.idle.guest import GuestIdleTracker
from vmsight.idle.result import PageState
from vmsight.memory.paging import walk_range
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM

pytestmark = pytest.mark.guest
PAGES = 2048  # 8 MiB


def accessed_pages(snap, wl: GuestWorkload) -> set[int]:  # type: ignore[no-untyped-def]
    vfns = snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)
    first = wl.addr >> 12
    return {int(v) - first for v in vfns if first <= v < first + PAGES}


def guest_pagemap(guest: VmInstance, pid: int, gva: int, pages: int) -> np.ndarray:
    r = guest.agent.run(f"dd if=/proc/{pid}/pagemap bs=8 skip={gva >> 12} count={pages} 2>/dev/null | base64").check()
    import base64

    return np.frombuffer(base64.b64decode(r.stdout), dtype=np.uint64)


def test_exact_accessed_set(guest: VmInstance, vm: VM) -> None:
    wl = GuestWorkload(guest, PAGES)
    rng = random.Random(5)
    try:
        with GuestIdleTracker(vm, wl.pid) as tr:
            assert isinstance(tr, Tracker) and tr.comm == "vmsight-workloa"
            rng_range = [(wl.addr, wl.addr + wl.size)]
            for round_ in range(3):
                chosen = sorted(rng.sample(range(PAGES), 150 + 100 * round_))
                tr.mark_idle(rng_range)
                wl.touch(chosen)
                snap = tr.read()
                # Exact: every touched page seen, nothing else in the workload's private mapping.
                assert accessed_pages(snap, wl) == set(chosen), f"round {round_}"
                idle = snap.pages(PageState.PRESENT | PageState.TRACKED, idle=True)
                assert len(idle) == PAGES - len(chosen)
            # The guest's own pagemap agrees on presence and on every frame number.
            pm = guest_pagemap(guest, wl.pid, wl.addr, PAGES)
            assert len(pm) == PAGES and all(pm >> np.uint64(63))
            seg = snap.segment_of(wl.addr >> 12)
            assert seg is not None
            i0 = (wl.addr >> 12) - seg.start_vfn
            assert np.array_equal(seg.pfn[i0:i0 + PAGES], pm & np.uint64((1 << 55) - 1))
            # The start time is the guest's own: /proc/PID/stat field 22 is start_boottime in USER_HZ (100) ticks.
            stat = guest.agent.run(f"cat /proc/{wl.pid}/stat").check().text
            assert snap.start_boottime_ns // 10_000_000 == int(stat.rsplit(")", 1)[1].split()[19])
            # The per-VMA breakdown and the ABI words are consistent with the bitmap.
            words = snap.words(wl.addr >> 12, (wl.addr >> 12) + PAGES)
            assert int(sum(bin(int(w)).count("1") for w in words)) == PAGES - len(chosen)
    finally:
        wl.stop()


def test_whole_process_and_restore(guest: VmInstance, vm: VM) -> None:
    """Default ranges = every mapped VMA; the A bits we took are given back after the read."""
    wl = GuestWorkload(guest, 256)
    try:
        with GuestIdleTracker(vm, wl.pid) as tr:
            tr.mark_idle()
            wl.touch([1, 2, 3])
            snap = tr.read()
            labels = {u.vma.label for u in snap.usage}
            assert "[stack]" in labels and "/bin/vmsight-workload" in labels
            assert accessed_pages(snap, wl) == {1, 2, 3}
            assert snap.accessed_bytes >= 3 * 4096  # plus the workload's own stack/code pages
            with vm.paused():
                proc = tr.guest.process(wl.pid)
                leaves = list(walk_range(vm.phys, proc.dtb, wl.addr, wl.addr + 256 * 4096))
            assert leaves and all(lf.accessed for lf in leaves), "A bits must be restored after the read"
    finally:
        wl.stop()


def test_thp_touched_at_one_byte_is_512_pages(guest: VmInstance, vm: VM) -> None:
    guest.agent.run("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled").check()
    wl = GuestWorkload(guest, 1024, thp=True)
    try:
        smaps = guest.agent.run(f"grep AnonHugePages /proc/{wl.pid}/smaps").text
        huge_kb = sum(int(line.split()[1]) for line in smaps.splitlines())
        if huge_kb < 2048:
            pytest.skip(f"the guest gave no huge page (AnonHugePages {huge_kb} kB; memory fragmented?)")
        with GuestIdleTracker(vm, wl.pid) as tr:
            tr.mark_idle([(wl.addr, wl.addr + wl.size)])
            wl.touch([7])  # one byte in the first 2 MiB page
            snap = tr.read()
        assert accessed_pages(snap, wl) == set(range(512))
        assert snap.count(PageState.HUGE) >= 512
        assert all(snap.state_of(wl.gva(i)) & PageState.HUGE for i in (0, 511))
    finally:
        wl.stop()
        guest.agent.run("echo never > /sys/kernel/mm/transparent_hugepage/enabled")


def test_kernel_thread_and_exit(guest: VmInstance, vm: VM) -> None:
    with pytest.raises(KernelThread):
        GuestIdleTracker(vm, 2)  # kthreadd
    wl = GuestWorkload(guest, 64)
    tr = GuestIdleTracker(vm, wl.pid)
    tr.mark_idle()
    wl.command("exit")
    time.sleep(0.3)
    with pytest.raises(ProcessGone):
        tr.read()


def test_cli_idle_on_a_guest_process(guest: VmInstance) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    wl = GuestWorkload(guest, 512)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cli = [sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir]
    try:
        start, end = wl.addr, wl.addr + wl.size
        r = subprocess.run(cli + ["--json", "idle", "bitmap", str(wl.pid), "--start", hex(start), "--end", hex(end),
                                  "--mark", "--wait", "0.3s"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["backend"] == "guest-pte" and out["offset_bytes"] == (start >> 12) // 64 * 8
        assert out["words"] == [f"{(1 << 64) - 1:#018x}"] * 8  # 512 untouched pages: every bit idle
        r = subprocess.run(cli + ["--json", "idle", str(wl.pid), "--interval", "0.5s", "--duration", "1.6s"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        recs = [json.loads(line) for line in r.stdout.splitlines()]
        assert recs[0]["backend"] == "guest-pte" and recs[0]["format_version"] == 1
        intervals = [x for x in recs if x.get("type") == "interval"]
        assert len(intervals) >= 2 and all("wss_bytes" in x for x in intervals)
        r = subprocess.run(cli + ["idle", str(wl.pid), "--backend", "clear_refs"], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 2 and "guest-pte" in r.stderr
    finally:
        wl.stop()
