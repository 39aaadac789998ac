"""Guest RAM layout: which guest-physical ranges are RAM, and where each sits in the block (a file, a memfd, a
dump's segment) that holds it. Filled from QEMU's ``info mtree -f`` (:func:`vmsight.qemu.layout.parse_mtree`)
or from a memory dump's segments."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from vmsight.errors import PhysicalAddressError


@dataclass(frozen=True)
class RamRange:
    """``size`` bytes of guest RAM at ``gpa``, stored at ``offset`` inside RAM block ``block``."""

    gpa: int
    size: int
    offset: int
    block: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RamLayout:
    """Sorted, non-overlapping RAM ranges of one guest."""

    def __init__(self, ranges: list[RamRange]) -> None:
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.ranges]

    def __iter__(self) -> Iterator[RamRange]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def end_gpa(self) -> int:
        return self.ranges[-1].end if self.ranges else 0

    def find(self, gpa: int) -> RamRange | None:
        """The range containing ``gpa``, or None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.ranges[i].end:
            return self.ranges[i]
        return None

    def check(self, gpa: int, size: int) -> None:
        """Raise PhysicalAddressError unless [gpa, gpa+size) lies inside RAM (may span adjacent ranges)."""
        pos, end = gpa, gpa + size
        if size < 0 or gpa < 0:
            raise PhysicalAddressError(gpa, size, "negative")
        while pos < end:
            r = self.find(pos)
            if r is None:
                raise PhysicalAddressError(gpa, size)
            pos = r.end

    def pieces(self, gpa: int, size: int) -> Iterator[tuple[RamRange, int, int]]:
        """Split [gpa, gpa+size) into (range, gpa, length) pieces; raises if any byte is not RAM."""
        self.check(gpa, size)
        pos, end = gpa, gpa + size
        while pos < end:
            r = self.find(pos)
            assert r is not None
            n = min(end, r.end) - pos
            yield r, pos, n
            pos += n

    def to_json(self) -> list[dict[str, int | str]]:
        return [{"gpa": r.gpa, "size": r.size, "offset": r.offset, "block": r.block} for r in self.ranges]

    @classmethod
    def from_json(cls, data: list[dict[str, int | str]]) -> RamLayout:
        return cls([RamRange(int(d["gpa"]), int(d["size"]), int(d["offset"]), str(d["block"])) for d in data])


__all__ = ["RamLayout", "RamRange"]
