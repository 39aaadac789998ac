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
