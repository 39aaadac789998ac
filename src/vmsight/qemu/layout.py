"""QEMU's view of guest RAM (:class:`vmsight.memory.layout.RamLayout`): which guest-physical ranges are RAM, and
where each sits in the RAM block.

Parsed from HMP ``info mtree -f`` (flat view of the system address space) instead of hard-coding
the pc/q35 split: lines such as ``0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000``
say the range is backed by RAM block ``pc.ram`` at that offset."""

from __future__ import annotations

import re

from vmsight.memory.layout import RamLayout, RamRange

_MTREE_LINE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio [-0-9]+, (?P<kind>[a-z ]+)\): (?P<name>\S+)"
    r"(?: @(?P<offset>[0-9a-f]+))?",
)


def parse_mtree(text: str) -> RamLayout:
    """Parse ``info mtree -f`` output; only the ``memory`` (system) address space view counts."""
    ranges: list[RamRange] = []
    roms: list[RamRange] = []
    in_system = False
    for line in text.splitlines():
        if line.startswith(" AS \"") or line.startswith("AS \""):
            if '"memory"' in line or '"cpu-memory-0"' in line:
                in_system = True
            continue
        if line.startswith("FlatView"):
            if ranges:
                break  # the first flat view serving system memory is complete
            in_system = False
            continue
        if not in_system:
            continue
        m = _MTREE_LINE.match(line)
        if not m or m.group("kind").strip() not in ("ram", "rom"):
            continue
        start, end = int(m.group("start"), 16), int(m.group("end"), 16)
        offset = int(m.group("offset"), 16) if m.group("offset") else 0
        r = RamRange(start, end - start + 1, offset, m.group("name"))
        (ranges if m.group("kind").strip() == "ram" else roms).append(r)
    # Shadowed BIOS areas are "rom" views of the RAM block itself: plain memory, no device behind them.
    # Separate ROM blocks (pc.bios) are left out.
    blocks = {r.block for r in ranges}
    return RamLayout(_merge(ranges + [r for r in roms if r.block in blocks]))


def _merge(ranges: list[RamRange]) -> list[RamRange]:
    """Join ranges that are contiguous both in gpa and in the same block's offsets."""
    out: list[RamRange] = []
    for r in sorted(ranges, key=lambda r: r.gpa):
        if out and out[-1].end == r.gpa and out[-1].block == r.block and out[-1].offset + out[-1].size == r.offset:
            p = out.pop()
            r = RamRange(p.gpa, p.size + r.size, p.offset, p.block)
        out.append(r)
    return out
