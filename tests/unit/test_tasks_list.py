"""Task-list walking (vmsight.linux.tasks) over synthetic and adversarial kernel memory.

A small fake kernel supplies reads over a bytearray and fixed member offsets (the real ones come from
BTF; the walkers only use what ``Kernel.offsetof`` returns), so the walk logic is tested on memory we
control: well-formed lists, cycles, bad pointers, and random corruption (hypothesis)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsight.errors import CorruptData, MemoryAccessError, ProcessNotFound, SymbolNotFound, VmsightError
from vmsight.linux import tasks as T
from vmsight.linux.lists import list_for_each

BASE = 0xFFFF888000000000
TASK_SIZE = 0x200
OFFSETS = {
    ("task_struct", "tasks"): 0x10, ("task_struct", "pid"): 0x20, ("task_struct", "tgid"): 0x24,
    ("task_struct", "comm"): 0x30, ("task_struct", "real_parent"): 0x40, ("task_struct", "mm"): 0x48,
    ("task_struct", "flags"): 0x50, ("task_struct", "__state"): 0x54, ("task_struct", "exit_state"): 0x58,
    ("task_struct", "real_cred"): 0x60, ("task_struct", "start_time"): 0x68,
    ("task_struct", "start_boottime"): 0x70, ("task_struct", "signal"): 0x78,
    ("task_struct", "thread_node"): 0x80, ("signal_struct", "thread_head"): 0x0,
    ("cred", "uid"): 0x4, ("cred", "gid"): 0x8, ("cred", "euid"): 0x14, ("cred", "egid"): 0x18,
    ("mm_struct", "pgd"): 0x0, ("mm_struct", "arg_start"): 0x8, ("mm_struct", "arg_end"): 0x10,
}
SIZES = {("task_struct", "comm"): 16, ("task_struct", "__state"): 4}


class FakeSymbols:
    def __init__(self, syms: dict[str, int]) -> None:
        self.syms = syms

    def get(self, name: str, default: int | None = None) -> int | None:
        return self.syms.get(name, default)


class FakeKernel:
    """Kernel memory = a bytearray at BASE; the parts of the Kernel API the task helpers use."""

    def __init__(self, size: int = 0x20000, *, base: int = BASE, la57: bool = False) -> None:
        self.buf = bytearray(size)
        self.base = base
        self.la57 = la57
        self.symbols = FakeSymbols({"init_task": base})
        self.reads = 0
        self._derived: dict[Callable[[FakeKernel], Any], Any] = {}

    def read(self, gva: int, size: int) -> bytes:
        self.reads += 1
        off = gva - self.base
        if off < 0 or off + size > len(self.buf):
            raise MemoryAccessError(f"unmapped {gva:#x}")
        return bytes(self.buf[off:off + size])

    def read_u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def symbol(self, name: str) -> int:
        if name not in self.symbols.syms:
            raise SymbolNotFound(name)
        return self.symbols.syms[name]

    def offsetof(self, struct_name: str, member: str) -> int:
        from vmsight.errors import FieldNotFound

        if (struct_name, member) not in OFFSETS:
            raise FieldNotFound(struct_name, member)
        return OFFSETS[(struct_name, member)]

    def has_member(self, struct_name: str, member: str) -> bool:
        return (struct_name, member) in OFFSETS

    def member_size(self, struct_name: str, member: str) -> int:
        return SIZES[(struct_name, member)]

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols.syms

    def put(self, gva: int, fmt: str, *vals: int | bytes) -> None:
        struct.pack_into(fmt, self.buf, gva - self.base, *vals)

    def derived(self, make: Callable[[FakeKernel], Any]) -> Any:
        """As Kernel.derived: what a helper derives once (the task layout) is kept per kernel."""
        if make not in self._derived:
            self._derived[make] = make(self)
        return self._derived[make]


def task_gva(i: int, base: int = BASE) -> int:
    return base + i * TASK_SIZE     # task 0 is init_task


def build(k: FakeKernel, pids: list[int]) -> None:
    """init_task + one single-threaded process per pid, linked through tasks and thread lists."""
    n = len(pids) + 1
    sig_base = task_gva(n + 1, k.base)
    for i in range(n):
        t = task_gva(i, k.base)
        nxt, prv = task_gva((i + 1) % n, k.base), task_gva((i - 1) % n, k.base)
        k.put(t + 0x10, "<QQ", nxt + 0x10, prv + 0x10)
        pid = pids[i - 1] if i else 0
        k.put(t + 0x20, "<ii", pid, pid)
        k.put(t + 0x30, "16s", f"proc{pid}".encode())
        k.put(t + 0x40, "<Q", task_gva(0, k.base) if i <= 1 else task_gva(1, k.base))
        sig = sig_base + 0x20 * i
        k.put(t + 0x78, "<Q", sig)
        # signal->thread_head <-> task->thread_node: a one-thread group
        k.put(sig, "<QQ", t + 0x80, t + 0x80)
        k.put(t + 0x80, "<QQ", sig, sig)


def test_walk_yields_every_process_and_fields() -> None:
    k = FakeKernel()
    build(k, [1, 7, 42, 100])
    procs = list(T.for_each_process(k))  # type: ignore[arg-type]
    assert [p.pid for p in procs] == [1, 7, 42, 100]
    assert [p.comm for p in procs] == ["proc1", "proc7", "proc42", "proc100"]
    assert [p.ppid for p in procs] == [0, 1, 1, 1]
    assert [t.pid for t in T.for_each_task(k)] == [1, 7, 42, 100]  # type: ignore[arg-type]
    assert T.find_task(k, 42).comm == "proc42"  # type: ignore[arg-type]
    with pytest.raises(ProcessNotFound):
        T.find_task(k, 5)  # type: ignore[arg-type]


def test_state_letters_follow_task_state_index() -> None:
    k = FakeKernel()
    build(k, [1])
    t = T.Task(k, task_gva(1))  # type: ignore[arg-type]
    for st_val, exit_state, letter in [(0, 0, "R"), (1, 0, "S"), (2, 0, "D"), (0x402, 0, "I"),
                                       (4, 0, "T"), (8, 0, "t"), (0, 0x20, "Z"), (0, 0x10, "X"),
                                       (0x8000 | 1, 0, "D")]:
        k.put(task_gva(1) + 0x54, "<I", st_val)
        k.put(task_gva(1) + 0x58, "<I", exit_state)
        assert t.state == letter, (hex(st_val), exit_state)


def test_cycle_not_through_head_is_detected() -> None:
    k = FakeKernel()
    build(k, [1, 2, 3])
    # task 3's next points back at task 2: a loop that never returns to init_task
    k.put(task_gva(3) + 0x10, "<Q", task_gva(2) + 0x10)
    with pytest.raises(CorruptData, match="cycle"):
        list(T.for_each_process(k))  # type: ignore[arg-type]


def test_user_pointer_and_length_bound() -> None:
    k = FakeKernel()
    build(k, [1, 2])
    k.put(task_gva(1) + 0x10, "<Q", 0x7FFF0000)
    with pytest.raises(CorruptData, match="kernel address"):
        list(T.for_each_process(k))  # type: ignore[arg-type]
    k2 = FakeKernel()
    build(k2, list(range(1, 40)))
    with pytest.raises(CorruptData, match="more than"):
        list(list_for_each(k2.read_u64, task_gva(0) + 0x10, max_nodes=10, la57=False))


# A 5-level guest's direct map (page_offset_base is randomised from 0xff11000000000000): the pointer of
# issue 9, which the 4-level bound (0xffff800000000000) refused.
LA57_BASE = 0xFF3E3B6581234000


def test_la57_task_list_walks_in_5_level_mode_only() -> None:
    k = FakeKernel(base=LA57_BASE, la57=True)
    build(k, [1, 7, 42])
    assert [(p.pid, p.comm, p.ppid) for p in T.for_each_process(k)] == [  # type: ignore[arg-type]
        (1, "proc1", 0), (7, "proc7", 1), (42, "proc42", 1)]
    assert [t.pid for t in T.for_each_task(k)] == [1, 7, 42]  # type: ignore[arg-type]
    # The same memory under 4-level paging: 0xff3e... is non-canonical, the walk must refuse it.
    k.la57 = False
    with pytest.raises(CorruptData, match="not an aligned kernel address"):
        list(T.for_each_process(k))  # type: ignore[arg-type]
    with pytest.raises(CorruptData, match="not a kernel address"):
        T.Task(k, task_gva(1, LA57_BASE))  # type: ignore[arg-type]


def test_la57_bound_still_refuses_user_and_non_canonical_pointers() -> None:
    k = FakeKernel(base=LA57_BASE, la57=True)
    build(k, [1, 2])
    for bad in (0x00FF000000001000, 0xFEFFFFFFFFFFF000):   # top of the 5-level user half; just below the kernel half
        k.put(task_gva(1, LA57_BASE) + 0x10, "<Q", bad)
        with pytest.raises(CorruptData, match="kernel address"):
            list(T.for_each_process(k))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_adversarial_task_memory_only_typed_errors(data: st.DataObject) -> None:
    """Corrupt random words of a valid task list: walking it (with every field) ends with results or a
    VmsightError, after a bounded number of reads."""
    k = FakeKernel()
    n = 12
    build(k, list(range(1, n + 1)))
    region = (n + 3) * TASK_SIZE
    for _ in range(data.draw(st.integers(1, 10))):
        off = data.draw(st.integers(0, region - 8)) & ~7
        val = data.draw(st.one_of(
            st.integers(0, (1 << 64) - 1),
            st.sampled_from([task_gva(i) + d for i in range(n + 2) for d in (0, 0x10, 0x80)])))
        k.put(BASE + off, "<Q", val)
    try:
        for t in T.for_each_task(k):  # type: ignore[arg-type]
            t.pid, t.comm, t.state, t.ppid  # noqa: B018 - reading is the test
    except VmsightError:
        pass
    assert k.reads < 100_000


def test_task_ids_in_one_read_or_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task.ids (what event decoders read on every hit): (pid, tgid) of a thread, one 8-byte read where the
    two sit side by side, two reads of the right members where they do not."""
    k = FakeKernel()
    build(k, [5])
    t = T.Task(k, task_gva(1))  # type: ignore[arg-type]
    k.put(t.gva + 0x24, "<i", 4)                 # a thread of group 4
    before = k.reads
    assert t.ids == (5, 4) and k.reads == before + 1
    apart = dict(OFFSETS)
    apart[("task_struct", "tgid")] = 0x2C        # not adjacent (0x28 is inside comm? no: comm is at 0x30)
    monkeypatch.setattr(sys.modules[__name__], "OFFSETS", apart)
    k2 = FakeKernel()
    build(k2, [5])
    t2 = T.Task(k2, task_gva(1))  # type: ignore[arg-type]
    k2.put(t2.gva + 0x24, "<i", 99)              # the adjacent word is not tgid here
    k2.put(t2.gva + 0x2C, "<i", 4)
    before = k2.reads
    assert t2.ids == (5, 4) and k2.reads == before + 2


def test_current_task_offset_from_current_task_or_pcpu_hot() -> None:
    """The per-cpu offset of ``current``: the current_task variable, else pcpu_hot.current_task (v6.2-v6.14);
    neither is SymbolNotFound, which current_task() turns into CorruptData naming the cpu."""
    k = FakeKernel()
    k.symbols.syms["current_task"] = 0x1F000
    assert T.current_task_offset(k) == 0x1F000  # type: ignore[arg-type]
    k2 = FakeKernel()
    k2.symbols.syms["pcpu_hot"] = 0x20000
    OFFSETS[("pcpu_hot", "current_task")] = 0x8
    try:
        assert T.current_task_offset(k2) == 0x20008  # type: ignore[arg-type]
    finally:
        del OFFSETS[("pcpu_hot", "current_task")]
    k3 = FakeKernel()
    with pytest.raises(SymbolNotFound):
        T.current_task_offset(k3)  # type: ignore[arg-type]
    with pytest.raises(CorruptData, match="cpu 1"):
        T.current_task(k3, 1)  # type: ignore[arg-type]
