"""clear_refs backend on a synthetic /proc: the exact clear_refs writes and what the snapshot claims, for a kernel
without and with CONFIG_MEM_SOFT_DIRTY (issue 9: writing "4" flushes the TLB, but with soft-dirty it would also
reset the process's soft-dirty bits, so there the tracker must not write it and must call its counts lower bounds).
The real kernel's side is tests/unit/test_idle_host.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.unit.test_idle_fakes import FakeProc, lock_dir, present
from vmsight.idle import IdleTracker, PageState
from vmsight.idle.abi import PM_PRESENT, PM_SOFT_DIRTY
from vmsight.idle.clear_refs import LOWER_BOUND

BASE = 0x10000000
N = 16


class ClearRefsProc(FakeProc):
    """Records clear_refs writes; this process's own pagemap answers with or without the soft-dirty bit."""

    def __init__(self, root: Path, soft_dirty: bool | None) -> None:
        super().__init__(root)
        self.soft_dirty = soft_dirty
        self.clear_refs: list[str] = []
        Path(self.path(f"{self.pid}/clear_refs")).touch()
        self.set_maps([(BASE, BASE + N * 4096, "rw-p", "")])
        self.set_pagemap({(BASE >> 12) + i: present(0x1000 + i) for i in range(N)})
        Path(self.path(f"{self.pid}/smaps")).write_text(
            f"{BASE:x}-{BASE + N * 4096:x} rw-p 00000000 00:00 0\nRss: {N * 4} kB\nReferenced: 0 kB\n")

    def write_text(self, rel: str, text: str) -> None:
        if rel.endswith("/clear_refs"):
            self.clear_refs.append(text)
        super().write_text(rel, text)

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        if rel == "self/pagemap":
            if self.soft_dirty is None:
                raise FileNotFoundError(rel)
            return struct.pack("<Q", PM_PRESENT | (PM_SOFT_DIRTY if self.soft_dirty else 0) | 0x1234)
        return super().pread(rel, offset, size)


@pytest.mark.parametrize("soft_dirty", [False, True, None])
def test_flushes_only_where_it_disturbs_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             soft_dirty: bool | None) -> None:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", lock_dir(tmp_path))
    proc = ClearRefsProc(tmp_path / "proc", soft_dirty)
    with IdleTracker(proc.pid, "clear_refs", proc=proc) as t:
        t.mark_idle([(BASE, BASE + N * 4096)])
        snap = t.read()
    idle_vma = snap.state_of(BASE)
    if soft_dirty is False:    # "4" is a pure TLB flush there: exact
        assert proc.clear_refs == ["1\n", "4\n"]
        assert not snap.approximate and LOWER_BOUND not in snap.warnings
        assert PageState.TRACKED in idle_vma and PageState.APPROXIMATE not in idle_vma
    else:                      # soft-dirty kernel, or unknown: never reset soft-dirty; counts are lower bounds
        assert proc.clear_refs == ["1\n"]
        assert snap.approximate and LOWER_BOUND in snap.warnings
        assert PageState.TRACKED in idle_vma and PageState.APPROXIMATE in idle_vma
    assert snap.is_idle(BASE) and snap.count(PageState.TRACKED, idle=True) == N
