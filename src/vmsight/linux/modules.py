"""Loaded kernel modules (the ``modules`` list): name, base, size, state, as ``/proc/modules`` shows.

``struct module`` described its memory with ``core_layout``/``init_layout`` (struct module_layout) until
v6.4 replaced them with ``mem[MOD_MEM_NUM_TYPES]`` (commit ac3b43283923 "module: replace module_layout
with module_memory"); the newer member is tried first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vmsight.errors import FieldNotFound, VmsightError
from vmsight.linux.lists import list_for_each
from vmsight.memory.virtual import cstr

log = logging.getLogger(__name__)

MAX_MODULES = 1 << 14
MODULE_STATES = {0: "Live", 1: "Coming", 2: "Going", 3: "Unformed"}   # enum module_state


class KernelMemory(Protocol):
    """What the module list needs of a :class:`~vmsight.linux.kernel.Kernel`: its memory, BTF offsets and
    symbols. A protocol, not the class: the Kernel looks module addresses up here (``Kernel.lookup``), so
    this module sits below kernel.py and must not import it."""

    @property
    def la57(self) -> bool: ...
    def read(self, gva: int, size: int) -> bytes: ...
    def read_u64(self, gva: int) -> int: ...
    def read_u32(self, gva: int) -> int: ...
    def symbol(self, name: str) -> int: ...
    def offsetof(self, struct: str, member: str) -> int: ...
    def member_size(self, struct: str, member: str) -> int: ...
    def sizeof(self, type_name: str) -> int: ...


@dataclass(frozen=True)
class Module:
    """``name``, ``base`` (gva of its text: what /proc/modules prints), ``size`` (bytes, the
    /proc/modules number), ``state``, ``gva`` of struct module, and the [start, end) ranges of its
    memory regions (for address -> module lookups)."""

    name: str
    base: int
    size: int
    state: str
    gva: int
    ranges: tuple[tuple[int, int], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "size": self.size, "state": self.state}

    def contains(self, gva: int) -> bool:
        return any(lo <= gva < hi for lo, hi in self.ranges)


def for_each_module(kernel: KernelMemory) -> Iterator[Module]:
    """The loaded modules, most recently loaded first (list order, like /proc/modules)."""
    o = kernel.offsetof
    list_off = o("module", "list")
    name_off = o("module", "name")
    name_size = kernel.member_size("module", "name")
    state_off = o("module", "state")
    head = kernel.symbol("modules")
    try:
        mem_off = o("module", "mem")
        mm_size = kernel.sizeof("module_memory")
        count = kernel.member_size("module", "mem") // mm_size
        base_off, size_off = o("module_memory", "base"), o("module_memory", "size")
        layouts = None
    except FieldNotFound:
        mem_off = None
        layouts = (o("module", "core_layout"), o("module", "init_layout"))
        base_off, size_off = o("module_layout", "base"), o("module_layout", "size")
    for node in list_for_each(kernel.read_u64, head, max_nodes=MAX_MODULES, la57=kernel.la57,
                              what="modules"):
        mod = node - list_off
        name = cstr(kernel.read(mod + name_off, name_size)).decode("utf-8", "surrogateescape")
        state = MODULE_STATES.get(kernel.read_u32(mod + state_off), "?")
        regions: list[tuple[int, int]] = []
        if mem_off is not None:
            for i in range(count):
                r = mod + mem_off + i * mm_size
                regions.append((kernel.read_u64(r + base_off), kernel.read_u32(r + size_off)))
        else:
            assert layouts is not None
            for lay in layouts:
                regions.append((kernel.read_u64(mod + lay + base_off), kernel.read_u32(mod + lay + size_off)))
        # The first region is MOD_TEXT (v6.4+) or core_layout (before): its base is what /proc prints.
        base = regions[0][0] if regions else 0
        size = sum(sz for _b, sz in regions)
        ranges = tuple((b, b + sz) for b, sz in regions if b and sz)
        yield Module(name, base, size, state, mod, ranges)


def module_at(kernel: KernelMemory, gva: int) -> Module | None:
    """The module whose memory contains ``gva``, or None."""
    try:
        for m in for_each_module(kernel):
            if m.contains(gva):
                return m
    except VmsightError as e:
        log.info("module list unreadable: %s", e)
    return None


def lsmod(kernel: KernelMemory) -> list[dict[str, Any]]:
    return [m.as_dict() for m in for_each_module(kernel)]


__all__ = ["KernelMemory", "Module", "for_each_module", "lsmod", "module_at"]
