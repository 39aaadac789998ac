"""Maple-tree walker (vmsight.linux.mm.mt_entries) on hand-built trees and on adversarial memory.

The builder below follows include/linux/maple_tree.h on its own (node = 256 bytes; range64/leaf64:
parent, 15 pivots, 16 slots, metadata end byte at 248; arange64: parent, 9 pivots, 10 slots, 10 gaps,
metadata at 240; a child slot holds node | type << 3 | MAPLE_ENODE_NULL (0x4) (mt_mk_node), the root
additionally has MAPLE_ROOT_NODE (0x2) (mte_mk_root) — a real 6.1 guest showed children like ...80c), so the
walker is checked against
what was built, not against itself."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsight.errors import VmsightError
from vmsight.linux.mm import MAPLE_ARANGE_64, MAPLE_LEAF_64, mt_entries

BASE = 0xFFFF888000100000
ULONG_MAX = (1 << 64) - 1


class Mem:
    """Sparse kernel memory: 256-byte nodes at BASE + 256*i."""

    def __init__(self, base: int = BASE) -> None:
        self.base = base
        self.nodes: dict[int, bytearray] = {}
        self.reads = 0

    def alloc(self) -> int:
        gva = self.base + 0x100 * len(self.nodes)
        self.nodes[gva] = bytearray(256)
        return gva

    def read(self, gva: int, size: int) -> bytes:
        self.reads += 1
        node = gva & ~0xFF
        if node not in self.nodes or gva + size > node + 256:
            raise VmsightError(f"unmapped {gva:#x}")
        off = gva - node
        return bytes(self.nodes[node][off:off + size])


def enc(node: int, ntype: int) -> int:
    """mt_mk_node(): the encoding stored in a parent's slot."""
    return node | (ntype << 3) | 4


def mk_root(enode: int) -> int:
    """mte_mk_root(): what mm->mm_mt.ma_root holds."""
    return enode | 2


def leaf(mem: Mem, entries: list[tuple[int, int]], parent: int = 0) -> int:
    """A leaf_64 node holding (pivot, entry) pairs; returns the node gva."""
    n = mem.alloc()
    buf = mem.nodes[n]
    struct.pack_into("<Q", buf, 0, parent | 1)
    for i, (piv, entry) in enumerate(entries):
        if i < 15:
            struct.pack_into("<Q", buf, 8 + 8 * i, piv)
        struct.pack_into("<Q", buf, 128 + 8 * i, entry)
    buf[248] = len(entries) - 1
    return n


def arange(mem: Mem, children: list[tuple[int, int]]) -> int:
    """An arange_64 node with (pivot, encoded child) pairs."""
    n = mem.alloc()
    buf = mem.nodes[n]
    struct.pack_into("<Q", buf, 0, 1)
    for i, (piv, child) in enumerate(children):
        if i < 9:
            struct.pack_into("<Q", buf, 8 + 8 * i, piv)
        struct.pack_into("<Q", buf, 80 + 8 * i, child)
    buf[240] = len(children) - 1
    return n


def vma_tree(mem: Mem, ranges: list[tuple[int, int]], per_leaf: int = 6) -> tuple[int, list[tuple[int, int, int]]]:
    """A two-level tree like an mm's: leaves alternate gaps (NULL) and VMAs. Returns (root, expected)."""
    expected: list[tuple[int, int, int]] = []
    leaves: list[tuple[int, int]] = []
    chunk: list[tuple[int, int]] = []
    prev_end = 0
    vma_gva = 0xFFFF888001000000
    for i, (start, end) in enumerate(ranges):
        if start > prev_end:
            chunk.append((start - 1, 0))          # the gap before the VMA
        entry = vma_gva + 0x100 * i
        chunk.append((end - 1, entry))
        expected.append((start, end - 1, entry))
        prev_end = end
        last = i == len(ranges) - 1
        if len(chunk) >= per_leaf or last:
            if last:
                chunk.append((ULONG_MAX, 0))      # the tail gap up to the node's max
            leaves.append((chunk[-1][0], enc(leaf(mem, chunk), MAPLE_LEAF_64)))
            chunk = []
    if len(leaves) == 1:
        return mk_root(leaves[0][1]), expected
    return mk_root(enc(arange(mem, leaves), MAPLE_ARANGE_64)), expected


def test_two_level_tree_yields_every_vma_in_order() -> None:
    mem = Mem()
    ranges = [(0x400000 + i * 0x3000, 0x400000 + i * 0x3000 + 0x1000) for i in range(20)]
    root, expected = vma_tree(mem, ranges)
    got = list(mt_entries(mem.read, root, la57=False))
    assert got == expected


def test_single_leaf_root_and_empty_tree() -> None:
    mem = Mem()
    root, expected = vma_tree(mem, [(0x1000, 0x2000), (0x5000, 0x9000)], per_leaf=16)
    assert list(mt_entries(mem.read, root, la57=False)) == expected
    assert list(mt_entries(mem.read, 0, la57=False)) == []


def test_cycle_is_detected() -> None:
    mem = Mem()
    child = enc(leaf(mem, [(0x1000, 0xFFFF888001000000), (ULONG_MAX, 0)]), MAPLE_LEAF_64)
    root_node = arange(mem, [(0x1000, child), (ULONG_MAX, 0)])
    root = mk_root(enc(root_node, MAPLE_ARANGE_64))
    # Make the second child point back at the root: a revisit must be reported, not looped on.
    struct.pack_into("<Q", mem.nodes[root_node], 80 + 8, enc(root_node, MAPLE_ARANGE_64))
    with pytest.raises(VmsightError, match="twice|cycle"):
        list(mt_entries(mem.read, root, la57=False))


