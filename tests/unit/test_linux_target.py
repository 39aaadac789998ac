"""One owner of the kernel per target: kernel_of discovers once per target, paused_kernel gives it inside one
pause and drops the translations of a kernel found before (a target read live never resumes through us)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vmsight.linux import kernel as K


class FakeTarget:
    def __init__(self) -> None:
        self.depth = 0
        self.pauses = 0

    @contextmanager
    def paused(self) -> Iterator[FakeTarget]:
        if self.depth == 0:
            self.pauses += 1
        self.depth += 1
        try:
            yield self
        finally:
            self.depth -= 1


class FakeKernel:
    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.found_paused = target.depth > 0
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1


def test_one_kernel_per_target_in_one_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    found: list[FakeKernel] = []

    def discover(vm: FakeTarget) -> FakeKernel:
        found.append(FakeKernel(vm))
        return found[-1]

    monkeypatch.setattr(K, "discover", discover)
    vm, other = FakeTarget(), FakeTarget()
    with K.paused_kernel(vm) as k:            # type: ignore[arg-type]
        assert vm.depth == 1 and k.found_paused
    assert vm.pauses == 1 and k.invalidations == 0   # fresh from discovery: nothing to drop
    with K.paused_kernel(vm) as k2:           # type: ignore[arg-type]
        assert k2 is k and vm.depth == 1
    assert vm.pauses == 2 and k.invalidations == 1 and len(found) == 1
    assert K.kernel_of(vm) is k and K.kernel_of(other) is not k and len(found) == 2   # type: ignore[arg-type]


def test_ram_scans_see_matches_across_chunks_and_release_their_views() -> None:
    """The discovery scans (token-table digits, _text copies) share one chunker: a pattern straddling its
    16 MiB boundary is found, u64 hits stay 8-aligned, and no view outlives the scan (the RAM can be resized)."""
    from vmsight.memory.physical import BufferRam

    buf = bytearray(40 << 20)
    edge = 16 << 20
    buf[edge - 3:edge + 5] = b"ABCDEFGH"               # across the first chunk boundary
    buf[(32 << 20) + 8:(32 << 20) + 16] = (0xFFFFFFFF81000000).to_bytes(8, "little")
    buf[100:108] = (0xFFFFFFFF81000000).to_bytes(8, "little")   # unaligned copy: not a hit
    ram = BufferRam(buf)
    views: list[memoryview] = []

    class Tracked:                      # the backend, counting the views the scans take
        layout = ram.layout

        def view(self, gpa: int, size: int) -> memoryview:
            views.append(ram.view(gpa, size))
            return views[-1]

        def read_gpa(self, gpa: int, size: int) -> bytes:
            return ram.read_gpa(gpa, size)

    tracked = Tracked()
    assert K._pattern_hits(tracked, 0, len(buf), b"ABCDEFGH") == [edge - 3]  # type: ignore[arg-type]
    assert K._pattern_hits(tracked, 0, len(buf), b"ABCDEFGH", limit=1) == [edge - 3]  # type: ignore[arg-type]
    assert K._u64_hits(tracked, 0, len(buf), 0xFFFFFFFF81000000) == [(32 << 20) + 8]  # type: ignore[arg-type]
    assert K._u64_hits(tracked, 0, 7, 0) == []                  # type: ignore[arg-type]  # less than one u64
    assert K._u64_hits(ram, 0, len(buf), 0xFFFFFFFF81000000) == [(32 << 20) + 8]
    assert len(views) == 3 + 1 + 3
    for v in views:                     # every view was released, also after the early stop (limit=1)
        with pytest.raises(ValueError):
            _ = v.nbytes
