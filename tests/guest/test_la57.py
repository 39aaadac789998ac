"""5-level paging (issue 9 item 3): a guest with CR4.LA57 (QEMU's ``-cpu max`` under TCG; KVM guests on Ice Lake
and later with ``-cpu host``) puts the kernel at 0xff1..., the user half up to 2^56, and walks five table levels.
ps, maps and translations are compared with the guest's own /proc, its pagemap, and QEMU's ``gva2gpa``."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import KERNELS, _boot
from tests.guest.test_linux_procs import snapshot
from tests.guest.workload import GuestWorkload, norm_maps
from vmsight.idle.guest import GuestIdleTracker
from vmsight.idle.result import PageState
from vmsight.linux import find_task, kernel_of, processes
from vmsight.linux.mm import task_vmas
from vmsight.memory.paging import kernel_half_start, la57_from_cr4, user_half_end, walk_range
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM, attach

pytestmark = pytest.mark.guest

SLEEPS = "sleep 2001 >/dev/null 2>&1 & sleep 2002 >/dev/null 2>&1 & sleep 0.2; echo ok"


@pytest.fixture(scope="module", params=KERNELS)
def guest57(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    yield from _boot(tmp_path_factory, request.param, cpu="max")


@pytest.fixture()
def vm57(guest57: VmInstance) -> Iterator[VM]:
    with attach(guest57.dir) as v:
        assert v.status() == "running"
        yield v
    with attach(guest57.dir) as v:
        assert v.status() == "running"


def _hmp_gva2gpa(vm: VM, gva: int) -> int | None:
    m = re.search(r"gpa: (0x[0-9a-f]+)", vm.qmp.hmp(f"gva2gpa {gva:#x}"))
    return int(m.group(1), 16) if m else None


def test_guest_runs_with_five_levels(guest57: VmInstance, vm57: VM) -> None:
    assert "la57" in guest57.agent.run("cat /proc/cpuinfo").check().text.split()
    hmp_cr4 = int(re.search(r"CR4=([0-9a-f]+)", vm57.qmp.hmp("info registers")).group(1), 16)  # type: ignore[union-attr]
    assert la57_from_cr4(hmp_cr4) and vm57.la57
    k = kernel_of(vm57)
    # the kernel itself lives above the 5-level kernel-half start, which is below the 4-level one
    assert k.la57 and kernel_half_start(la57=True) < kernel_half_start(la57=False)
    with vm57.paused():
        regs = vm57.registers(0)
    # the per-cpu base is GS in the kernel and KERNEL_GS_BASE while the vCPU runs user code (swapgs)
    percpu = regs["gs_base"] if regs["gs_base"] >= kernel_half_start(la57=True) else regs["k_gs_base"]
    assert kernel_half_start(la57=True) <= percpu < kernel_half_start(la57=False)   # direct map at 0xff11...
    assert kernel_half_start(la57=True) <= k.page_offset_base < kernel_half_start(la57=False)


def test_ps_matches_proc(guest57: VmInstance, vm57: VM) -> None:
    guest57.agent.run("pkill -f 'sleep 200[12]'; " + SLEEPS).check()
    truth = snapshot(guest57)
    ours = {p["pid"]: p for p in processes(vm57)}
    common = set(truth) & set(ours)
    # what /proc showed and we did not see must have exited meanwhile (the snapshot's own children)
    alive = {int(x) for x in guest57.agent.run("cd /proc && echo [0-9]*").check().text.split()}
    assert len(common) >= 40 and not (set(truth) - set(ours)) & alive
    for pid in common:
        t, o = truth[pid], ours[pid]
        if "/tmp/.cmd" in str(o["cmdline"]):
            continue                       # the agent's own command, exiting as we read
        assert (o["ppid"], o["uid"], o["cmdline"]) == (t["ppid"], t["uid"], t["cmdline"]), pid
    assert any(str(p["cmdline"]) == "sleep 2001" for p in ours.values())


def test_maps_and_user_translations_match_proc(guest57: VmInstance, vm57: VM) -> None:
    pid = int(guest57.agent.run("pidof -s sleep || (sleep 2003 >/dev/null 2>&1 & echo $!)").check().text.split()[0])
    truth = norm_maps(guest57.agent.run(f"cat /proc/{pid}/maps").check().text)
    k = kernel_of(vm57)
    with vm57.paused():
        k.invalidate()
        vmas = task_vmas(k, pid)
        ours = [(v.start, v.end, v.perms, v.offset, v.path) for v in vmas]
        space = find_task(k, pid).address_space()
        leaves = [leaf for v in vmas for leaf in walk_range(vm57.phys, space.dtb, v.start, v.end, la57=True)]
    assert ours == truth
    assert all(end <= user_half_end(la57=True) for _, end, *_ in ours)
    assert len(leaves) >= 10
    # each present user page's frame, as the guest's own pagemap tells it (root sees PFNs)
    sample = random.Random(57).sample(leaves, min(40, len(leaves)))
    script = "; ".join(f"dd if=/proc/{pid}/pagemap bs=8 skip={leaf.gva >> 12} count=1 2>/dev/null | od -An -tx8"
                       for leaf in sample)
    entries = [int(x, 16) for x in guest57.agent.run(script).check().text.split()]
    assert len(entries) == len(sample)
    checked = 0
    for leaf, entry in zip(sample, entries, strict=True):
        if not entry >> 63:               # not present any more (reclaimed meanwhile): skip
            continue
        assert (entry & ((1 << 55) - 1)) == leaf.gpa >> 12, hex(leaf.gva)
        checked += 1
    assert checked >= len(sample) * 3 // 4


def test_kernel_translations_equal_qemu(vm57: VM) -> None:
    """Kernel text, the direct map and vmemmap: five-level walks give what QEMU's walker gives (anchors from the
    kernel, not from registers: a vCPU caught in user mode has a user rip and GS base)."""
    rng = random.Random(5757)
    k = kernel_of(vm57)
    with vm57.paused():
        cr3 = vm57.registers(0)["cr3"]          # the one HMP's gva2gpa walks (vCPU 0's)
        checked = 0
        for anchor in (k.text_gva, k.page_offset_base, k.vmemmap_base):
            span = 1 << 48                 # one PML5 slot
            lo = anchor & ~(span - 1)
            leaves = []
            for leaf in walk_range(vm57.phys, cr3, lo, lo + span, la57=True):
                leaves.append(leaf)
                if len(leaves) >= 5000:
                    break
            assert leaves, hex(anchor)             # vmemmap of 512 MiB: four 2 MiB pages
            for leaf in (rng.choice(leaves) for _ in range(100)):
                gva = leaf.gva + rng.randrange(leaf.page_size)
                t = vm57.translate(gva, cr3)
                assert len(t.entries) >= 3 and t.gpa == _hmp_gva2gpa(vm57, gva), hex(gva)
                checked += 1
    assert checked == 300


def test_cli_ps_and_maps(guest57: VmInstance) -> None:
    cli = [sys.executable, "-m", "vmsight.cli.main", "--vm", guest57.dir, "--json"]
    r = subprocess.run(cli + ["ps"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    procs = json.loads(r.stdout)
    assert {p["pid"] for p in procs} >= {1, 2} and all(p["pid"] > 0 for p in procs)
    r = subprocess.run(cli + ["maps", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    truth = norm_maps(guest57.agent.run("cat /proc/1/maps").check().text)
    assert [(v["start"], v["end"]) for v in json.loads(r.stdout)] == [(s, e) for s, e, *_ in truth]


def test_mapping_above_the_4_level_limit(guest57: VmInstance, vm57: VM) -> None:
    """Linux maps above 2^47 only on an explicit hint (arch/x86 DEFAULT_MAP_WINDOW): the workload asks for 2^52.
    Its VMA, its frames and its accessed bits are seen as the guest sees them."""
    pages = 64
    wl = GuestWorkload(guest57, pages, high=True)
    try:
        assert (1 << 52) <= wl.addr < user_half_end(la57=True)
        truth = [m for m in norm_maps(guest57.agent.run(f"cat /proc/{wl.pid}/maps").check().text)
                 if m[0] <= wl.addr < m[1]]
        k = kernel_of(vm57)
        with vm57.paused():
            k.invalidate()
            ours = [(v.start, v.end, v.perms, v.offset, v.path) for v in task_vmas(k, wl.pid)
                    if v.start <= wl.addr < v.end]
            space = find_task(k, wl.pid).address_space()
            frames = [space.translate(wl.gva(i)).gpa >> 12 for i in range(pages)]
        assert ours == truth and len(ours) == 1
        r = guest57.agent.run(f"dd if=/proc/{wl.pid}/pagemap bs=8 skip={wl.addr >> 12} count={pages} 2>/dev/null "
                              "| od -An -tx8 -v").check()
        entries = [int(x, 16) for x in r.text.split()]
        assert [e & ((1 << 55) - 1) for e in entries] == frames and all(e >> 63 for e in entries)
        with GuestIdleTracker(vm57, wl.pid) as tr:
            tr.mark_idle([(wl.addr, wl.addr + wl.size)])
            wl.touch([1, 7, 40])
            snap = tr.read()
        first = wl.addr >> 12
        accessed = {int(v) - first for v in snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)
                    if first <= v < first + pages}
        assert accessed == {1, 7, 40}
    finally:
        wl.stop()
