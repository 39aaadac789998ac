"""procfs parsing, range resolution, locking and the ABI helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_idle_fakes import LRU, FakePageIdleSys, FakeProc, lock_dir, present
from vmsight.idle import BadRange, IdleTracker, TrackerBusy
from vmsight.idle.abi import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    PAGE_SHIFT,
    pack_bits,
    unpack_bits,
    word_runs,
)
from vmsight.idle.page_idle import _Frames, _unique_blocks
from vmsight.idle.procfs import Vma, parse_maps, parse_smaps, parse_stat
from vmsight.idle.result import IdleSegment, PageState, usage_from_segments


def test_parse_stat_with_odd_comm() -> None:
    st = parse_stat("77 (a) b (c)) R 1 77 77 0 -1 4194560 " + " ".join(["0"] * 12) + " 98765 0 0\n")
    assert st.comm == "a) b (c)" and st.state == "R" and st.flags == 4194560 and st.start_ticks == 98765


def test_parse_maps_and_kinds() -> None:
    vmas = parse_maps("55d0-55e0 rw-p 00000000 00:00 0 [heap]\n"
                      "7f00-7f10 r-xp 00001000 08:01 1234 /usr/lib/libc.so.6\n"
                      "7f20-7f30 rw-p 00000000 00:00 0 \n"
                      "7ffc-7ffd rw-p 00000000 00:00 0 [stack]\n"
                      "garbage\n")
    assert [v.kind for v in vmas] == ["heap", "file", "anon", "stack"]
    assert vmas[1].offset == 0x1000 and vmas[1].inode == 1234 and vmas[1].label == "/usr/lib/libc.so.6"
    assert vmas[2].label == "[anon]"


def test_parse_smaps() -> None:
    e = parse_smaps("1000-3000 rw-p 00000000 00:00 0\nRss:  8 kB\nReferenced:   4 kB\nVmFlags: rd wr\n"
                    "4000-5000 r--p 00000000 00:00 0 [vdso]\nRss: 4 kB\nReferenced: 0 kB\n")
    assert len(e) == 2 and e[0].bytes("Referenced") == 4096 and e[0].bytes("Rss") == 8192
    assert e[1].vma.name == "[vdso]"


def test_bit_helpers_roundtrip() -> None:
    rng = np.random.default_rng(1)
    flags = rng.random(640) < 0.3
    assert (unpack_bits(pack_bits(flags))[:640] == flags).all()
    # bit i of word i // 64 (little-endian words): the layout of both page_idle bitmaps
    words = pack_bits(np.isin(np.arange(256), [1, 63, 64, 200]))
    assert words.tolist() == [(1 << 1) | (1 << 63), 1, 0, 1 << 8]
    assert word_runs(np.array([0, 1, 2, 40, 41, 2000]), max_gap=8, max_len=512) == [(0, 3), (40, 2), (2000, 1)]
    assert word_runs(np.arange(1100), max_gap=1, max_len=512) == [(0, 512), (512, 512), (1024, 76)]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = FakeProc(tmp_path / "proc")
    proc.set_maps([(0x10000000, 0x10004000, "rw-p", "[heap]"), (0x20000000, 0x20002000, "r--p", "/lib/a.so"),
                   (0x20002000, 0x20003000, "---p", "/lib/a.so"), (0x30000000, 0x30001000, "rw-p", "")])
    proc.set_pagemap({0x10000: present(0x500)})
    proc.set_kpageflags({0x500: LRU})
    return proc, FakePageIdleSys(tmp_path / "sys", {0x500: LRU})


def test_resolve_names_and_intervals(setup) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs = setup
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs) as t:
        assert t.resolve("[heap]")[0] == [(0x10000, 0x10004)]
        assert t.resolve("/lib/a.so")[0] == [(0x20000, 0x20003)]
        assert t.resolve([(0x10000001, 0x10001001)])[0] == [(0x10000, 0x10002)]
        assert t.resolve(None)[0] == [(0x10000, 0x10004), (0x20000, 0x20002), (0x30000, 0x30001)]  # no PROT_NONE
        with pytest.raises(BadRange, match="/lib/a.so"):
            t.resolve("/nope")
        with pytest.raises(BadRange):
            t.resolve([(5, 5)])


def test_second_tracker_is_refused_while_the_first_holds_the_lock(setup) -> None:  # type: ignore[no-untyped-def]
    proc, sysfs = setup
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs):
        with pytest.raises(TrackerBusy) as ei:
            IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs)
        assert ei.value.holder_pid is not None
    with IdleTracker(proc.pid, "page_idle", proc=proc, sysfs=sysfs):  # released on close
        pass


def test_frames_index_pfns_by_block_and_find_heads() -> None:
    pfns = np.array([5, 70, 64 * 1000 + 3, 1 << 40], np.uint64)
    assert _unique_blocks(pfns[:3]).tolist() == [0, 1, 1000]
    words = np.array([0, 1, 1000], np.int64)
    flags = np.zeros(3 * 64, np.uint64)
    frames = _Frames(words, flags)
    assert frames.slots(pfns).tolist() == [5, 64 + 6, 128 + 3, -1]          # block 1 << 34 was not read
    assert frames.slots(np.array([64 * 2], np.uint64)).tolist() == [-1]      # nor was block 2
    assert frames.pfns(np.array([5, 70, 131])).tolist() == [5, 70, 64 * 1000 + 3]
    # a 512-page window from pfn 512: head at 512+8 (an order-3 folio), tails after it; pfn 512+2 is no tail
    words = np.arange(8, 16, dtype=np.int64)
    flags = np.zeros(512, np.uint64)
    flags[8] = 1 << KPF_COMPOUND_HEAD
    flags[9:16] = 1 << KPF_COMPOUND_TAIL
    frames = _Frames(words, flags)
    tail_pfns = np.array([512 + 9, 512 + 15, 512 + 2], np.uint64)
    assert frames.head_slots(frames.slots(tail_pfns), tail_pfns).tolist() == [8, 8, -1]
    # a head in the window below does not count: the next window (pfn 1024..) starts with tails
    words = np.arange(8, 24, dtype=np.int64)
    flags = np.zeros(1024, np.uint64)
    flags[8] = 1 << KPF_COMPOUND_HEAD
    flags[512:520] = 1 << KPF_COMPOUND_TAIL
    frames = _Frames(words, flags)
    tail_pfns = np.array([1024 + 3], np.uint64)
    assert frames.head_slots(frames.slots(tail_pfns), tail_pfns).tolist() == [-1]


def test_usage_counts_each_vma_once_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    seg_a, seg_b = IdleSegment.empty(0, 640), IdleSegment.empty(1024, 320)
    for s in (seg_a, seg_b):
        s.state[:] = rng.choice([0, PageState.PRESENT, PageState.PRESENT | PageState.TRACKED,
                                 PageState.PRESENT | PageState.TRACKED | PageState.HUGE, PageState.SWAPPED],
                                s.nr_pages)
        s.set_idle(rng.random(s.nr_pages) < 0.5)
    spans = [(0, 10), (10, 11), (20, 600), (630, 1100), (1100, 1344), (2000, 2100)]
    vmas = [Vma(lo << PAGE_SHIFT, hi << PAGE_SHIFT, "rw-p", 0, "00:00", 0, "") for lo, hi in reversed(spans)]
    usage = usage_from_segments(vmas, [seg_a, seg_b])
    for u in usage:
        lo, hi = u.vma.start_gva >> PAGE_SHIFT, u.vma.end_gva >> PAGE_SHIFT
        present = accessed = idle_n = swapped = 0
        for s in (seg_a, seg_b):
            idle = s.idle_pages()
            for vfn in range(max(lo, s.start_vfn), min(hi, s.end_vfn)):
                st, i = PageState(int(s.state[vfn - s.start_vfn])), bool(idle[vfn - s.start_vfn])
                present += PageState.PRESENT in st
                accessed += PageState.PRESENT in st and PageState.TRACKED in st and not i
                idle_n += PageState.PRESENT in st and PageState.TRACKED in st and i
                swapped += PageState.SWAPPED in st
        assert (u.present_bytes, u.accessed_bytes, u.idle_bytes, u.swapped_bytes) == \
            (present * 4096, accessed * 4096, idle_n * 4096, swapped * 4096), (lo, hi)
    assert usage[0].present_bytes == 0 and usage[-1].present_bytes > 0        # (2000, 2100) lies in no segment
