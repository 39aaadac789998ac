"""Page access restriction (vmsight.kvmi.pages) on synthetic page tables: the reverse walk finds every alias of
a GPA (direct map as 1 GiB/2 MiB pages, image, vmalloc 4 KiB, several user roots) and nothing else; it is bounded
on cyclic and huge trees; the v6 access-bit semantics; what each accelerator can enforce."""

from __future__ import annotations

import struct

import pytest

from tests.unit.pagetables import GB1, KB4, MB2, RW, P, PageTables
from vmsight.events.dispatcher import accelerator_capabilities
from vmsight.kvmi.pages import (
    ACCESS_ALL,
    ACCESS_R,
    ACCESS_W,
    ACCESS_X,
    AccessTable,
    Alias,
    find_aliases,
    unsupported_reason,
)

DIRECT = 0xFFFF_8880_0000_0000
IMAGE = 0xFFFF_FFFF_8100_0000
VMALLOC = 0xFFFF_C900_0000_0000
TARGET = 0x0034_5000          # the page under test
OTHER = 0x0050_0000


def _tree() -> tuple[PageTables, list[PageTables]]:
    pt = PageTables(64 << 20)
    pt.map(DIRECT, 0, GB1, flags=P | RW)                      # direct map of all RAM, one 1 GiB page
    pt.map(IMAGE, 0x20_0000, MB2, flags=P | RW)               # image: 2 MiB at gpa 2 MiB (holds TARGET)
    pt.map(VMALLOC + 0x7000, TARGET, KB4, flags=P | RW)       # a vmalloc alias
    pt.map(VMALLOC + 0x8000, OTHER, KB4, flags=P | RW)
    users = []
    for i, gva in enumerate((0x7F00_0000_0000, 0x40_0000)):
        u = pt.with_root(pt.alloc_table())
        u.map(gva + i * KB4, TARGET)
        u.map(gva + 0x10_0000, OTHER)
        users.append(u)
    return pt, users


def _kernel_half_copy(pt: PageTables, users: list[PageTables]) -> None:
    # Linux copies the kernel half's top-level entries into every mm's PGD; the walk must not report
    # those aliases once per root (the kernel half is walked once, under init_top_pgt).
    for u in users:
        for i in range(256, 512):
            u.put(u.root + i * 8, pt.get(pt.root + i * 8))


def test_every_alias_found_and_nothing_else() -> None:
    pt, users = _tree()
    _kernel_half_copy(pt, users)
    rmap = find_aliases(pt.mem, pt.root, [u.root for u in users], [TARGET + 0x123], la57=False)
    got = sorted(rmap.aliases[TARGET], key=lambda a: a.gva)
    want = sorted([
        Alias(DIRECT + TARGET, TARGET, None),
        Alias(IMAGE + TARGET - 0x20_0000, TARGET, None),
        Alias(VMALLOC + 0x7000, TARGET, None),
        Alias(0x40_0000 + KB4, TARGET, users[1].root),
        Alias(0x7F00_0000_0000, TARGET, users[0].root),
    ], key=lambda a: a.gva)
    assert got == want
    assert rmap.truncated == [] and rmap.roots == 3
    assert find_aliases(pt.mem, pt.root, [], [], la57=False).aliases == {}


def test_several_pages_in_one_large_page() -> None:
    pt, _ = _tree()
    pages = [0x20_0000, 0x3F_F000, 0x40_0000]   # first and last page of the image's 2 MiB, one past it
    rmap = find_aliases(pt.mem, pt.root, [], pages, la57=False)
    img = {p: sorted(a.gva for a in rmap.aliases[p] if a.gva >= IMAGE) for p in pages}
    assert img == {0x20_0000: [IMAGE], 0x3F_F000: [IMAGE + 0x1F_F000], 0x40_0000: []}
    assert all(any(a.gva == DIRECT + p for a in rmap.aliases[p]) for p in pages)


def test_cyclic_tables_are_bounded() -> None:
    pt = PageTables(16 << 20)
    # every PML4 entry points back at the PML4 itself: an unbounded walker would read 512^4 tables
    for i in range(512):
        pt.put(pt.root + i * 8, pt.root | P | RW)
    rmap = find_aliases(pt.mem, pt.root, [pt.root, pt.root], [TARGET], la57=False, max_tables=300)
    assert rmap.truncated and "300" in rmap.truncated[0]
    assert rmap.roots == 2     # the user root (deduplicated) was still tried, with its own budget


def test_huge_tree_is_bounded_per_page_and_roots() -> None:
    pt = PageTables(64 << 20)
    for i in range(40):
        pt.map(VMALLOC + i * KB4, TARGET, KB4, flags=P | RW)    # 40 mappings of one page
    rmap = find_aliases(pt.mem, pt.root, [KB4 * k for k in range(1, 11)], [TARGET], la57=False,
                        max_aliases=16, max_roots=3)
    assert len(rmap.aliases[TARGET]) == 16
    assert any("more than 16" in t for t in rmap.truncated)
    assert any("only the first 3" in t for t in rmap.truncated)
    assert sum("more than" in t for t in rmap.truncated) == 1     # noted once


def test_la57_kernel_half() -> None:
    pt = PageTables(16 << 20, la57=True)
    gva = 0xFF11_0000_0000_0000
    pt.map(gva + TARGET, TARGET, KB4, flags=P | RW)
    rmap = find_aliases(pt.mem, pt.root, [], [TARGET], la57=True)
    assert [a.gva for a in rmap.aliases[TARGET]] == [gva + TARGET]


