"""BPF Type Format (BTF) parser: the kernel's own description of its types, in ``.BTF``.

With CONFIG_DEBUG_INFO_BTF the kernel carries every struct layout between ``__start_BTF`` and
``__stop_BTF`` (both in kallsyms), so member offsets come from the guest itself, not from headers
or symbol files. Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst.

Parsing is lazy: one pass indexes where each type's record starts (and its name and kind); members,
enum values and parameters are decoded when a type is first asked for. Every offset, length and type id
is bounds-checked, so corrupt input raises :class:`CorruptData` (an unknown kind raises
:class:`UnsupportedKernel`), never IndexError or an endless loop.
"""

from __future__ import annotations

import logging
import re
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

from vmsight.errors import CorruptData, FieldNotFound, TypeNotFound, UnsupportedKernel, VmsightError

log = logging.getLogger(__name__)

BTF_MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")
MAX_DEPTH = 64  # typedef/modifier chains and anonymous-member nesting; deeper means a cycle
MAX_WALK = 1 << 16  # members visited flattening one struct, types visited naming one type: bounds DAG blowup
MAX_BTF_SIZE = 256 << 20


class BtfKind(IntEnum):
    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes that follow the 12-byte struct btf_type: fixed part, and per vlen item.
_FIXED = [0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0]
_PER_VLEN = [0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12]
_SIZED = {BtfKind.INT, BtfKind.STRUCT, BtfKind.UNION, BtfKind.ENUM, BtfKind.DATASEC, BtfKind.FLOAT,
          BtfKind.ENUM64}
MODIFIERS = frozenset({BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG})
_QUALIFIERS = frozenset({BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG})

INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4


class BtfMember(NamedTuple):
    name: str           # "" for an anonymous struct/union member
    type_id: int
    bit_offset: int     # from the start of the enclosing struct
    bitfield_size: int  # 0 unless a bitfield declared with kind_flag

    @property
    def offset(self) -> int:
        """Byte offset (bit offset // 8)."""
        return self.bit_offset // 8


class BtfEnumValue(NamedTuple):
    name: str
    value: int


class BtfParam(NamedTuple):
    name: str
    type_id: int  # 0 with an empty name: varargs


class BtfVarSecinfo(NamedTuple):
    type_id: int
    offset: int
    size: int


@dataclass(slots=True)
class BtfType:
    """One decoded type. Fields that do not apply to ``kind`` keep their defaults."""

    id: int
    kind: BtfKind
    name: str
    kind_flag: bool
    vlen: int
    size: int = 0                 # INT STRUCT UNION ENUM ENUM64 DATASEC FLOAT
    type_id: int = 0              # PTR TYPEDEF VOLATILE CONST RESTRICT TYPE_TAG FUNC VAR DECL_TAG; FUNC_PROTO return
    int_encoding: int = 0         # INT_SIGNED | INT_CHAR | INT_BOOL
    int_offset: int = 0
    int_bits: int = 0
    elem_type_id: int = 0         # ARRAY
    index_type_id: int = 0
    nelems: int = 0
    members: tuple[BtfMember, ...] = ()
    enum_values: tuple[BtfEnumValue, ...] = ()
    params: tuple[BtfParam, ...] = ()
    linkage: int = 0              # FUNC (vlen) and VAR
    secinfos: tuple[BtfVarSecinfo, ...] = ()
    component_idx: int = 0        # DECL_TAG: -1 for the type itself, else member/param index

    @property
    def is_signed(self) -> bool:
        if self.kind == BtfKind.INT:
            return bool(self.int_encoding & INT_SIGNED)
        if self.kind in (BtfKind.ENUM, BtfKind.ENUM64):
            return self.kind_flag
        return False