def test_dead_node_and_bad_type_raise() -> None:
    mem = Mem()
    n = leaf(mem, [(0x1000, 0xFFFF888001000000), (ULONG_MAX, 0)])
    struct.pack_into("<Q", mem.nodes[n], 0, n)          # parent == self: ma_dead_node
    with pytest.raises(VmsightError, match="dead"):
        list(mt_entries(mem.read, mk_root(enc(n, MAPLE_LEAF_64)), la57=False))
    with pytest.raises(VmsightError, match="type"):
        list(mt_entries(mem.read, mk_root(enc(n, 0)), la57=False))           # maple_dense is never used by VMA trees


def test_pivots_out_of_order_raise() -> None:
    mem = Mem()
    n = leaf(mem, [(0x5000, 0xFFFF888001000000), (0x1000, 0xFFFF888001000100), (ULONG_MAX, 0)])
    with pytest.raises(VmsightError, match="pivot"):
        list(mt_entries(mem.read, mk_root(enc(n, MAPLE_LEAF_64)), la57=False))


def test_user_pointer_child_rejected() -> None:
    mem = Mem()
    root = arange(mem, [(0x1000, enc(0x7F0000001000, MAPLE_LEAF_64)), (ULONG_MAX, 0)])
    with pytest.raises(VmsightError, match="not a node pointer|kernel address"):
        list(mt_entries(mem.read, mk_root(enc(root, MAPLE_ARANGE_64)), la57=False))


def test_la57_nodes_accepted_in_5_level_mode_only() -> None:
    """Nodes in a 5-level guest's direct map (0xff11... + KASLR): valid there, non-canonical in 4-level."""
    mem = Mem(base=0xFF3E3B6581200000)
    ranges = [(0x7F0000000000 + i * 0x3000, 0x7F0000000000 + i * 0x3000 + 0x1000) for i in range(20)]
    root, expected = vma_tree(mem, ranges)
    assert list(mt_entries(mem.read, root, la57=True)) == expected
    with pytest.raises(VmsightError, match="not a kernel address|not a node pointer"):
        list(mt_entries(mem.read, root, la57=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_adversarial_memory_only_typed_errors(data: st.DataObject) -> None:
    """Random corruption of a valid tree: the walk ends (bounded) with entries or a VmsightError."""
    mem = Mem()
    ranges = [(0x400000 + i * 0x3000, 0x400000 + i * 0x3000 + 0x1000) for i in range(30)]
    root, _ = vma_tree(mem, ranges, per_leaf=5)
    nodes = list(mem.nodes)
    for _ in range(data.draw(st.integers(1, 12))):
        node = data.draw(st.sampled_from(nodes))
        off = data.draw(st.integers(0, 255 - 8))
        if data.draw(st.booleans()):
            # a pointer-like value: another node (encoded with any type), itself, or junk
            val = data.draw(st.one_of(
                st.sampled_from([enc(n, t) for n in nodes for t in range(4)]),
                st.integers(0, (1 << 64) - 1)))
            struct.pack_into("<Q", mem.nodes[node], off & ~7, val)
        else:
            mem.nodes[node][off] = data.draw(st.integers(0, 255))
    try:
        out = list(mt_entries(mem.read, root, max_entries=10_000, la57=False))
    except VmsightError:
        return
    # Whatever came out is bounded and ordered.
    assert len(out) <= 10_000
    assert mem.reads <= len(nodes) + 1
    for (lo, hi, _e) in out:
        assert lo <= hi


def test_one_vma_class_for_guest_and_host_maps() -> None:
    """linux.mm.Vma is also idle's procfs.Vma: a parsed maps line and a guest VMA agree on every view."""
    from vmsight.idle.procfs import Vma as ProcfsVma
    from vmsight.idle.procfs import parse_maps
    from vmsight.linux.mm import Vma

    assert ProcfsVma is Vma
    (host,) = parse_maps("7f0000001000-7f0000003000 r-xp 00002000 08:01 1234 /usr/lib/libc.so.6\n")
    guest = Vma(0x7F0000001000, 0x7F0000003000, "r-xp", 0x2000, name="/usr/lib/libc.so.6", flags=0x75,
                file=0xFFFF888000001000, gva=0xFFFF888000002000)
    assert (host.start, host.end, host.path, host.dev, host.inode) == (guest.start_gva, guest.end_gva, guest.name,
                                                                       "08:01", 1234)
    assert host.maps_line() == guest.maps_line() == "7f0000001000-7f0000003000 r-xp 00002000 /usr/lib/libc.so.6"
    assert host.as_dict() == guest.as_dict() == {"start": 0x7F0000001000, "end": 0x7F0000003000, "perms": "r-xp",
                                                 "offset": 0x2000, "path": "/usr/lib/libc.so.6"}
    assert (guest.kind, guest.label, guest.size) == ("file", "/usr/lib/libc.so.6", 0x2000)
    assert Vma.from_json(guest.to_json()) == Vma(0x7F0000001000, 0x7F0000003000, "r-xp", 0x2000,
                                                 name="/usr/lib/libc.so.6")   # the record keeps no gvas
    assert Vma.from_json(host.to_json()) == host
    assert [Vma(1, 2, "rw-p", 0, name=n).label for n in ("", "[heap]", "[stack]", "[vdso]")] == \
        ["[anon]", "[heap]", "[stack]", "[vdso]"]
