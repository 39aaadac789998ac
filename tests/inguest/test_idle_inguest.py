"""Idle tracking inside the test guest (the idle-tracking kernel from guest/build-idle-kernel.sh), run there
with the host's Python by tests/guest/test_idle_in_guest.py. Skips on kernels without page_idle.

Accessed bits under TCG (FIELD-NOTES): QEMU sets a PTE's accessed bit only when it fills its software TLB, and
marking pages idle does not flush TLBs. So every exact test pins the workload and this tracker to the same vCPU:
the tracker marks, then wakes the workload through a pipe, and the switch to the workload's mm writes CR3, which
flushes that vCPU's TLB; every touch that follows walks the page tables and sets the accessed bit."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vmsight.idle import IdleTracker, KernelThread, PageState

pytestmark = pytest.mark.inguest

HAVE_PAGE_IDLE = os.path.exists("/sys/kernel/mm/page_idle/bitmap")
if not HAVE_PAGE_IDLE:
    pytest.skip("needs a kernel with CONFIG_IDLE_PAGE_TRACKING (the test guest)", allow_module_level=True)

WORKLOAD = str(Path(__file__).resolve().parent / "workload.py")
CPU = 0


class Workload:
    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, WORKLOAD, "--cpu", str(CPU), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        _, addr, size, _ = self.p.stdout.readline().split()
        self.addr, self.size = int(addr, 16), int(size)
        self.pages = self.size // 4096
        self.range = [(self.addr, self.addr + self.size)]

    def cmd(self, line: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def touch(self, pages: list[int]) -> None:
        assert self.cmd("touch " + (",".join(map(str, pages)) or "-")) == f"touched {len(pages)}"

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture(autouse=True)
def pinned() -> Iterator[None]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CPU})
    yield
    os.sched_setaffinity(0, old)


@pytest.fixture
def work(request: pytest.FixtureRequest) -> Iterator[Workload]:
    args = getattr(request, "param", ("--mib", "32"))
    w = Workload(*args)
    yield w
    w.close()


def rel_pages(snap, w: Workload, flag: PageState, idle: bool) -> set[int]:  # type: ignore[no-untyped-def]
    first = w.addr >> 12
    return {int(v) - first for v in snap.pages(flag, idle) if first <= v < first + w.pages}


def test_page_idle_reports_exactly_the_touched_set(work: Workload) -> None:
    rng = random.Random(11)
    with IdleTracker(work.p.pid) as t:
        assert t.backend_name == "page_idle"
        for rnd in range(3):
            chosen = sorted(rng.sample(range(work.pages), 200 + 300 * rnd))
            t.mark_idle(work.range)
            work.touch(chosen)
            snap = t.read()
            accessed = rel_pages(snap, work, PageState.TRACKED, idle=False)
            untracked = set(range(work.pages)) - rel_pages(snap, work, PageState.TRACKED, idle=True) - accessed
            missed = set(chosen) - accessed
            extra = accessed - set(chosen)
            print(f"round {rnd}: touched {len(chosen)} accessed {len(accessed)} missed {len(missed)} "
                  f"extra {len(extra)} untracked {len(untracked)}")
            assert not missed, f"missed {sorted(missed)[:20]}"
            # extra accesses (or pages the kernel keeps off the LRU) only where the kernel itself touched pages
            assert len(extra | untracked) < 0.01 * work.pages
            assert snap.count(PageState.SWAPPED) == 0


@pytest.fixture
def thp_madvise() -> Iterator[None]:
    # Guests below 512 MiB of RAM boot with THP "never" (mm/huge_memory.c hugepage_init): allow madvise()d ranges.
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    old = p.read_text().split("[")[1].split("]")[0]
    p.write_text("madvise\n")
    yield
    p.write_text(old + "\n")


@pytest.mark.parametrize("work", [("--mib", "8", "--thp")], indirect=True)
def test_thp_touched_at_one_byte_reads_as_512_accessed_pages(thp_madvise: None, work: Workload) -> None:
    with IdleTracker(work.p.pid, "page_idle") as t:
        t.mark_idle(work.range)
        snap0 = t.read()
        huge = rel_pages(snap0, work, PageState.HUGE | PageState.TRACKED, idle=True)
        if len(huge) < 1024:
            pytest.fail(f"only {len(huge)} pages are THP-backed; THP setup failed "
                        f"({Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()})")
        t.mark_idle(work.range)
        # v6.7+: PAGEMAP_SCAN found them PMD-mapped, so only the heads' kpageflags were read
        assert t.backend.pmd_pages_last_scan >= len(huge)  # type: ignore[attr-defined]
        work.touch([512 + 7])            # one byte in the second huge page
        snap = t.read()
    accessed = rel_pages(snap, work, PageState.TRACKED, idle=False)
    assert accessed == set(range(512, 1024)), f"{len(accessed)} accessed"
    assert rel_pages(snap, work, PageState.HUGE, idle=False) == set(range(512, 1024))


@pytest.fixture
def zram_swap() -> Iterator[None]:
    if not Path("/sys/block/zram0").exists():
        Path("/sys/class/zram-control/hot_add").read_text()
    Path("/sys/block/zram0/disksize").write_text("64M\n")
    subprocess.run(["mkswap", "/dev/zram0"], check=True, capture_output=True)
    subprocess.run(["swapon", "/dev/zram0"], check=True, capture_output=True)
    yield
    subprocess.run(["swapoff", "/dev/zram0"], check=False, capture_output=True)
    Path("/sys/block/zram0/reset").write_text("1\n")


@pytest.mark.parametrize("work", [("--mib", "8")], indirect=True)
def test_pages_pushed_to_zram_read_swapped_and_idle(work: Workload, zram_swap: None) -> None:
    assert work.cmd("pageout 0 256") == "pageout 0"
    with IdleTracker(work.p.pid, "page_idle") as t:
        t.mark_idle(work.range)
        work.touch([600, 601])
        snap = t.read()
        swapped = rel_pages(snap, work, PageState.SWAPPED, idle=True)
        assert len(swapped) >= 250, f"only {len(swapped)} of 256 paged-out pages read swapped+idle"
        assert not rel_pages(snap, work, PageState.SWAPPED, idle=False)
        seg = snap.segments[0]
        i = (work.addr >> 12) + min(swapped) - seg.start_vfn
        assert int(seg.swap_offset[i]) > 0  # root sees the swap entry
        assert snap.swapped_bytes >= 250 * 4096
        assert {600, 601} <= rel_pages(snap, work, PageState.TRACKED, idle=False)
        # touching a swapped page faults it back in: accessed (NEW), no longer swapped
        t.mark_idle(work.range)
        back = min(swapped)
        work.touch([back])
        snap2 = t.read()
        st = snap2.state_of(work.addr + back * 4096)
        assert PageState.PRESENT in st and PageState.NEW in st and not snap2.is_idle(work.addr + back * 4096)


def test_damon_within_tolerance(work: Workload) -> None:
    """DAMON is sampled and region-granular: we require >= 80 % of a contiguous hot quarter to read accessed
    and >= 90 % of the cold rest to read idle after 6 s of monitoring (measured values are printed)."""
    hot = list(range(0, work.pages // 4))
    with IdleTracker(work.p.pid, "damon") as t:
        t.mark_idle(work.range)
        # the workload touches the hot quarter continuously, flushing its TLB every pass (see module doc)
        assert work.cmd(f"loop {','.join(map(str, hot))} 6").startswith("looped")
        t.mark_idle(work.range)
        assert work.cmd(f"loop {','.join(map(str, hot))} 3").startswith("looped")
        snap = t.read()
    assert snap.approximate and snap.granularity == "region"
    accessed = rel_pages(snap, work, PageState.TRACKED, idle=False)
    idle = rel_pages(snap, work, PageState.TRACKED, idle=True)
    hot_ok = len(accessed & set(hot)) / len(hot)
    cold = set(range(work.pages)) - set(hot)
    cold_ok = len(idle & cold) / len(cold)
    print(f"damon: {len(snap.regions)} regions; hot read accessed {hot_ok:.1%}, cold read idle {cold_ok:.1%}")
    assert hot_ok >= 0.80 and cold_ok >= 0.90
    assert Path("/sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds").read_text().strip() == "0"  # cleaned up


def test_cli_bitmap_prints_the_proposed_abi_words(work: Workload) -> None:
    chosen = [0, 1, 64, 130, 1000]
    with IdleTracker(work.p.pid, "page_idle") as t:
        t.mark_idle(work.range)
    work.touch(chosen)  # the tracker process is gone, so the workload's mm switch flushes the TLB anyway
    out = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "idle", "bitmap", str(work.p.pid),
                          "--start", hex(work.addr), "--end", hex(work.addr + 1024 * 4096), "--raw"],
                         capture_output=True, check=True, timeout=120).stdout
    words = np.frombuffer(out, dtype=np.uint64)
    assert len(words) == 1024 // 64  # addr is 2 MiB-aligned, so exactly 16 words
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
    assert set(np.nonzero(~bits)[0].tolist()) >= set(chosen)
    assert (~bits).sum() < len(chosen) + 10


def test_kernel_thread_and_non_root() -> None:
    with pytest.raises(KernelThread):
        IdleTracker(2, "page_idle")
    code = ("import os, __future__, vmsight.idle.tracker\nfrom vmsight.idle import IdleTracker\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"try:\n  IdleTracker({os.getpid()}, 'page_idle')\nexcept Exception as e:\n  print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, VMSIGHT_LOCK_DIR=os.path.join(tempfile.gettempdir(), "idle-nobody")))
    assert r.stdout.startswith("AccessDenied") and "root" in r.stdout, r.stdout + r.stderr


def test_tracking_overhead_is_measured() -> None:
    """Sanity of the benchmark code path (numbers come from benchmarks/bench_idle.py)."""
    t0 = time.monotonic()
    from benchmarks.bench_idle import p5_mark_read_ratio
    r = p5_mark_read_ratio(mib=32, repeats=1)
    assert r["p5_tracked_pages"] == 32 << 8 and r["p5_huge_pages"] == 0
    # mark+read includes two pagemap reads of the range, so the kernel's share alone exceeds the baseline
    assert r["p5_kernel_ratio"] > 1 and r["p5_ratio"] > r["p5_kernel_ratio"] and r["p5_steady_ratio"] > 0
    print(r, f"{time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize("work", [("--mib", "8")], indirect=True)
def test_cli_live_json_with_page_idle(work: Workload) -> None:
    """`vmsight idle PID --json`: versioned records; the sleeping workload's 8 MiB reads idle, and its idle age
    grows by one each interval."""
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--json", "idle", str(work.p.pid),
                        "--interval", "500ms", "--duration", "2s"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [__import__("json").loads(x) for x in r.stdout.splitlines()]
    assert recs[0]["backend"] == "page_idle" and "page-granular" in recs[0]["backend_reason"]
    ivs = [x for x in recs if x["type"] == "interval"]
    assert len(ivs) >= 3
    anon = [g for g in ivs[-1]["vmas"] if g["label"] == "[anon]"][0]
    assert anon["idle_bytes"] >= 8 << 20
    assert ivs[-1]["idle_age_hist_bytes"]["2"] >= 8 << 20
    assert ivs[0]["idle_age_hist_bytes"]["2"] == 0