class ResolvedMember(NamedTuple):
    """A member found by name, possibly inside anonymous structs/unions: offsets are from the outer
    struct. ``path`` lists the member names walked (anonymous ones as "")."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int
    path: tuple[str, ...]

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


_DIRECT_LOOKUPS = 64   # name lookups answered without the full name index (then it is built)
_C_PREFIX = re.compile(r"^\s*(struct|union|enum)\s+(\S+)\s*$")


class Btf:
    """A parsed BTF blob (``.BTF``: header, type section, string section).

    ``Btf(data)``; ``len(btf)`` types (ids 1..len; id 0 is void). Look up with :meth:`find`
    ("task_struct", "struct task_struct", kind filter), decode with :meth:`type`, and compute layouts
    with :meth:`size_of`, :meth:`member`, :meth:`member_offset`. Raises CorruptData, TypeNotFound,
    FieldNotFound, UnsupportedKernel."""

    def __init__(self, data: bytes | bytearray | memoryview, base: Btf | None = None) -> None:
        raw = bytes(data)
        if len(raw) < HEADER.size:
            raise CorruptData(f"BTF blob of {len(raw)} bytes is shorter than its header")
        magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(raw, 0)
        if magic != BTF_MAGIC:
            raise CorruptData(f"BTF magic {magic:#06x} != {BTF_MAGIC:#06x}")
        if version != 1:
            raise UnsupportedKernel(f"BTF version {version}")
        if hdr_len < HEADER.size or hdr_len > len(raw):
            raise CorruptData(f"BTF header length {hdr_len} out of range")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(raw) or s0 + str_len > len(raw) or type_len % 4:
            raise CorruptData(f"BTF sections (types {t0:#x}+{type_len:#x}, strings {s0:#x}+{str_len:#x}) "
                              f"outside the {len(raw):#x}-byte blob")
        if str_len == 0 or raw[s0] != 0:
            raise CorruptData("BTF string section does not start with the empty string")
        self.flags = flags
        self.base = base
        self.data = raw
        self.size = hdr_len + max(type_off + type_len, str_off + str_len)
        self._types = raw[t0:t0 + type_len]
        self._strs = raw[s0:s0 + str_len]
        self._first_id: int = (base.count + 1) if base is not None else 1
        self._offs = array("I")
        self._names = array("I")
        self._infos = array("I")
        self._name_arr = np.zeros(0, dtype=np.int64)
        self._kind_arr = np.zeros(0, dtype=np.int64)
        self._index_types()
        self.count: int = self._first_id - 1 + len(self._offs)
        self._cache: dict[int, BtfType] = {}
        self._str_cache: dict[int, str] = {}
        self._by_name: dict[str, int] | None = None
        self._span_lo: list[int] = []
        self._span_hi: list[int] = []
        self._ids_by_name = np.zeros(0, dtype=np.int64)
        self._extra_names: dict[str, list[int]] = {}
        self._direct_lookups = 0
        self._members_cache: dict[int, dict[str, ResolvedMember]] = {}

    # --- indexing ---------------------------------------------------------------------------------

    def _index_types(self) -> None:
        """One pass: where each record starts. For every 4-byte position the length a record starting
        there would have is computed with numpy; following that chain from 0 is then a cheap loop."""
        buf = self._types
        end = len(buf)
        if end == 0:
            return
        words = np.frombuffer(buf, dtype="<u4")
        info = np.empty(len(words), dtype=np.int64)
        info[:-1] = words[1:]
        info[-1] = 0
        kind = (info >> 24) & 0x1F
        fixed = np.array(_FIXED + [0] * 12, dtype=np.int64)
        per = np.array(_PER_VLEN + [0] * 12, dtype=np.int64)
        step = 12 + fixed[kind] + per[kind] * (info & 0xFFFF)
        # Indexing a memoryview yields plain ints without converting every word to a list first
        # (tolist() of the ~800 k words was half of a first sight's BTF time).
        nxt = memoryview((np.arange(len(words), dtype=np.int64) * 4 + step) // 4)
        chain = array("q")
        append = chain.append
        w = 0
        n = len(nxt)
        while w < n:
            append(w)
            w = nxt[w]
        nxt.release()
        if w * 4 != end:
            raise CorruptData(f"BTF last type record runs past the type section ({w * 4:#x} > {end:#x})")
        at = np.frombuffer(chain, dtype=np.int64)
        kinds = kind[at]
        if len(at) and int(kinds.max()) > 19:
            bad = int(at[np.argmax(kinds > 19)]) * 4
            raise UnsupportedKernel(f"BTF kind {int(kind[bad // 4])}", f"type record at {bad:#x}")
        names = words[at]
        if len(at) and int(names.max()) >= len(self._strs):
            raise CorruptData("BTF name offset beyond the string section")
        self._offs = array("I", (at * 4).astype(np.uint32).tobytes())
        self._names = array("I", names.astype(np.uint32).tobytes())
        self._infos = array("I", info[at].astype(np.uint32).tobytes())
        self._name_arr = names.astype(np.int64)
        self._kind_arr = kinds

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<Btf {self.count} types, {len(self._types) + len(self._strs)} bytes>"

    def _local(self, type_id: int) -> int:
        i = type_id - self._first_id
        if i < 0 or i >= len(self._offs):
            raise CorruptData(f"BTF type id {type_id} out of range 1..{self.count}")
        return i

    def string(self, off: int) -> str:
        """String at offset `off` of the string section."""
        s = self._str_cache.get(off)
        if s is not None:
            return s
        strs = self._strs
        if off >= len(strs) or off < 0:
            raise CorruptData(f"BTF string offset {off:#x} beyond the string section")
        end = strs.find(b"\0", off)
        if end < 0:
            raise CorruptData(f"BTF string at {off:#x} is not NUL-terminated")
        s = strs[off:end].decode("utf-8", "replace")
        self._str_cache[off] = s
        return s

    def kind(self, type_id: int) -> BtfKind:
        if type_id == 0:
            return BtfKind.UNKN
        if type_id < self._first_id and self.base is not None:
            return self.base.kind(type_id)
        return BtfKind((self._infos[self._local(type_id)] >> 24) & 0x1F)

    def name(self, type_id: int) -> str:
        if type_id == 0:
            return "void"
        if type_id < self._first_id and self.base is not None:
            return self.base.name(type_id)
        return self.string(self._names[self._local(type_id)])

    # --- decoding ---------------------------------------------------------------------------------

    def type(self, type_id: int) -> BtfType:
        """Decoded type `type_id` (id 0 is void: kind UNKN)."""
        t = self._cache.get(type_id)
        if t is not None:
            return t
        if type_id == 0:
            t = BtfType(0, BtfKind.UNKN, "void", False, 0)
        elif type_id < self._first_id and self.base is not None:
            return self.base.type(type_id)
        else:
            t = self._decode(type_id)
        self._cache[type_id] = t
        return t

    def _check_id(self, type_id: int) -> int:
        if type_id < 0 or type_id > self.count:
            raise CorruptData(f"BTF type reference {type_id} out of range 0..{self.count}")
        return type_id

    def _decode(self, type_id: int) -> BtfType:
        i = self._local(type_id)
        buf, pos = self._types, self._offs[i]
        name_off, info, size_type = _TYPE.unpack_from(buf, pos)
        kind = BtfKind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        name = self.string(name_off)
        p = pos + 12
        s = self.string
        chk = self._check_id
        kw: dict[str, Any] = {}
        if kind in _SIZED:
            kw["size"] = size_type
        elif kind != BtfKind.FWD:
            kw["type_id"] = chk(size_type) if kind != BtfKind.ARRAY else 0
        if kind == BtfKind.INT:
            (enc,) = struct.unpack_from("<I", buf, p)
            kw.update(int_encoding=(enc >> 24) & 0x0F, int_offset=(enc >> 16) & 0xFF, int_bits=enc & 0xFF)
            if kw["int_bits"] > 128 or kw["int_offset"] + kw["int_bits"] > 8 * size_type:
                raise CorruptData(f"BTF int {name!r} ({type_id}) has bits beyond its size")
        elif kind == BtfKind.ARRAY:
            elem, index, nelems = struct.unpack_from("<III", buf, p)
            kw.update(elem_type_id=chk(elem), index_type_id=chk(index), nelems=nelems)
        elif kind in (BtfKind.STRUCT, BtfKind.UNION):
            members = []
            for k in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", buf, p + 12 * k)
                if kflag:
                    members.append(BtfMember(s(m_name), chk(m_type), m_off & 0xFFFFFF, m_off >> 24))
                else:
                    members.append(BtfMember(s(m_name), chk(m_type), m_off, 0))
            kw["members"] = tuple(members)
        elif kind == BtfKind.ENUM:
            fmt = "<Ii" if kflag else "<II"
            kw["enum_values"] = tuple(
                BtfEnumValue(s(n), v) for n, v in (struct.unpack_from(fmt, buf, p + 8 * k) for k in range(vlen)))
        elif kind == BtfKind.ENUM64:
            vals = []
            for k in range(vlen):
                n, lo, hi = struct.unpack_from("<III", buf, p + 12 * k)
                v = lo | (hi << 32)
                if kflag and v >= 1 << 63:
                    v -= 1 << 64
                vals.append(BtfEnumValue(s(n), v))
            kw["enum_values"] = tuple(vals)
        elif kind == BtfKind.FUNC_PROTO:
            kw["params"] = tuple(BtfParam(s(n), chk(t)) for n, t in
                                 (struct.unpack_from("<II", buf, p + 8 * k) for k in range(vlen)))
        elif kind == BtfKind.FUNC:
            kw["linkage"] = vlen
        elif kind == BtfKind.VAR:
            (kw["linkage"],) = struct.unpack_from("<I", buf, p)
        elif kind == BtfKind.DATASEC:
            kw["secinfos"] = tuple(BtfVarSecinfo(chk(t), o, sz) for t, o, sz in
                                   (struct.unpack_from("<III", buf, p + 12 * k) for k in range(vlen)))
        elif kind == BtfKind.DECL_TAG:
            (kw["component_idx"],) = struct.unpack_from("<i", buf, p)
        return BtfType(type_id, kind, name, kflag, vlen, **kw)

    def types(self) -> Iterator[BtfType]:
        """Every type of this blob (not its base), in id order."""
        for i in range(len(self._offs)):
            yield self.type(self._first_id + i)

    # --- names ------------------------------------------------------------------------------------

    def _ids_named_direct(self, name: str) -> list[int]:
        if not name or "\0" in name:
            return []
        try:
            key = b"\0" + name.encode("latin-1") + b"\0"     # as the index decodes the section
        except UnicodeEncodeError:
            return []
        strs = self._strs
        offs: list[int] = []
        at = strs.find(key)
        while at >= 0:
            offs.append(at + 1)
            at = strs.find(key, at + 1)
        if not offs:
            return []
        hit = np.isin(self._name_arr, offs) if len(offs) > 1 else self._name_arr == offs[0]
        return (np.flatnonzero(hit) + self._first_id).tolist()

    def _name_index(self) -> dict[str, int]:
        """name -> k, where ids ``_ids_by_name[_span_lo[k]:_span_hi[k]]`` carry that name. Built in bulk
        with numpy from the string section (kernel BTF deduplicates strings; a name found at two
        offsets is merged into ``_extra_names``)."""
        if self._by_name is None:
            strs = np.frombuffer(self._strs, dtype=np.uint8)
            nul = np.flatnonzero(strs == 0)
            starts = np.concatenate(([0], nul[:-1] + 1))
            parts = self._strs.decode("latin-1").split("\0")
            order = np.argsort(self._name_arr, kind="stable")
            sorted_offs = self._name_arr[order]
            first = np.flatnonzero(np.diff(sorted_offs, prepend=-1))
            uniq = sorted_offs[first]
            pos = np.minimum(np.searchsorted(starts, uniq), len(starts) - 1)
            exact = starts[pos] == uniq
            names = [parts[p] if e else self.string(o)
                     for p, e, o in zip(pos.tolist(), exact.tolist(), uniq.tolist(), strict=True)]
            self._ids_by_name = (order + self._first_id).astype(np.int64)
            self._span_lo = first.tolist()
            self._span_hi = first[1:].tolist() + [len(sorted_offs)]
            idx = dict(zip(names, range(len(names)), strict=True))  # ints, not tuples: no GC churn
            if len(idx) != len(names):  # the same name at two string offsets: merge the spans
                merged: dict[str, list[int]] = {}
                for k, name in enumerate(names):
                    merged.setdefault(name, []).extend(
                        self._ids_by_name[self._span_lo[k]:self._span_hi[k]].tolist())
                self._extra_names = {k: sorted(v) for k, v in merged.items()}
            idx.pop("", None)
            self._by_name = idx
        return self._by_name

    def _ids_named(self, name: str) -> list[int]:
        if self._by_name is None and self._direct_lookups < _DIRECT_LOOKUPS:
            # A first sight of a kernel asks for a few dozen names: finding each string and comparing
            # the name column costs ~0.1 ms, the full index ~30 ms. Same answer, ids ascending.
            self._direct_lookups += 1
            return self._ids_named_direct(name)
        idx = self._name_index()
        if name in self._extra_names:
            return list(self._extra_names[name])
        k = idx.get(name)
        return [] if k is None else self._ids_by_name[self._span_lo[k]:self._span_hi[k]].tolist()

    def find_all(self, name: str, kind: BtfKind | None = None) -> list[int]:
        """Ids of every type named `name` (optionally of one kind), this blob then its base."""
        ids = [i for i in self._ids_named(name) if kind is None or self.kind(i) == kind]
        if self.base is not None:
            ids += self.base.find_all(name, kind)
        return ids

    def find(self, name: str, kind: BtfKind | None = None) -> BtfType:
        """The type called `name`: "task_struct", "struct task_struct", "union x", "enum y".
        Prefers a complete struct/union over a forward declaration. Raises TypeNotFound."""
        m = _C_PREFIX.match(name)
        kinds: tuple[BtfKind, ...]
        if m:
            word, name = m.group(1), m.group(2)
            kinds = {"struct": (BtfKind.STRUCT, BtfKind.FWD), "union": (BtfKind.UNION, BtfKind.FWD),
                     "enum": (BtfKind.ENUM, BtfKind.ENUM64, BtfKind.FWD)}[word]
        elif kind is not None:
            kinds = (kind,)
        else:
            kinds = ()
        if kind is not None and m:
            kinds = tuple(k for k in kinds if k == kind)
        ids = self.find_all(name)
        if kinds:
            ids = [i for i in ids if self.kind(i) in kinds]
        if not ids:
            raise TypeNotFound(name if not m else f"{m.group(1)} {name}")
        ids.sort(key=lambda i: (self.kind(i) == BtfKind.FWD, self.kind(i) in (BtfKind.FUNC, BtfKind.VAR), i))
        return self.type(ids[0])

    def type_id(self, type_: int | str | BtfType) -> int:
        """Normalise a type given as id, name or BtfType to its id."""
        if isinstance(type_, BtfType):
            return type_.id
        if isinstance(type_, int):
            return self._check_id(type_)
        return self.find(type_).id

    # --- layout -----------------------------------------------------------------------------------

    def resolve(self, type_id: int | str | BtfType, *, keep_typedefs: bool = False) -> BtfType:
        """Strip typedefs and qualifiers (const, volatile, restrict, type tags)."""
        t = self.type(self.type_id(type_id))
        strip = _QUALIFIERS if keep_typedefs else MODIFIERS
        for _ in range(MAX_DEPTH):
            if t.kind not in strip:
                return t
            t = self.type(t.type_id)
        raise CorruptData(f"BTF modifier chain from type {self.type_id(type_id)} is a cycle")

    def size_of(self, type_id: int | str | BtfType, _depth: int = 0) -> int:
        """sizeof() the type. Raises CorruptData for void, functions, or a cyclic definition."""
        if _depth > MAX_DEPTH:
            raise CorruptData("BTF type nesting too deep (cycle?)")
        t = self.resolve(type_id)
        if t.kind in _SIZED and t.kind != BtfKind.DATASEC:
            return t.size
        if t.kind == BtfKind.PTR:
            return 8
        if t.kind == BtfKind.ARRAY:
            return t.nelems * self.size_of(t.elem_type_id, _depth + 1)
        if t.kind == BtfKind.DATASEC:
            return t.size
        if t.kind == BtfKind.VAR:
            return self.size_of(t.type_id, _depth + 1)
        raise CorruptData(f"BTF type {t.id} ({t.kind.name} {t.name!r}) has no size")

    def _member_map(self, struct_id: int) -> dict[str, ResolvedMember]:
        """name -> member for a struct/union, anonymous members flattened (offsets from the outer struct)."""
        cached = self._members_cache.get(struct_id)
        if cached is not None:
            return cached
        out: dict[str, ResolvedMember] = {}
        budget = [MAX_WALK]

        def walk(sid: int, base_bits: int, path: tuple[str, ...], depth: int) -> None:
            if depth > MAX_DEPTH:
                raise CorruptData(f"BTF anonymous members of type {struct_id} nest too deep (cycle?)")
            members = self.type(sid).members
            budget[0] -= len(members)
            if budget[0] < 0:
                raise CorruptData(f"BTF type {struct_id} flattens to more than {MAX_WALK} members")
            for m in members:
                bits = base_bits + m.bit_offset
                if m.name:
                    out.setdefault(m.name, ResolvedMember(m.name, m.type_id, bits, m.bitfield_size, path + (m.name,)))
                    continue
                inner = self.resolve(m.type_id)
                if inner.kind in (BtfKind.STRUCT, BtfKind.UNION):
                    walk(inner.id, bits, path + ("",), depth + 1)

        walk(struct_id, 0, (), 0)
        self._members_cache[struct_id] = out
        return out

    def member(self, type_: int | str | BtfType, name: str) -> ResolvedMember:
        """Member `name` of a struct/union (through typedefs; anonymous members searched). A dotted
        path "a.b" follows nested (non-pointer) members. Raises FieldNotFound, TypeNotFound."""
        t = self.resolve(type_)
        bits = 0
        path: tuple[str, ...] = ()
        found: ResolvedMember | None = None
        for part in name.split("."):
            if t.kind not in (BtfKind.STRUCT, BtfKind.UNION):
                raise FieldNotFound(self.type_name(t.id), part)
            m = self._member_map(t.id).get(part)
            if m is None:
                raise FieldNotFound(self.type_name(t.id), part)
            bits += m.bit_offset
            path += m.path
            found = m
            t = self.resolve(m.type_id)
        assert found is not None
        return ResolvedMember(found.name, found.type_id, bits, found.bitfield_size, path)

    def member_offset(self, type_: int | str | BtfType, name: str) -> int:
        """Byte offset of member `name` (dotted paths allowed) in a struct/union."""
        return self.member(type_, name).offset

    def members(self, type_: int | str | BtfType) -> dict[str, ResolvedMember]:
        """All named members, anonymous structs/unions flattened."""
        t = self.resolve(type_)
        if t.kind not in (BtfKind.STRUCT, BtfKind.UNION):
            raise CorruptData(f"BTF type {t.id} is {t.kind.name}, not a struct or union")
        return dict(self._member_map(t.id))

    def enum_value(self, type_: int | str | BtfType, name: str) -> int:
        t = self.resolve(type_)
        for v in t.enum_values:
            if v.name == name:
                return v.value
        raise FieldNotFound(self.type_name(t.id), name)

    def enumerator(self, name: str) -> int:
        """Value of enumerator `name` in any enum (e.g. "PIDTYPE_PID"). Raises TypeNotFound."""
        for i in np.nonzero((self._kind_arr == BtfKind.ENUM) | (self._kind_arr == BtfKind.ENUM64))[0].tolist():
            for v in self.type(self._first_id + i).enum_values:
                if v.name == name:
                    return v.value
        raise TypeNotFound(f"enumerator {name}")

    def type_name(self, type_id: int | BtfType) -> str:
        """C spelling of a type: "struct task_struct *", "unsigned int", "char [16]"."""
        return self._type_name(type_id, 0, [MAX_WALK])

    def _type_name(self, type_id: int | BtfType, _depth: int, budget: list[int]) -> str:
        t = type_id if isinstance(type_id, BtfType) else self.type(type_id)
        budget[0] -= 1
        if _depth > MAX_DEPTH or budget[0] < 0:
            return "<cycle>"
        k = t.kind
        if k == BtfKind.UNKN:
            return "void"
        if k in (BtfKind.STRUCT, BtfKind.UNION):
            return f"{k.name.lower()} {t.name or '<anonymous>'}"
        if k in (BtfKind.ENUM, BtfKind.ENUM64):
            return f"enum {t.name or '<anonymous>'}"
        if k == BtfKind.FWD:
            return f"{'union' if t.kind_flag else 'struct'} {t.name}"
        if k == BtfKind.PTR:
            return self._type_name(t.type_id, _depth + 1, budget) + " *"
        if k == BtfKind.ARRAY:
            return f"{self._type_name(t.elem_type_id, _depth + 1, budget)} [{t.nelems}]"
        if k in (BtfKind.CONST, BtfKind.VOLATILE, BtfKind.RESTRICT):
            return f"{k.name.lower()} {self._type_name(t.type_id, _depth + 1, budget)}"
        if k == BtfKind.TYPE_TAG:
            return self._type_name(t.type_id, _depth + 1, budget)
        if k == BtfKind.FUNC_PROTO:
            args = ", ".join(self._type_name(p.type_id, _depth + 1, budget) if p.type_id else "..." for p in t.params)
            return f"{self._type_name(t.type_id, _depth + 1, budget)} (*)({args})"
        return t.name or k.name.lower()


def parse_btf(data: bytes | bytearray | memoryview) -> Btf:
    """Parse a BTF blob (same as ``Btf(data)``)."""
    return Btf(data)


# --- locating BTF -------------------------------------------------------------------------------------

_HEADER_PREFIX = b"\x9f\xeb\x01"


def find_btf(data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> Iterator[int]:
    """Offsets of plausible BTF headers (magic, version 1, sections inside data) in data[start:end].
    RAM holds stale copies: parse and validate each candidate."""
    mv = memoryview(data).cast("B")
    stop = len(mv) if end is None else min(end, len(mv))
    for m in re.finditer(re.escape(_HEADER_PREFIX), mv[:stop]):
        off = m.start()
        if off < start or off + HEADER.size > stop:
            continue
        _magic, _v, _f, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(mv, off)
        if hdr_len < HEADER.size or hdr_len > 256:
            continue
        if off + hdr_len + max(type_off + type_len, str_off + str_len) > stop:
            continue
        yield off


def btf_from_reader(read: Callable[[int, int], bytes], start_gva: int, stop_gva: int) -> Btf:
    """Parse the BTF between ``__start_BTF`` and ``__stop_BTF`` through ``read(gva, size)``."""
    size = stop_gva - start_gva
    if size < HEADER.size or size > MAX_BTF_SIZE:
        raise CorruptData(f"__stop_BTF - __start_BTF = {size:#x} is not a plausible BTF size", start_gva)
    chunks = []
    pos = 0
    while pos < size:
        n = min(1 << 20, size - pos)
        chunks.append(read(start_gva + pos, n))
        pos += n
    btf = Btf(b"".join(chunks))
    if btf.size > size:
        raise CorruptData("BTF header claims more than __stop_BTF - __start_BTF", start_gva)
    return btf


def btf_from_kallsyms(read: Callable[[int, int], bytes], kallsyms: Any) -> Btf:
    """The kernel's BTF, located through kallsyms (``__start_BTF``/``__stop_BTF``). Raises
    UnsupportedKernel when the kernel was built without CONFIG_DEBUG_INFO_BTF."""
    try:
        start, stop = kallsyms.address("__start_BTF"), kallsyms.address("__stop_BTF")
    except VmsightError as e:
        raise UnsupportedKernel("BTF", "kernel built without CONFIG_DEBUG_INFO_BTF (no __start_BTF)") from e
    return btf_from_reader(read, start, stop)


__all__ = [
    "BTF_MAGIC", "Btf", "BtfEnumValue", "BtfKind", "BtfMember", "BtfParam", "BtfType", "BtfVarSecinfo",
    "INT_BOOL", "INT_CHAR", "INT_SIGNED", "MODIFIERS", "ResolvedMember", "btf_from_kallsyms",
    "btf_from_reader", "find_btf", "parse_btf",
]
