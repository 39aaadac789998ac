"""page_idle backend on synthetic /proc + a page_idle bitmap model: exact bitmap traffic and results."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_idle_fakes import (
    LRU,
    FakePageIdleSys,
    FakeProc,
    lock_dir,
    present,
    swapped,
    thp_flags,
)
from vmsight.idle import (
    AccessDenied,
    BackendUnavailable,
    IdleTracker,
    KernelThread,
    PageState,
    PidReused,
    ProcessGone,
)
from vmsight.idle.abi import KPF_ZERO_PAGE

BASE = 0x10000000          # gva of the synthetic mapping
VFN0 = BASE >> 12          # a multiple of 64
N = 256                    # pages


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + N * 4096, "rw-p", ""), (BASE + N * 4096, BASE + (N + 64) * 4096, "r--p", "/lib/x.so")])
    # vfn i -> pfn 0x1000 + 3*i (scattered frames), all on the LRU
    pfns = {VFN0 + i: 0x1000 + 3 * i for i in range(N)}
    proc.set_pagemap({v: present(p) for v, p in pfns.items()})
    kflags = {p: LRU for p in pfns.values()}
    proc.set_kpageflags(kflags)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags)
    return proc, sysfs, pfns, kflags


def tracker(proc: FakeProc, sysfs: FakePageIdleSys, tmp: Path | None = None) -> IdleTracker:
    return IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs)


def test_mark_writes_exactly_the_pfn_words(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, _ = env
    with tracker(proc, sysfs) as t:
        t.mark_idle([(BASE, BASE + N * 4096)])
    written: dict[int, int] = {}
    for off, data in sysfs.writes:
        for i, (w,) in enumerate(struct.iter_unpack("<Q", data)):
            if w:
                written[off + 8 * i] = written.get(off + 8 * i, 0) | w
    expect: dict[int, int] = {}
    for p in pfns.values():
        expect[p // 64 * 8] = expect.get(p // 64 * 8, 0) | (1 << (p % 64))
    assert written == expect
    assert all(len(d) <= 4096 and off % 8 == 0 for off, d in sysfs.writes)
    assert sysfs.idle == set(pfns.values())


def test_read_reports_exactly_the_accessed_pages(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, _ = env
    touched = {0, 1, 63, 64, 100, 255}
    with tracker(proc, sysfs) as t:
        t.mark_idle([(BASE, BASE + N * 4096)])
        for i in touched:
            sysfs.access(pfns[VFN0 + i])
        snap = t.read()
    assert snap.backend == "page_idle" and snap.granularity == "page" and not snap.approximate
    accessed = set((snap.pages(PageState.TRACKED, idle=False) - VFN0).tolist())
    assert accessed == touched
    assert snap.count(PageState.TRACKED, idle=True) == N - len(touched)
    # ABI layout: word vfn // 64, bit vfn % 64, set = idle
    words = snap.words(VFN0, VFN0 + N)
    assert len(words) == N // 64
    for i in range(N):
        assert bool(int(words[i // 64]) >> (i % 64) & 1) == (i not in touched)
    assert snap.is_idle(BASE + 2 * 4096) and not snap.is_idle(BASE + 100 * 4096)
    u = [x for x in snap.usage if x.vma.start_gva == BASE][0]
    assert u.accessed_bytes == len(touched) * 4096 and u.idle_bytes == (N - len(touched)) * 4096


def test_bitmap_calls_are_at_most_4k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    n = 4096 * 8 + 64   # dense frames spanning > 512 words
    proc.set_maps([(BASE, BASE + n * 4096, "rw-p", "")])
    proc.set_pagemap({VFN0 + i: present(0x100 + i) for i in range(n)})
    kflags = {0x100 + i: LRU for i in range(n)}
    proc.set_kpageflags(kflags, max_pfn=1 << 17)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags, max_pfn=1 << 17)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        snap = t.read()
    assert len(sysfs.writes) >= 2 and max(len(d) for _, d in sysfs.writes) == 4096
    assert max(s for _, s in sysfs.reads) <= 4096
    assert snap.count(PageState.TRACKED, idle=True) == n


def test_thp_tail_pages_take_the_head_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    base = 0x40000000
    v0 = base >> 12
    proc.set_maps([(base, base + (2 << 20), "rw-p", "")])
    head = 0x2000                                       # 512-aligned
    proc.set_pagemap({v0 + i: present(head + i) for i in range(512)})
    kflags = thp_flags(head)
    proc.set_kpageflags(kflags)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        # only the head's bit is written (the kernel ignores tail PFNs)
        assert [(o, struct.unpack("<Q", d[:8])[0]) for o, d in sysfs.writes] == [(head // 64 * 8, 1)]
        snap1 = t.read()
        assert snap1.count(PageState.TRACKED, idle=True) == 512
        assert snap1.count(PageState.HUGE) == 512
        t.mark_idle()
        sysfs.access(head)                              # one byte anywhere in the THP touches the folio
        snap2 = t.read()
    assert snap2.count(PageState.TRACKED, idle=False) == 512


def test_tail_whose_head_is_not_mapped_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + 64 * 4096, "rw-p", "")])
    head = 0x4000
    proc.set_pagemap({VFN0 + i: present(head + 256 + i) for i in range(64)})  # the middle of a folio
    kflags = thp_flags(head)
    proc.set_kpageflags(kflags)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        assert sysfs.idle == {head}
        assert t.read().count(PageState.TRACKED, idle=True) == 64


def test_pfn_change_swap_and_new_pages(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, kflags = env
    entries = {v: present(p) for v, p in pfns.items()}
    entries[VFN0 + 5] = swapped(1, 0x77)                  # swapped before the mark, stays swapped
    del entries[VFN0 + 6]                                 # not present at mark
    proc.set_pagemap(entries)
    with tracker(proc, sysfs) as t:
        t.mark_idle([(BASE, BASE + N * 4096)])
        after = dict(entries)
        after[VFN0 + 7] = present(0x9000)                 # migrated: frame changed
        kflags[0x9000] = LRU
        after[VFN0 + 8] = swapped(1, 0x99)                # reclaimed to swap during the interval
        after[VFN0 + 6] = present(0x9001)                 # faulted in during the interval
        kflags[0x9001] = LRU
        proc.set_pagemap(after)
        snap = t.read()
    g = lambda i: snap.state_of(BASE + i * 4096)  # noqa: E731
    assert PageState.SWAPPED in g(5) and PageState.TRACKED in g(5) and snap.is_idle(BASE + 5 * 4096)
    seg = snap.segments[0]
    assert int(seg.swap_type[VFN0 + 5 - seg.start_vfn]) == 1 and int(seg.swap_offset[VFN0 + 5 - seg.start_vfn]) == 0x77
    assert PageState.CHANGED in g(7) and PageState.TRACKED not in g(7) and not snap.is_idle(BASE + 7 * 4096)
    assert PageState.SWAPPED in g(8) and snap.is_idle(BASE + 8 * 4096)
    assert PageState.NEW in g(6) and PageState.TRACKED in g(6) and not snap.is_idle(BASE + 6 * 4096)
    assert snap.swapped_bytes == 2 * 4096


def test_non_lru_and_zero_pages_are_not_judged(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, kflags = env
    kflags[pfns[VFN0 + 3]] = 0                             # isolated / in a per-CPU batch: not on the LRU
    kflags[pfns[VFN0 + 4]] = 1 << KPF_ZERO_PAGE
    proc.set_kpageflags(kflags)
    with tracker(proc, sysfs) as t:
        t.mark_idle()
        snap = t.read()
    for i in (3, 4):
        st = snap.state_of(BASE + i * 4096)
        assert PageState.PRESENT in st and PageState.TRACKED not in st and not snap.is_idle(BASE + i * 4096)
    assert PageState.ZERO_PAGE in snap.state_of(BASE + 4 * 4096)


def test_hidden_pfns_are_a_permission_error(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, _ = env
    proc.set_pagemap({v: present(0) for v in pfns})      # what non-root sees: present, PFN 0
    with tracker(proc, sysfs) as t, pytest.raises(AccessDenied, match="CAP_SYS_ADMIN"):
        t.mark_idle()


def test_refuses_without_page_idle_naming_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + 4096, "rw-p", "")])
    from vmsight.idle.kfiles import KernelFiles
    (tmp_path / "emptysys").mkdir()
    with pytest.raises(BackendUnavailable, match="CONFIG_IDLE_PAGE_TRACKING") as ei:
        IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=KernelFiles(str(tmp_path / "emptysys")))
    assert ei.value.option == "CONFIG_IDLE_PAGE_TRACKING"


def test_kernel_thread_and_reuse_and_exit(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, _, _ = env
    proc.set_stat(flags=0x00208040, comm="kworker/0:1")
    with pytest.raises(KernelThread):
        tracker(proc, sysfs)
    proc.set_stat()
    t = tracker(proc, sysfs)
    t.mark_idle()
    proc.set_stat(start=9999)                            # a new process got the pid
    with pytest.raises(PidReused):
        t.read()
    t.close()
    proc.set_stat()
    t = tracker(proc, sysfs)
    t.mark_idle()
    proc.set_pagemap({})                                  # the mm is gone: pagemap reads EOF
    with pytest.raises(ProcessGone):
        t.read()
    t.close()


def test_words_match_an_independent_encoding(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, _ = env
    rng = np.random.default_rng(7)
    touched = set(rng.choice(N, 40, replace=False).tolist())
    with tracker(proc, sysfs) as t:
        t.mark_idle()
        for i in touched:
            sysfs.access(pfns[VFN0 + i])
        snap = t.read()
    expect = bytearray(N // 8)
    for i in range(N):
        if i not in touched:
            expect[i // 8] |= 1 << (i % 8)   # little-endian u64 words == byte-wise bit order
    assert snap.words(VFN0, VFN0 + N).astype("<u8").tobytes() == bytes(expect)


def _written_pfns(sysfs: FakePageIdleSys) -> set[int]:
    out = set()
    for off, data in sysfs.writes:
        for i, (w,) in enumerate(struct.iter_unpack("<Q", data)):
            out.update((off // 8 + i) * 64 + b for b in range(64) if w >> b & 1)
    return out


def test_read_and_mark_rewrites_only_what_was_not_idle(env) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs, pfns, kflags = env
    rng = [(BASE, BASE + N * 4096)]
    with tracker(proc, sysfs) as t:
        t.mark_idle(rng)
        for i in (1, 2, 70):
            sysfs.access(pfns[VFN0 + i])
        entries = {v: present(p) for v, p in pfns.items()}
        entries[VFN0 + 9] = present(0x9000)               # migrated during the interval: a new frame
        kflags[0x9000] = LRU
        proc.set_kpageflags(kflags)
        proc.set_pagemap(entries)
        sysfs.writes.clear()
        snap1 = t.read_and_mark(rng)
        # the read's verdicts are those of a plain read...
        assert set((snap1.pages(PageState.TRACKED, idle=False) - VFN0).tolist()) == {1, 2, 70}
        assert PageState.CHANGED in snap1.state_of(BASE + 9 * 4096)
        # ...and the re-mark wrote only the accessed pages and the new frame, not the 252 still marked
        assert _written_pfns(sysfs) == {pfns[VFN0 + 1], pfns[VFN0 + 2], pfns[VFN0 + 70], 0x9000}
        assert sysfs.idle >= set(pfns.values()) | {0x9000}
        for _ in range(3):                               # rounds of read_and_mark agree with the truth
            touched = set(np.random.default_rng(len(sysfs.writes)).choice(N, 17, replace=False).tolist())
            for i in touched:
                sysfs.access(entries[VFN0 + i] & ((1 << 55) - 1))
            snap = t.read_and_mark(rng)
            assert set((snap.pages(PageState.TRACKED, idle=False) - VFN0).tolist()) == touched
        assert t.read().count(PageState.TRACKED, idle=False) == 0


def test_read_and_mark_of_an_untouched_thp_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    base = 0x40000000
    proc.set_maps([(base, base + (2 << 20), "rw-p", "")])
    head = 0x2000
    proc.set_pagemap({(base >> 12) + i: present(head + i) for i in range(512)})
    kflags = thp_flags(head)
    proc.set_kpageflags(kflags)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        sysfs.writes.clear()
        assert t.read_and_mark().count(PageState.TRACKED, idle=True) == 512
        assert sysfs.writes == []
        sysfs.access(head)                              # the folio is touched
        assert t.read_and_mark().count(PageState.TRACKED, idle=False) == 512
        assert _written_pfns(sysfs) == {head}
        assert t.read().count(PageState.TRACKED, idle=True) == 512


def test_frames_beyond_the_bitmaps_end_are_not_tracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kpageflags covers whole memory sections; the bitmap stops at max_pfn (short write, then ENXIO)."""
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + N * 4096, "rw-p", "")])
    pfns = {VFN0 + i: 0x1000 + 64 * i for i in range(N)}             # one frame per bitmap word
    proc.set_pagemap({v: present(p) for v, p in pfns.items()})
    kflags = {p: LRU for p in pfns.values()}
    proc.set_kpageflags(kflags)
    limit = 0x1000 + 64 * 100                                          # frames 100.. lie beyond max_pfn
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags, max_pfn=limit)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        sysfs.access(pfns[VFN0 + 5])
        snap = t.read()
        tracked = set((snap.pages(PageState.TRACKED) - VFN0).tolist())
        assert tracked == set(range(100))
        assert set((snap.pages(PageState.TRACKED, idle=False) - VFN0).tolist()) == {5}
        assert all(off // 8 * 64 < limit for off, _ in sysfs.reads)  # once known, the end is not read again
        snap = t.read_and_mark()
        assert set((snap.pages(PageState.TRACKED) - VFN0).tolist()) == set(range(100))


def _thp_env(tmp_path: Path, n_thp: int) -> tuple[FakeProc, FakePageIdleSys, int, list[int]]:
    proc = FakeProc(tmp_path / "proc")
    base = 0x40000000
    proc.set_maps([(base, base + n_thp * (2 << 20), "rw-p", "")])
    heads = [0x2000 + 0x400 * i for i in range(n_thp)]              # 512-aligned, not adjacent
    proc.set_pagemap({(base >> 12) + 512 * k + i: present(h + i) for k, h in enumerate(heads) for i in range(512)})
    kflags: dict[int, int] = {}
    for h in heads:
        kflags.update(thp_flags(h))
    proc.set_kpageflags(kflags)
    return proc, FakePageIdleSys(tmp_path / "sys", kflags), base, heads


@pytest.mark.parametrize("regions_per_call", [256, 1])
def test_pmd_mapped_thps_need_only_their_heads_kpageflags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         regions_per_call: int) -> None:
    """With PAGEMAP_SCAN (v6.7+) a PMD-mapped THP costs one kpageflags block, not 512 entries; the verdicts
    are those of the general path. One region per call exercises the walk_end continuation."""
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    monkeypatch.setattr("vmsight.idle.page_idle.SCAN_REGIONS", regions_per_call)
    proc, sysfs, base, heads = _thp_env(tmp_path, 3)
    v0 = base >> 12
    proc.pmd_vfns = [(v0 + 512 * k, v0 + 512 * (k + 1)) for k in (0, 2)]  # THP 1 is PTE-mapped (no PMD)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        # heads' blocks for the PMD-mapped two, the whole folio for the PTE-mapped one
        assert proc.kpf_reads == 2 * 64 + 512
        assert _written_pfns(sysfs) == set(heads)
        sysfs.access(heads[2])
        snap = t.read()
    assert snap.count(PageState.HUGE) == 3 * 512
    assert set((snap.pages(PageState.TRACKED, idle=False) - v0).tolist()) == set(range(1024, 1536))
    assert snap.count(PageState.TRACKED, idle=True) == 1024