def test_access_table_semantics() -> None:
    t = AccessTable()
    assert t.get(0x1234) == ACCESS_ALL and len(t) == 0
    t.set(0x1234, ACCESS_R | ACCESS_X)                       # remove W
    assert t.get(0x1000) == t.get(0x1FFF) == ACCESS_R | ACCESS_X
    assert t.restricted() == {0x1000: ACCESS_R | ACCESS_X}
    t.set(0x1000, 0)
    assert t.get(0x1000) == 0
    t.set(0x1000, ACCESS_ALL)                                # rwx forgets the restriction
    assert len(t) == 0 and t.get(0x1000) == ACCESS_ALL


@pytest.mark.parametrize(("kvm", "access", "supported"), [
    (False, ACCESS_R | ACCESS_X, True),          # TCG: W removal
    (False, ACCESS_X, True),                     # TCG: R and W removal
    (False, ACCESS_R | ACCESS_W, False),         # X removal: no execute watch anywhere
    (False, ACCESS_ALL, True),
    (True, ACCESS_R | ACCESS_X, False),          # KVM: a 4 KiB page does not fit 4 x 8-byte registers
    (True, ACCESS_W | ACCESS_X, False),
    (True, ACCESS_ALL, True),                    # giving rights back always works
])
def test_what_each_accelerator_enforces(kvm: bool, access: int, supported: bool) -> None:
    reason = unsupported_reason(accelerator_capabilities(kvm), access)
    assert (reason is None) is supported, reason


def test_idt_gate_frame_and_idtr_decoding() -> None:
    from vmsight.kvmi.int3 import Frame, Gate, idt_bases

    # asm_exc_int3 at 0xffffffff81a01234, selector 0x10, IST 0, present DPL-3 interrupt gate (0xee)
    off = 0xFFFF_FFFF_81A0_1234
    raw = struct.pack("<HHBBHII", off & 0xFFFF, 0x10, 0, 0xEE, off >> 16 & 0xFFFF, off >> 32, 0)
    assert Gate.decode(raw) == Gate(off, 0x10, 0, 0xE, 3, True)
    assert Gate.decode(raw[:4] + b"\x02" + raw[5:]).ist == 2
    with pytest.raises(ValueError):
        Gate.decode(raw[:15])
    f = Frame.decode(struct.pack("<5Q", 0x401001, 0x33, 0x246, 0x7FFF_0000, 0x2B))
    assert f == Frame(0x401001, 0x33, 0x246, 0x7FFF_0000, 0x2B)
    text = "CPU#0\nIDT=     fffffe0000000000 00000fff\nCPU#1\nIDT=     fffffe0000000000 00000fff\n"
    assert idt_bases(text) == [0xFFFF_FE00_0000_0000] * 2


class _FakePages:
    """What CommandLayer asks of vmsight.kvmi.pages.SessionPages, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[object]]] = []

    def get_page_access(self, view: int, gpas: list[int]) -> tuple[int, list[int]]:
        self.calls.append(("get", view, list(gpas)))
        return (22, []) if view else (0, [5] * len(gpas))

    def set_page_access(self, view: int, entries: list[tuple[int, int]]) -> int:
        self.calls.append(("set", view, list(entries)))
        return 95 if any(a & ~3 == 0 and not a & 4 for _, a in entries) else 0


def test_command_layer_page_access_commands() -> None:
    from tests.unit.test_kvmi_wire import FakeGuest, _reply
    from vmsight.kvmi import wire
    from vmsight.kvmi.server import CommandLayer

    plain = CommandLayer(FakeGuest())   # no dispatcher: not served, and CHECK_COMMAND says so
    assert not plain.supported(20) and not plain.supported(21)
    fake = _FakePages()
    layer = CommandLayer(FakeGuest(), pages=fake)
    assert layer.supported(20) and layer.supported(21)
    err, data = _reply(layer, "GET_PAGE_ACCESS", fields={"view": 0}, items=[0x1000, 0x2000])
    assert (err, data) == (0, bytes([5, 5]))
    assert _reply(layer, "GET_PAGE_ACCESS", fields={"view": 1}, items=[0x1000]) == (-wire.KVM_EINVAL, b"")
    assert _reply(layer, "SET_PAGE_ACCESS", fields={"view": 0},
                  items=[{"gpa": 0x1000, "access": 5}, {"gpa": 0x3000, "access": 7}]) == (0, b"")
    assert _reply(layer, "SET_PAGE_ACCESS", fields={"view": 0}, items=[{"gpa": 0x1000, "access": 3}])[0] == -95
    assert fake.calls == [("get", 0, [0x1000, 0x2000]), ("get", 1, [0x1000]),
                          ("set", 0, [(0x1000, 5), (0x3000, 7)]), ("set", 0, [(0x1000, 3)])]


def test_session_pages_without_restrictions() -> None:
    from types import SimpleNamespace

    from vmsight.kvmi.pages import SessionPages

    sp = SessionPages(SimpleNamespace(dispatcher=None))
    assert sp.get_page_access(0, [0x1000, 0x2000]) == (0, [ACCESS_ALL, ACCESS_ALL])   # no engine made
    assert sp.get_page_access(1, [0x1000])[0] == 22 and sp.set_page_access(2, [(0x1000, 5)]) == 22
    assert sp.engine is None
