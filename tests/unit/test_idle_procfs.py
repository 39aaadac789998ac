"""procfs parsing, range resolution, locking and the ABI helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_idle_fakes import LRU, FakePageIdleSys, FakeProc, lock_dir, present
from vmsight.idle import BadRange, IdleTracker, TrackerBusy
from vmsight.idle.abi import bits_at, pack_bits, pfn_bitmap_words, unpack_bits, word_runs
from vmsight.idle.procfs import parse_maps, parse_smaps, parse_stat


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
    pfns = np.array([1, 63, 64, 200, 1 << 40], np.uint64)
    w, v = pfn_bitmap_words(pfns)
    assert w.tolist() == [0, 1, 3, (1 << 40) // 64]
    assert int(v[0]) == (1 << 1) | (1 << 63) and int(v[1]) == 1 and int(v[2]) == 1 << 8
    assert bits_at(w, v, np.array([1, 2, 63, 64, 1 << 40], np.uint64)).tolist() == [True, False, True, True, True]
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
