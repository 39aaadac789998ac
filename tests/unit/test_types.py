"""Typed objects over BTF: a small kernel-like memory image built by hand (tasks on a list, an mm with
its pgd, bitfields, strings), then the real Debian 6.1/6.12 vmlinux data (init_task, init_mm)."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_btf import BtfBuilder, kernel_like
from tests.unit.test_kallsyms import real_vmlinux, rodata
from vmsight.errors import CorruptData, FieldNotFound, MemoryAccessError, SymbolNotFound, TypeNotFound
from vmsight.linux.btf import Btf, BtfKind
from vmsight.linux.types import (
    Object,
    Program,
    container_of,
    kernel_object,
    list_for_each_entry,
    make_program,
    member_offset,
)
from vmsight.memory.virtual import read_cstr

BASE = 0xFFFF888000100000
PAGE = 4096


class Memory:
    """Guest memory for tests: one mapped range [BASE, BASE+size); reads outside fault."""

    def __init__(self, size: int = 8 * PAGE) -> None:
        self.buf = bytearray(size)
        self.reads = 0

    def read(self, gva: int, size: int) -> bytes:
        self.reads += 1
        off = gva - BASE
        if off < 0 or off + size > len(self.buf):
            raise MemoryAccessError(f"unmapped gva {gva:#x}")
        return bytes(self.buf[off:off + size])

    def put(self, gva: int, data: bytes) -> None:
        self.buf[gva - BASE:gva - BASE + len(data)] = data

    def u64(self, gva: int, v: int) -> None:
        self.put(gva, struct.pack("<Q", v))


TASKS = [BASE + 0x100, BASE + 0x200, BASE + 0x300]  # init_task first
MM = BASE + 0x1000
PGD = BASE + 0x2000


def build() -> tuple[Memory, Btf, dict[str, int], Program]:
    raw, ids = kernel_like()
    btf = Btf(raw)
    mem = Memory()
    tasks_off = btf.member_offset("task_struct", "tasks")
    n = len(TASKS)
    for i, t in enumerate(TASKS):
        node = t + tasks_off
        mem.u64(node, TASKS[(i + 1) % n] + tasks_off)      # next
        mem.u64(node + 8, TASKS[(i - 1) % n] + tasks_off)  # prev
        mem.put(t + 0, struct.pack("<I", 0x100 + i))        # __state
        mem.put(t + 4, struct.pack("<I", 0x40 * i))         # flags
        # bits 64.. : in_execve (1), in_iowait (1), prio_bits (5, signed) = -3 for task 1
        bits = (1 if i == 1 else 0) | (1 << 1) | (((-3) & 0x1F) << 2)
        mem.put(t + 8, bytes([bits & 0xFF, bits >> 8]))
        mem.u64(t + 32, MM if i else 0)                     # mm
        mem.put(t + 40, struct.pack("<i", i * 100))         # pid
        mem.put(t + 44, struct.pack("<i", 1000 + i))        # tgid
        mem.put(t + 48, (b"swapper" if i == 0 else f"task{i}".encode()).ljust(16, b"\0"))
        mem.u64(t + 64, 123456 + i)                         # jiffies
        mem.put(t + 72, bytes([i % 2]))                     # exiting (bool)
    mem.u64(MM + 0x40, 0x7F0000000000)  # mmap_base
    mem.u64(MM + 0x78, PGD)             # pgd (pgd_t *)
    mem.put(MM + 0x70, struct.pack("<i", 3))  # mm_users
    mem.u64(MM + 0x80, 0xF)             # cpu_bitmap[0]
    mem.u64(MM + 0x88, 0x3)             # cpu_bitmap[1] (flexible array)
    mem.u64(PGD, 0x1234067)

    class Syms:
        def address(self, name: str) -> int:
            table = {"init_task": TASKS[0], "pcpu_hot": TASKS[2], "mystery": BASE}
            if name not in table:
                raise SymbolNotFound(name)
            return table[name]

    return mem, btf, ids, Program(mem, btf, Syms())


def test_members_follow_pointers() -> None:
    mem, btf, ids, prog = build()
    t = prog.object("struct task_struct", TASKS[1])
    assert t.pid.value_() == 100
    assert t.tgid.value_() == 1001  # const int
    assert t.mm.value_() == MM
    assert t.mm.pgd.value_() == PGD          # task->mm->pgd (pointer value)
    assert t.mm.pgd.pgd.value_() == 0x1234067  # task->mm->pgd->pgd
    assert t.mm.mmap_base.value_() == 0x7F0000000000  # via the anonymous struct
    assert t.mm.mm_users.value_() == 3
    assert t.member_("mm").address_ == TASKS[1] + 32
    assert t.comm.string_() == "task1"
    assert t.jiffies.value_() == 123457
    assert t.exiting.value_() is True
    assert int(t.pid) == 100 and [0, 1, 2][t.pid.value_() // 100] == 1
    assert t.type_name_() == "struct task_struct" and t.sizeof_() == 0x60
    assert t.pid.type_name_() == "pid_t"
    assert t.member_("tasks.next").value_() == TASKS[2] + btf.member_offset("task_struct", "tasks")


def test_anonymous_union_and_bitfields() -> None:
    mem, btf, ids, prog = build()
    t0, t1 = prog.object("task_struct", TASKS[0]), prog.object("task_struct", TASKS[1])
    assert t1.__state.value_() == 0x101
    assert t1.state_alias.value_() == 0x101
    assert t0.in_execve.value_() == 0 and t1.in_execve.value_() == 1
    assert t1.in_iowait.value_() == 1
    assert t1.prio_bits.value_() == -3  # signed 5-bit field
    assert (t1.prio_bits.bit_offset_, t1.prio_bits.bit_size_) == (2, 5)


def test_old_style_int_bitfield() -> None:
    mem, btf, ids, prog = build()
    mem.put(BASE + 0x800, bytes([0b10110]))  # bits 2..4 = 0b101 = -3 as signed 3-bit
    o = prog.object("struct old_style", BASE + 0x800)
    assert o.a.value_() == -3


def test_arrays_and_pointer_indexing() -> None:
    mem, btf, ids, prog = build()
    t = prog.object("task_struct", TASKS[0])
    assert len(t.comm) == 16
    assert t.comm[0].value_() == ord("s")
    assert bytes(c.value_() for c in t.comm)[:7] == b"swapper"
    with pytest.raises(IndexError):
        t.comm[16]
    mm = prog.object("mm_struct", MM)
    assert mm.cpu_bitmap[1].value_() == 3  # flexible array: no bound
    assert t.comm.value_()[:3] == [ord("s"), ord("w"), ord("a")]
    mm_ptr = prog.object("struct task_struct", TASKS[1]).mm
    assert mm_ptr[0].address_ == MM
    assert mm_ptr.deref_().address_ == MM


def test_values_of_other_kinds() -> None:
    mem, btf, ids, prog = build()
    mem.put(BASE + 0x900, struct.pack("<d", 2.5))
    assert Object(mem, btf, ids["float"], BASE + 0x900).value_() == 2.5
    mem.put(BASE + 0x910, struct.pack("<I", 4))
    e = Object(mem.read, btf, "enum pid_type", BASE + 0x910)  # a bare callable works as reader
    assert e.value_() == 4 and e.enum_name_() == "PIDTYPE_MAX"
    mem.put(BASE + 0x918, struct.pack("<q", -2))
    assert Object(mem, btf, ids["enum64"], BASE + 0x918).value_() == -2
    d = prog.object("struct pgd_t", PGD).value_()
    assert d == {"pgd": 0x1234067}
    task = prog.object("task_struct", TASKS[2]).value_()
    assert task["pid"] == 200 and task["comm"][:4] == list(b"task") and task["__state"] == 0x102


def test_errors_carry_data() -> None:
    mem, btf, ids, prog = build()
    t0 = prog.object("task_struct", TASKS[0])
    with pytest.raises(CorruptData) as ei:
        _ = t0.mm.pgd  # init_task has mm == NULL
    assert ei.value.address == TASKS[0] + 32
    with pytest.raises(FieldNotFound) as fe:
        _ = t0.nonexistent
    assert fe.value.field == "nonexistent" and fe.value.type_name == "struct task_struct"
    with pytest.raises(FieldNotFound):
        _ = t0.pid.x
    with pytest.raises(TypeNotFound):
        prog.object("struct nope", BASE)
    with pytest.raises(CorruptData):
        t0.pid.string_()
    with pytest.raises(MemoryAccessError):
        prog.object("task_struct", BASE - 0x1000).pid.value_()
    assert t0.has_member_("comm") and not t0.has_member_("nope")
    assert not hasattr(t0, "__deepcopy__")  # dunder lookups stay AttributeError


def test_container_of_and_member_offset() -> None:
    mem, btf, ids, prog = build()
    off = member_offset(btf, "task_struct", "tasks")
    assert off == 16
    t = container_of(prog, TASKS[2] + off, "struct task_struct", "tasks")
    assert t.address_ == TASKS[2] and t.pid.value_() == 200
    node = prog.object("task_struct", TASKS[1]).tasks.next  # a pointer Object
    assert prog.container_of(node, "task_struct", "tasks").pid.value_() == 200
    assert member_offset(btf, "mm_struct", "pgd") == 0x78


def test_list_for_each_entry() -> None:
    mem, btf, ids, prog = build()
    init = prog.variable("init_task")
    pids = [t.pid.value_() for t in prog.list_for_each_entry(init.tasks, "struct task_struct", "tasks")]
    assert pids == [100, 200]  # the head itself is not an entry
    assert [t.address_ for t in list_for_each_entry(prog, TASKS[0] + 16, "task_struct", "tasks")] == TASKS[1:]
    with pytest.raises(CorruptData):
        list(prog.list_for_each_entry(init.tasks, "task_struct", "tasks", limit=1))


def test_list_cycle_and_null_are_detected() -> None:
    mem, btf, ids, prog = build()
    mem.u64(TASKS[2] + 16, TASKS[1] + 16)  # task2.next -> task1: a loop that skips the head
    with pytest.raises(CorruptData) as ei:
        list(prog.list_for_each_entry(TASKS[0] + 16, "task_struct", "tasks"))
    assert ei.value.address == TASKS[1] + 16
    mem.u64(TASKS[2] + 16, 0)
    with pytest.raises(CorruptData):
        list(prog.list_for_each_entry(TASKS[0] + 16, "task_struct", "tasks"))


def test_variables() -> None:
    mem, btf, ids, prog = build()
    assert prog.variable("init_task").comm.string_() == "swapper"  # KNOWN_VARIABLES
    assert prog.variable("pcpu_hot").pid.value_() == 200            # BTF VAR
    with pytest.raises(TypeNotFound):
        prog.variable("mystery")
    assert prog.variable("mystery", "unsigned long").address_ == BASE
    with pytest.raises(SymbolNotFound):
        prog.variable("nope")


def test_char_pointer_strings_are_bounded() -> None:
    mem, btf, ids, prog = build()
    b = BtfBuilder()
    char = b.int_("char", 1, 2)
    holder = b.struct_("holder", 8, [("s", b.ptr(char), 0, 0)])
    btf2 = Btf(b.build())
    text = BASE + 3 * PAGE - 5  # crosses a page boundary
    mem.put(text, b"hello world\0")
    mem.u64(BASE + 0x10, text)
    o = Object(mem, btf2, holder, BASE + 0x10)
    assert o.s.string_() == "hello world"
    assert o.s.string_(limit=4) == "hell"
    end = BASE + len(mem.buf) - 3
    mem.put(end, b"abc")  # no NUL before unmapped memory
    with pytest.raises(MemoryAccessError):
        read_cstr(mem.read, end, 100)
    assert read_cstr(mem.read, end, 3) == b"abc"


def test_kernel_adapters() -> None:
    mem, btf, ids, prog = build()

    class FakeKernel:
        def __init__(self) -> None:
            self.btf = btf
            self.symbols = prog.symbols
            self.types = make_program(self)

        def read(self, gva: int, size: int) -> bytes:
            return mem.read(gva, size)

    k = FakeKernel()
    assert kernel_object(k, "init_task").pid.value_() == 0
    assert kernel_object(k, "", "struct task_struct", TASKS[1]).pid.value_() == 100
    assert btf.kind(ids["var"]) == BtfKind.VAR


# --- real kernels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_real_vmlinux_objects(version: str) -> None:
    from vmsight.linux.btf import btf_from_kallsyms
    from vmsight.linux.kallsyms import find_kallsyms
    from vmsight.linux.vmlinux import ElfReader

    elf = real_vmlinux(version)
    ro, _ = rodata(elf)
    ks = find_kallsyms(ro)
    reader = ElfReader(elf)
    prog = Program(reader, btf_from_kallsyms(reader.read, ks), ks)
    init = prog.variable("init_task")
    assert init.comm.string_() == "swapper"
    assert init.pid.value_() == 0
    assert init.mm.value_() == 0
    assert init.active_mm.pgd.value_() == ks.address("init_top_pgt")  # &init_mm, statically initialised
    assert init.active_mm.value_() == ks.address("init_mm")
    # An empty task list at build time: init_task.tasks points to itself.
    assert list(prog.list_for_each_entry(init.tasks, "struct task_struct", "tasks")) == []
    uts = prog.variable("init_uts_ns")
    assert uts.name.sysname.string_() == "Linux"
    assert uts.name.release.string_().startswith(version + ".")


def test_value_of_a_huge_array_is_refused() -> None:
    b = BtfBuilder()
    u8 = b.int_("u8", 1)
    big = b.array(u8, u8, 0xFFFFFFFF)
    btf = Btf(b.build())
    mem = Memory()
    o = Object(mem, btf, big, BASE)
    assert o[5].value_() == 0  # indexing still works
    with pytest.raises(CorruptData):
        o.value_()


def test_half_built_object_repr_does_not_recurse() -> None:
    mem, btf, ids, prog = build()
    obj = Object.__new__(Object)
    with pytest.raises(AttributeError):
        _ = obj._t
    with pytest.raises(TypeNotFound):
        Object(mem, btf, "struct nope", BASE)


def test_the_one_cstring_reader() -> None:
    """read_cstr (every C-string read: kernel, address space, typed objects, events) and cstr on fixed buffers."""
    from vmsight.memory.virtual import cstr

    mem = Memory()
    start = BASE + PAGE - 2
    mem.put(start, b"ab" + b"cd\0ef")          # crosses a page: read page by page
    assert read_cstr(mem.read, start, 100) == b"abcd"
    assert read_cstr(mem.read, start, 3) == b"abc"
    assert read_cstr(mem.read, start, 0) == b""
    with pytest.raises(CorruptData) as ei:      # a reader that returns less than asked is corrupt, not a string
        read_cstr(lambda gva, size: b"x" * (size - 1), BASE, 10)
    assert ei.value.address == BASE
    assert cstr(b"comm\0junk\0") == b"comm" and cstr(b"full") == b"full" and cstr(b"") == b""