def test_pmd_mapped_range_that_split_meanwhile_is_read_page_by_page(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """PAGEMAP_SCAN said PMD-mapped, but kpageflags now shows 512 plain pages (split since): each page is its
    own folio again."""
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc, sysfs, base, heads = _thp_env(tmp_path, 1)
    split = {heads[0] + i: LRU for i in range(512)}
    proc.set_kpageflags(split)
    sysfs.kflags.clear()
    sysfs.kflags.update(split)
    proc.pmd_vfns = [(base >> 12, (base >> 12) + 512)]
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        assert _written_pfns(sysfs) == set(split)
        sysfs.access(heads[0] + 7)
        snap = t.read()
    assert set(((snap.pages(PageState.TRACKED, idle=False)) - (base >> 12)).tolist()) == {7}
    assert snap.count(PageState.HUGE) == 0


def test_frames_past_the_end_of_kpageflags_read_as_no_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kpageflags ends mid-block (a short read): the frames after its end are not tracked."""
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(BASE, BASE + 2 * 4096, "rw-p", "")])
    proc.set_pagemap({VFN0: present(0x100F), VFN0 + 1: present(0x1020)})
    kflags = {0x100F: LRU, 0x1020: LRU}
    proc.set_kpageflags({0x100F: LRU}, max_pfn=0x1010)
    sysfs = FakePageIdleSys(tmp_path / "sys", kflags)
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        t.mark_idle()
        snap = t.read()
    assert (snap.pages(PageState.TRACKED) - VFN0).tolist() == [0]
    assert PageState.PRESENT in snap.state_of(BASE + 4096)
