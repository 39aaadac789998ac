"""``Tracker``: what every idle tracker offers — :class:`vmsight.idle.IdleTracker` (a host process, over
page_idle, DAMON or clear_refs) and :class:`vmsight.idle.guest.GuestIdleTracker` (a process inside a VM, from
its page tables). Reports and the CLI use only this."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from vmsight.idle.procfs import Vma
from vmsight.idle.result import IdleSnapshot

# A range spec: a VMA name ("[heap]", "[anon]", a file path), a (start_gva, end_gva) pair (end exclusive), a Vma.
RangeSpec = str | tuple[int, int] | Vma
Ranges = RangeSpec | Sequence[RangeSpec] | None   # None: every mapped VMA


@runtime_checkable
class Tracker(Protocol):
    """Idle page tracking of one process: ``mark_idle`` starts an interval, ``read`` ends it."""

    @property
    def pid(self) -> int: ...

    @property
    def comm(self) -> str: ...

    @property
    def backend_name(self) -> str: ...

    @property
    def reason(self) -> str:
        """Why this backend (the choice among those available, or what it reads)."""
        ...

    @property
    def granularity(self) -> str:
        """"page", "region" or "vma"."""
        ...

    @property
    def approximate(self) -> bool: ...

    def vmas(self) -> list[Vma]: ...

    def mark_idle(self, ranges: Ranges = None) -> None: ...

    def read(self, ranges: Ranges = None) -> IdleSnapshot: ...

    def read_and_mark(self, ranges: Ranges = None) -> IdleSnapshot:
        """``read()`` of what was marked, then ``mark_idle(ranges)``: end this interval and start the next."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Tracker: ...

    def __exit__(self, *exc: object) -> None: ...


__all__ = ["Tracker", "RangeSpec", "Ranges"]
