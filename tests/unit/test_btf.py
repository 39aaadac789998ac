"""BTF parser: synthetic blobs covering every kind (built by a small encoder of include/uapi/linux/btf.h),
corrupt headers, and the real Debian 6.1 / 6.12 .BTF sections."""

from __future__ import annotations

import struct
import time

import pytest

from tests.unit.test_kallsyms import real_vmlinux
from vmsight.errors import CorruptData, FieldNotFound, TypeNotFound, UnsupportedKernel
from vmsight.linux.btf import (
    INT_BOOL,
    INT_CHAR,
    INT_SIGNED,
    Btf,
    BtfKind,
    btf_from_kallsyms,
    btf_from_reader,
    find_btf,
    parse_btf,
)

# --- encoder ------------------------------------------------------------------------------------------


class BtfBuilder:
    """Builds a BTF blob type by type; each add_* returns the new type id."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self._str_at: dict[str, int] = {"": 0}
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if name not in self._str_at:
            self._str_at[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self._str_at[name]

    def _add(self, name: str, kind: int, vlen: int, size_type: int, extra: bytes = b"", kflag: bool = False) -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self.types.append(struct.pack("<III", self.s(name), info, size_type) + extra)
        return len(self.types)

    def int_(self, name: str, size: int, encoding: int = 0, bits: int | None = None, offset: int = 0) -> int:
        bits = 8 * size if bits is None else bits
        return self._add(name, 1, 0, size, struct.pack("<I", (encoding << 24) | (offset << 16) | bits))

    def ptr(self, to: int) -> int:
        return self._add("", 2, 0, to)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add("", 3, 0, 0, struct.pack("<III", elem, index, nelems))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False,
                kflag: bool | None = None) -> int:
        """members: (name, type, bit offset, bitfield size)."""
        kflag = any(m[3] for m in members) if kflag is None else kflag
        extra = b"".join(struct.pack("<III", self.s(n), t, (bs << 24 | off) if kflag else off)
                         for n, t, off, bs in members)
        return self._add(name, 5 if union else 4, len(members), size, extra, kflag)

    def enum(self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<Ii" if signed else "<II", self.s(n), v) for n, v in values)
        return self._add(name, 6, len(values), size, extra, signed)

    def fwd(self, name: str, union: bool = False) -> int:
        return self._add(name, 7, 0, 0, kflag=union)

    def typedef(self, name: str, to: int) -> int:
        return self._add(name, 8, 0, to)

    def volatile(self, to: int) -> int:
        return self._add("", 9, 0, to)

    def const(self, to: int) -> int:
        return self._add("", 10, 0, to)

    def restrict(self, to: int) -> int:
        return self._add("", 11, 0, to)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self._add(name, 12, linkage, proto)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<II", self.s(n), t) for n, t in params)
        return self._add("", 13, len(params), ret, extra)

    def var(self, name: str, type_: int, linkage: int = 1) -> int:
        return self._add(name, 14, 0, type_, struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, vars_: list[tuple[int, int, int]]) -> int:
        extra = b"".join(struct.pack("<III", t, o, sz) for t, o, sz in vars_)
        return self._add(name, 15, len(vars_), size, extra)

    def float_(self, name: str, size: int) -> int:
        return self._add(name, 16, 0, size)

    def decl_tag(self, name: str, to: int, component_idx: int) -> int:
        return self._add(name, 17, 0, to, struct.pack("<i", component_idx))

    def type_tag(self, name: str, to: int) -> int:
        return self._add(name, 18, 0, to)

    def enum64(self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF) for n, v in values)
        return self._add(name, 19, len(values), size, extra, signed)

    def build(self) -> bytes:
        types = b"".join(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return hdr + types + bytes(self.strings)


def kernel_like() -> tuple[bytes, dict[str, int]]:
    """A miniature of the kernel's types: list_head, mm_struct with its members in an anonymous struct
    (as since v6.2), task_struct with bitfields, an anonymous union, comm[16], plus one of every kind."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    ids["int"] = b.int_("int", 4, INT_SIGNED)
    ids["uint"] = b.int_("unsigned int", 4)
    ids["ulong"] = b.int_("unsigned long", 8)
    ids["char"] = b.int_("char", 1, INT_CHAR | INT_SIGNED)
    ids["bool"] = b.int_("_Bool", 1, INT_BOOL)
    ids["pid_t"] = b.typedef("pid_t", ids["int"])
    ids["list_head"] = b.struct_("list_head", 16, [])  # patched below (needs its own pointer)
    ids["list_head_ptr"] = b.ptr(ids["list_head"])
    b.types[ids["list_head"] - 1] = b.types[ids["list_head"] - 1][:4] + struct.pack("<II", (4 << 24) | 2, 16) + \
        struct.pack("<III", b.s("next"), ids["list_head_ptr"], 0) + struct.pack("<III", b.s("prev"), ids["list_head_ptr"], 64)
    ids["pgd_t"] = b.struct_("pgd_t", 8, [("pgd", ids["ulong"], 0, 0)])  # typedef struct { pgdval_t pgd; }
    ids["pgd_ptr"] = b.ptr(ids["pgd_t"])
    ids["mm_anon"] = b.struct_("", 0x80, [("mmap_base", ids["ulong"], 0x40 * 8, 0), ("pgd", ids["pgd_ptr"], 0x78 * 8, 0),
                                          ("mm_users", ids["int"], 0x70 * 8, 0)])
    ids["cpumask"] = b.array(ids["ulong"], ids["int"], 0)  # flexible array member
    ids["mm_struct"] = b.struct_("mm_struct", 0x80, [("", ids["mm_anon"], 0, 0), ("cpu_bitmap", ids["cpumask"], 0x80 * 8, 0)])
    ids["mm_ptr"] = b.ptr(ids["mm_struct"])
    ids["comm"] = b.array(ids["char"], ids["int"], 16)
    ids["state_union"] = b.struct_("", 4, [("__state", ids["uint"], 0, 0), ("state_alias", ids["int"], 0, 0)], union=True)
    ids["const_int"] = b.const(ids["int"])
    ids["volatile_long"] = b.volatile(ids["ulong"])
    ids["task_struct"] = b.struct_("task_struct", 0x60, [
        ("", ids["state_union"], 0, 0),
        ("flags", ids["uint"], 32, 0),
        ("in_execve", ids["uint"], 64, 1),
        ("in_iowait", ids["uint"], 65, 1),
        ("prio_bits", ids["int"], 66, 5),   # signed 5-bit field
        ("tasks", ids["list_head"], 128, 0),
        ("mm", ids["mm_ptr"], 256, 0),
        ("pid", ids["pid_t"], 320, 0),
        ("tgid", ids["const_int"], 352, 0),
        ("comm", ids["comm"], 384, 0),
        ("jiffies", ids["volatile_long"], 512, 0),
        ("exiting", ids["bool"], 576, 0),
    ])
    ids["fwd_sock"] = b.fwd("sock")
    ids["fwd_union"] = b.fwd("u_fwd", union=True)
    ids["restrict_ptr"] = b.restrict(b.ptr(ids["char"]))
    ids["enum"] = b.enum("pid_type", 4, [("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1), ("PIDTYPE_MAX", 4)])
    ids["senum"] = b.enum("signed_e", 4, [("NEG", -5), ("POS", 3)], signed=True)
    ids["enum64"] = b.enum64("big_e", 8, [("BIG", 1 << 40), ("NEG64", -2)], signed=True)
    ids["float"] = b.float_("double", 8)
    ids["proto"] = b.func_proto(ids["int"], [("task", b.ptr(ids["task_struct"])), ("", 0)])
    ids["func"] = b.func("wake_up_process", ids["proto"], linkage=1)
    ids["var"] = b.var("pcpu_hot", ids["task_struct"])
    ids["datasec"] = b.datasec(".data..percpu", 0x100, [(ids["var"], 0x40, 0x60)])
    ids["decl_tag"] = b.decl_tag("user", ids["task_struct"], 3)
    ids["type_tag"] = b.type_tag("rcu", ids["task_struct"])
    ids["tagged_ptr"] = b.ptr(ids["type_tag"])
    ids["old_bitfield_int"] = b.int_("int", 4, INT_SIGNED, bits=3, offset=2)  # pre-kind_flag encoding
    ids["old_style"] = b.struct_("old_style", 4, [("a", ids["old_bitfield_int"], 0, 0)], kflag=False)
    ids["loop_a"] = b.typedef("loop_a", len(b.types) + 2)
    ids["loop_b"] = b.typedef("loop_b", ids["loop_a"])
    return b.build(), ids


# --- synthetic tests ----------------------------------------------------------------------------------

def test_every_kind_decodes() -> None:
    raw, ids = kernel_like()
    btf = Btf(raw)
    assert len(btf) == max(ids.values())
    kinds = {btf.kind(i) for i in range(1, len(btf) + 1)}
    assert kinds == set(BtfKind) - {BtfKind.UNKN}
    t = btf.type(ids["char"])
    assert t.kind == BtfKind.INT and t.int_encoding == INT_CHAR | INT_SIGNED and t.int_bits == 8 and t.is_signed
    a = btf.type(ids["comm"])
    assert (a.elem_type_id, a.index_type_id, a.nelems) == (ids["char"], ids["int"], 16)
    assert btf.type(ids["fwd_union"]).kind_flag and not btf.type(ids["fwd_sock"]).kind_flag
    e = btf.type(ids["enum"])
    assert [(v.name, v.value) for v in e.enum_values] == [("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1), ("PIDTYPE_MAX", 4)]
    assert [v.value for v in btf.type(ids["senum"]).enum_values] == [-5, 3]
    assert [v.value for v in btf.type(ids["enum64"]).enum_values] == [1 << 40, -2]
    assert btf.type(ids["float"]).size == 8
    p = btf.type(ids["proto"])
    assert p.type_id == ids["int"] and [x.name for x in p.params] == ["task", ""] and p.params[1].type_id == 0
    f = btf.type(ids["func"])
    assert f.name == "wake_up_process" and f.type_id == ids["proto"] and f.linkage == 1
    v = btf.type(ids["var"])
    assert v.type_id == ids["task_struct"] and v.linkage == 1
    ds = btf.type(ids["datasec"])
    assert ds.size == 0x100 and [(s.type_id, s.offset, s.size) for s in ds.secinfos] == [(ids["var"], 0x40, 0x60)]
    assert btf.type(ids["decl_tag"]).component_idx == 3
    assert btf.type(ids["type_tag"]).name == "rcu"
    assert btf.type(0).kind == BtfKind.UNKN and btf.name(0) == "void"


def test_members_bitfields_and_anonymous() -> None:
    raw, ids = kernel_like()
    btf = Btf(raw)
    assert btf.member_offset("mm_struct", "pgd") == 0x78
    assert btf.member("struct mm_struct", "pgd").path == ("", "pgd")
    assert btf.member_offset("task_struct", "__state") == 0
    assert btf.member("task_struct", "state_alias").type_id == ids["int"]
    m = btf.member("task_struct", "prio_bits")
    assert (m.bit_offset, m.bitfield_size) == (66, 5)
    assert btf.member_offset("task_struct", "tasks.prev") == 16 + 8
    assert set(btf.members("task_struct")) >= {"__state", "state_alias", "flags", "in_execve", "pid", "comm"}
    with pytest.raises(FieldNotFound) as ei:
        btf.member("task_struct", "nope")
    assert ei.value.field == "nope" and ei.value.type_name == "struct task_struct"
    with pytest.raises(FieldNotFound):
        btf.member("task_struct", "pid.x")  # pid is not a struct


def test_sizes_resolve_through_typedefs_and_modifiers() -> None:
    raw, ids = kernel_like()
    btf = Btf(raw)
    assert btf.size_of("pid_t") == 4
    assert btf.size_of(ids["const_int"]) == 4
    assert btf.size_of(ids["volatile_long"]) == 8
    assert btf.size_of(ids["comm"]) == 16
    assert btf.size_of(ids["mm_ptr"]) == 8
    assert btf.size_of("struct task_struct") == 0x60
    assert btf.size_of(ids["type_tag"]) == 0x60
    assert btf.size_of(ids["var"]) == 0x60
    assert btf.resolve(ids["const_int"]).id == ids["int"]
    assert btf.resolve("pid_t", keep_typedefs=True).kind == BtfKind.TYPEDEF
    with pytest.raises(CorruptData):
        btf.size_of(ids["proto"])
    with pytest.raises(CorruptData):
        btf.resolve(ids["loop_b"])  # typedef cycle


def test_find_by_name_and_kind() -> None:
    raw, ids = kernel_like()
    btf = Btf(raw)
    assert btf.find("task_struct").id == ids["task_struct"]
    assert btf.find("struct task_struct").id == ids["task_struct"]
    assert btf.find("enum pid_type").id == ids["enum"]
    assert btf.find("union u_fwd").id == ids["fwd_union"]
    assert btf.find("pcpu_hot", BtfKind.VAR).id == ids["var"]
    assert btf.find_all("int") == [ids["int"], ids["old_bitfield_int"]]
    assert btf.find_all("int", BtfKind.TYPEDEF) == []
    assert btf.enumerator("PIDTYPE_MAX") == 4
    assert btf.enum_value("pid_type", "PIDTYPE_TGID") == 1
    with pytest.raises(TypeNotFound) as ei:
        btf.find("struct nope")
    assert ei.value.name == "struct nope"
    with pytest.raises(TypeNotFound):
        btf.find("union task_struct")


def test_type_names() -> None:
    raw, ids = kernel_like()
    btf = Btf(raw)
    assert btf.type_name(ids["mm_ptr"]) == "struct mm_struct *"
    assert btf.type_name(ids["comm"]) == "char [16]"
    assert btf.type_name(ids["const_int"]) == "const int"
    assert btf.type_name(ids["pid_t"]) == "pid_t"
    assert btf.type_name(ids["tagged_ptr"]) == "struct task_struct *"
    assert btf.type_name(ids["proto"]) == "int (*)(struct task_struct *, ...)"
    assert btf.type_name(ids["mm_anon"]) == "struct <anonymous>"


def test_split_btf_continues_ids() -> None:
    raw, ids = kernel_like()
    base = Btf(raw)
    b = BtfBuilder()
    b.types = []
    mod_struct = b.struct_("mod_thing", 8, [("owner", len(base) + 2, 0, 0)])
    b.ptr(ids["task_struct"])
    split = Btf(b.build(), base=base)
    assert mod_struct == 1 and split.find("mod_thing").id == len(base) + 1
    assert split.find("task_struct").id == ids["task_struct"]
    assert split.type_name(split.member("mod_thing", "owner").type_id) == "struct task_struct *"


@pytest.mark.parametrize("mutate,exc", [
    (lambda r: r[:10], CorruptData),
    (lambda r: b"\x9e" + r[1:], CorruptData),
    (lambda r: r[:2] + b"\x02" + r[3:], UnsupportedKernel),
    (lambda r: r[:4] + struct.pack("<I", 8) + r[8:], CorruptData),          # hdr_len too small
    (lambda r: r[:12] + struct.pack("<I", 1 << 30) + r[16:], CorruptData),  # type_len too big
    (lambda r: r[:24] + r[24:28] + struct.pack("<I", 25 << 24) + r[32:], UnsupportedKernel),  # kind 25
    (lambda r: r[:24] + r[24:28] + struct.pack("<I", (4 << 24) | 0xFFFF) + r[32:], CorruptData),  # vlen huge
    (lambda r: r[:24] + struct.pack("<I", 1 << 28) + r[28:], CorruptData),  # name offset past strings
])
def test_corrupt_blobs_raise_vmsight_errors(mutate: object, exc: type[Exception]) -> None:
    raw, _ = kernel_like()
    with pytest.raises(exc):
        Btf(mutate(raw))  # type: ignore[operator]


def test_dangling_type_reference_is_corrupt() -> None:
    b = BtfBuilder()
    b.ptr(99)
    btf = Btf(b.build())
    with pytest.raises(CorruptData):
        btf.type(1)
    with pytest.raises(CorruptData):
        btf.type(2)


def test_find_btf_and_from_reader() -> None:
    raw, ids = kernel_like()
    blob = b"\x9f\xeb\x01\x00junk" + b"\0" * 100 + raw + b"\0" * 50
    offs = list(find_btf(blob))
    assert blob.index(raw) in offs
    base = 0xFFFFFFFF82438070
    start = base + blob.index(raw)

    def read(gva: int, size: int) -> bytes:
        return blob[gva - base:gva - base + size]

    btf = btf_from_reader(read, start, start + len(raw))
    assert btf.find("mm_struct").id == ids["mm_struct"]
    with pytest.raises(CorruptData):
        btf_from_reader(read, start, start + 10)

    class Syms:
        def address(self, name: str) -> int:
            return {"__start_BTF": start, "__stop_BTF": start + len(raw)}[name]

    assert len(btf_from_kallsyms(read, Syms())) == len(btf)
    assert len(parse_btf(raw)) == len(btf)


# --- real kernels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,pgd,types_lo,types_hi", [("6.1", 0x48, 90_000, 100_000),
                                                            ("6.12", 0x78, 105_000, 125_000)])
def test_real_kernel_btf(version: str, pgd: int, types_lo: int, types_hi: int) -> None:
    from tests.unit.test_kallsyms import rodata
    from vmsight.linux.kallsyms import find_kallsyms
    from vmsight.linux.vmlinux import ElfReader

    elf = real_vmlinux(version)
    ro, _ = rodata(elf)
    ks = find_kallsyms(ro)
    t0 = time.perf_counter()
    btf = btf_from_kallsyms(ElfReader(elf).read, ks)
    btf.find("task_struct")
    elapsed = time.perf_counter() - t0
    assert types_lo < len(btf) < types_hi
    assert elapsed < 3.0  # ~0.15-0.3 s idle; generous for loaded CI
    ts = btf.find("struct task_struct")
    assert btf.resolve(btf.member(ts, "pid").type_id).name == "int"
    assert btf.type_name(btf.member(ts, "comm").type_id) == "char [16]"
    assert btf.type_name(btf.member(ts, "mm").type_id) == "struct mm_struct *"
    assert btf.member_offset("mm_struct", "pgd") == pgd
    assert btf.member("mm_struct", "pgd").path == ("", "pgd")  # inside the anonymous struct
    assert btf.size_of("struct list_head") == 16
    assert btf.enumerator("PIDTYPE_PID") == 0
    # Bitfields exist and carry kind_flag sizes.
    assert any(m.bitfield_size for m in ts.members)
    if version == "6.12":
        assert btf.find("pcpu_hot", BtfKind.VAR).type_id == btf.find("struct pcpu_hot").id
        assert btf.member_offset("pcpu_hot", "current_task") == 0


def test_exponential_anonymous_nesting_is_bounded() -> None:
    # Corrupt BTF can share one anonymous struct twice per level: 2**40 paths unless the walk is bounded.
    b = BtfBuilder()
    leaf_int = b.int_("int", 4, INT_SIGNED)
    prev = b.struct_("", 4, [("x", leaf_int, 0, 0)])
    for _ in range(40):
        prev = b.struct_("", 4, [("", prev, 0, 0), ("", prev, 0, 0)])
    top = b.struct_("top", 4, [("", prev, 0, 0)])
    proto = b.func_proto(leaf_int, [])
    for _ in range(40):
        proto = b.func_proto(b.ptr(proto), [("a", b.ptr(proto)), ("b", b.ptr(proto))])
    btf = Btf(b.build())
    t0 = time.perf_counter()
    with pytest.raises(CorruptData):
        btf.member(top, "x")
    assert len(btf.type_name(proto)) < 10_000_000
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_direct_name_lookup_equals_the_index(version: str) -> None:
    """The first lookups search the string section instead of building the name index: every name a
    real kernel has (and some it lacks) gives the same ids both ways, including names at two offsets."""
    from tests.unit.test_kallsyms import rodata
    from vmsight.linux.kallsyms import find_kallsyms
    from vmsight.linux.vmlinux import ElfReader

    elf = real_vmlinux(version)
    ro, _ = rodata(elf)
    raw = btf_from_kallsyms(ElfReader(elf).read, find_kallsyms(ro)).data
    direct, indexed = parse_btf(raw), parse_btf(raw)
    indexed._name_index()
    names = sorted({indexed.name(i) for i in range(1, len(indexed) + 1)} - {"void"})
    step = max(1, len(names) // 3000)
    sample = names[::step] + ["", "no_such_type_here", "task_struct\0", "\u20ac", "pid"]
    for name in sample:
        direct._direct_lookups = 0
        assert direct._ids_named(name) == indexed._ids_named(name), name
    assert direct._by_name is None                       # the index was never built
    for _ in range(70):                                  # past the budget the index takes over
        direct.find_all("task_struct")
    assert direct._by_name is not None
