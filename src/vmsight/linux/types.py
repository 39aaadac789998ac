"""Typed views of kernel objects: BTF types over guest memory (drgn-like, read-only).

``Object(reader, btf, type, gva)`` is the object of that type at that gva. Members are attributes
and pointers are followed on attribute access, so ``task.mm.pgd`` reads ``task->mm->pgd``. Methods
end in ``_`` so they never hide a kernel member: ``value_()``, ``string_()``, ``deref_()``,
``address_``, ``type_name_()``, ``member_()``, ``read_()``, ``cast_()``.

A *reader* is anything with ``read(gva, size) -> bytes`` or a plain callable ``read(gva, size)``
(an AddressSpace, a Kernel, a test lambda over a bytearray). Guest memory is untrusted: list walks
are bounded and cycle-checked, strings are length-limited; failures raise CorruptData,
FieldNotFound, TypeNotFound (all VmsightError).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from vmsight.errors import CorruptData, FieldNotFound, SymbolNotFound, TypeNotFound, VmsightError
from vmsight.linux.btf import INT_BOOL, INT_CHAR, Btf, BtfKind, BtfType
from vmsight.linux.lists import list_for_each
from vmsight.memory.virtual import cstr, read_cstr

if TYPE_CHECKING:
    from vmsight.linux.kallsyms import Kallsyms
    from vmsight.linux.kernel import SymbolTable

log = logging.getLogger(__name__)

ReadFn = Callable[[int, int], bytes]
TypeSpec = int | str | BtfType

MAX_LIST_NODES = 1 << 20   # default bound of list walks
MAX_STRING = 4096          # default bound of char* strings
MAX_VALUE_DEPTH = 8        # nesting of struct/array values in value_()
MAX_VALUE_ELEMENTS = 1 << 16  # array elements value_() will read (corrupt BTF can claim 2**32)
_U64 = (1 << 64) - 1


class KernelReader(Protocol):
    def read(self, gva: int, size: int) -> bytes: ...


def as_read_fn(reader: KernelReader | ReadFn) -> ReadFn:
    """``read(gva, size)`` of a reader object, or the callable itself."""
    read = getattr(reader, "read", None)
    if callable(read):
        return read
    if callable(reader):
        return reader
    raise TypeError(f"{reader!r} has no read(gva, size)")


def _checked_read(read: ReadFn, gva: int, size: int) -> bytes:
    data = read(gva, size)
    if len(data) != size:
        raise CorruptData(f"short read: {len(data)} of {size} bytes", gva)
    return data


class Object:
    """The object of BTF type ``type_id`` at ``address`` (a gva). For a bitfield member,
    ``bit_offset`` (0-7, from ``address``) and ``bit_size`` locate the bits."""

    __slots__ = ("_read", "btf", "type_id", "address_", "bit_offset_", "bit_size_", "_t")

    def __init__(self, reader: KernelReader | ReadFn, btf: Btf, type_: TypeSpec, address: int, *,
                 bit_offset: int = 0, bit_size: int = 0) -> None:
        self._read = as_read_fn(reader)
        self.btf = btf
        self.type_id = btf.type_id(type_)
        self.address_ = address & _U64
        self.bit_offset_ = bit_offset
        self.bit_size_ = bit_size
        self._t = btf.resolve(self.type_id)

    # --- type info ----------------------------------------------------------------------------

    @property
    def type_(self) -> BtfType:
        """The object's type with typedefs and qualifiers stripped."""
        return self._t

    def type_name_(self) -> str:
        return self.btf.type_name(self.type_id)

    def sizeof_(self) -> int:
        return self.btf.size_of(self.type_id)

    def __repr__(self) -> str:
        return f"Object({self.type_name_()!r}, {self.address_:#x})"

    def _new(self, type_: TypeSpec, address: int, bit_offset: int = 0, bit_size: int = 0) -> Object:
        return Object(self._read, self.btf, type_, address, bit_offset=bit_offset, bit_size=bit_size)

    # --- raw access ---------------------------------------------------------------------------

    def read_(self) -> bytes:
        """The object's bytes."""
        return _checked_read(self._read, self.address_, self.sizeof_())

    def _pointer_value(self) -> int:
        return int.from_bytes(_checked_read(self._read, self.address_, 8), "little")

    # --- members ------------------------------------------------------------------------------

    def member_(self, name: str) -> Object:
        """Member ``name`` (dotted paths allowed; through anonymous structs/unions). On a pointer to a
        struct the pointer is followed first (``task.mm.pgd``). Raises FieldNotFound."""
        obj = self
        if self._t.kind == BtfKind.PTR:
            obj = self.deref_()
        t = obj._t
        if t.kind not in (BtfKind.STRUCT, BtfKind.UNION):
            raise FieldNotFound(obj.type_name_(), name)
        m = obj.btf.member(t, name)
        bits = obj.bit_offset_ + m.bit_offset
        if m.bitfield_size:
            return obj._new(m.type_id, obj.address_ + bits // 8, bits % 8, m.bitfield_size)
        return obj._new(m.type_id, obj.address_ + bits // 8)

    def __getattr__(self, name: str) -> Object:
        # Dunder lookups (copy, pickle) and our own unset slots (half-built object) are not members.
        if (name.startswith("__") and name.endswith("__")) or name in Object.__slots__:
            raise AttributeError(name)
        return self.member_(name)

    def has_member_(self, name: str) -> bool:
        t = self.btf.resolve(self._t.type_id) if self._t.kind == BtfKind.PTR else self._t
        try:
            self.btf.member(t, name)
        except (FieldNotFound, CorruptData):
            return False
        return True

    # --- pointers and arrays ------------------------------------------------------------------

    def deref_(self) -> Object:
        """``*ptr``. Raises CorruptData on a NULL pointer or a pointer to void/function."""
        if self._t.kind != BtfKind.PTR:
            raise CorruptData(f"deref of non-pointer {self.type_name_()}", self.address_)
        target = self._pointer_value()
        if target == 0:
            raise CorruptData(f"NULL {self.type_name_()} dereferenced", self.address_)
        tgt = self.btf.resolve(self._t.type_id)
        if tgt.kind in (BtfKind.UNKN, BtfKind.FUNC_PROTO):
            raise CorruptData(f"cannot dereference {self.type_name_()}", self.address_)
        return self._new(self._t.type_id, target)

    def __getitem__(self, i: int) -> Object:
        t = self._t
        if t.kind == BtfKind.ARRAY:
            if t.nelems and not 0 <= i < t.nelems:
                raise IndexError(f"index {i} out of range for {self.type_name_()}")
            return self._new(t.elem_type_id, self.address_ + i * self.btf.size_of(t.elem_type_id))
        if t.kind == BtfKind.PTR:
            base = self._pointer_value()
            if base == 0:
                raise CorruptData(f"NULL {self.type_name_()} indexed", self.address_)
            return self._new(t.type_id, base + i * self.btf.size_of(t.type_id))
        raise CorruptData(f"{self.type_name_()} is not an array or pointer", self.address_)

    def __len__(self) -> int:
        if self._t.kind == BtfKind.ARRAY:
            return self._t.nelems
        raise TypeError(f"{self.type_name_()} has no length")

    def __iter__(self) -> Iterator[Object]:
        if self._t.kind != BtfKind.ARRAY:
            raise TypeError(f"{self.type_name_()} is not an array")
        for i in range(self._t.nelems):
            yield self[i]

    def cast_(self, type_: TypeSpec) -> Object:
        """The same memory seen as another type."""
        return self._new(type_, self.address_)

    # --- values -------------------------------------------------------------------------------

    def value_(self, _depth: int = 0) -> Any:
        """Python value: int (integers, enums, pointers as gva), bool, float, str never (use
        string_()), list for arrays, dict for structs/unions."""
        t = self._t
        k = t.kind
        if k == BtfKind.INT or k in (BtfKind.ENUM, BtfKind.ENUM64):
            return self._int_value(t)
        if k == BtfKind.PTR:
            return self._pointer_value()
        if k == BtfKind.FLOAT:
            raw = _checked_read(self._read, self.address_, t.size)
            if t.size in (4, 8):
                return struct.unpack("<f" if t.size == 4 else "<d", raw)[0]
            raise CorruptData(f"float of size {t.size} not supported", self.address_)
        if _depth >= MAX_VALUE_DEPTH:
            raise CorruptData(f"value of {self.type_name_()} nests too deep", self.address_)
        if k == BtfKind.ARRAY:
            if t.nelems > MAX_VALUE_ELEMENTS:
                raise CorruptData(f"{self.type_name_()} has more than {MAX_VALUE_ELEMENTS} elements: "
                                  "index it instead", self.address_)
            return [e.value_(_depth + 1) for e in self]
        if k in (BtfKind.STRUCT, BtfKind.UNION):
            return {name: self.member_(name).value_(_depth + 1) for name in self.btf.members(t)}
        raise CorruptData(f"{self.type_name_()} has no value", self.address_)

    def _int_value(self, t: BtfType) -> int | bool:
        size = t.size
        signed = t.is_signed
        bit_off, bits = self.bit_offset_, self.bit_size_
        if t.kind == BtfKind.INT and not bits and (t.int_offset or t.int_bits != 8 * size):
            bit_off, bits = t.int_offset, t.int_bits  # pre-kind_flag bitfield encoding
        if bits:
            nbytes = (bit_off + bits + 7) // 8
            raw = int.from_bytes(_checked_read(self._read, self.address_, nbytes), "little")
            v = (raw >> bit_off) & ((1 << bits) - 1)
            if signed and v >> (bits - 1):
                v -= 1 << bits
        else:
            if size not in (1, 2, 4, 8, 16):
                raise CorruptData(f"integer of size {size}", self.address_)
            v = int.from_bytes(_checked_read(self._read, self.address_, size), "little", signed=signed)
        if t.kind == BtfKind.INT and t.int_encoding & INT_BOOL:
            return bool(v)
        return v

    def __int__(self) -> int:
        return int(self.value_())

    def __index__(self) -> int:
        return int(self.value_())

    def __bool__(self) -> bool:
        return True  # an object exists; use value_() to test its contents

    def enum_name_(self) -> str | None:
        """Name of the enumerator equal to this enum's value (None if no enumerator matches)."""
        v = self.value_()
        for e in self._t.enum_values:
            if e.value == v:
                return e.name
        return None

    def string_(self, limit: int = MAX_STRING) -> str:
        """A char array (up to its first NUL) or the NUL-terminated string a char pointer points
        to (at most ``limit`` bytes), decoded as UTF-8 with replacement."""
        t = self._t
        if t.kind == BtfKind.ARRAY and _is_char(self.btf, t.elem_type_id):
            raw = _checked_read(self._read, self.address_, min(t.nelems, limit))
        elif t.kind == BtfKind.PTR and _is_char(self.btf, t.type_id):
            target = self._pointer_value()
            if target == 0:
                raise CorruptData(f"NULL {self.type_name_()} read as a string", self.address_)
            raw = read_cstr(self._read, target, limit)
        else:
            raise CorruptData(f"{self.type_name_()} is not a string", self.address_)
        return cstr(raw).decode("utf-8", "surrogateescape")


def _is_char(btf: Btf, type_id: int) -> bool:
    t = btf.resolve(type_id)
    return t.kind == BtfKind.INT and t.size == 1 and (bool(t.int_encoding & INT_CHAR) or t.name in (
        "char", "unsigned char", "signed char", "u8", "__u8", "s8"))


# --- a program: reader + BTF (+ symbols) -----------------------------------------------------------

#: Types of well-known kernel variables whose type BTF does not record (only per-cpu variables get
#: a BTF VAR).
KNOWN_VARIABLES = {
    "init_task": "struct task_struct",
    "init_mm": "struct mm_struct",
    "init_uts_ns": "struct uts_namespace",
    "init_pid_ns": "struct pid_namespace",
    "init_nsproxy": "struct nsproxy",
    "init_cred": "struct cred",
    "init_fs": "struct fs_struct",
    "init_files": "struct files_struct",
    "init_net": "struct net",
    "contig_page_data": "struct pglist_data",
    "boot_cpu_data": "struct cpuinfo_x86",
    "jiffies_64": "u64",
    "page_offset_base": "unsigned long",
    "vmemmap_base": "unsigned long",
    "vmalloc_base": "unsigned long",
}


class Program:
    """Typed access to one kernel: ``object(type, gva)``, ``variable(name)``, ``container_of``,
    ``list_for_each_entry``, ``member_offset``. ``symbols`` (optional): the kernel's
    :class:`~vmsight.linux.kernel.SymbolTable`, or a decoded kallsyms (its ``address(name)`` is used)."""

    def __init__(self, reader: KernelReader | ReadFn, btf: Btf,
                 symbols: SymbolTable | Kallsyms | None = None) -> None:
        self.read = as_read_fn(reader)
        self.btf = btf
        self.symbols = symbols

    def __repr__(self) -> str:
        return f"<Program {self.btf!r}>"

    def object(self, type_: TypeSpec, gva: int) -> Object:
        return Object(self.read, self.btf, type_, gva)

    def variable(self, name: str, type_: TypeSpec | None = None) -> Object:
        """The kernel variable ``name`` (gva from the symbol table). Its type is ``type_``, else the
        BTF VAR of that name (per-cpu variables), else :data:`KNOWN_VARIABLES`. Raises
        SymbolNotFound, TypeNotFound."""
        if self.symbols is None:
            raise SymbolNotFound(name)
        gva = self.symbols.address(name)
        if type_ is None:
            var = self.btf.find_all(name, BtfKind.VAR)
            if var:
                type_ = self.btf.type(var[0]).type_id
            elif name in KNOWN_VARIABLES:
                type_ = KNOWN_VARIABLES[name]
            else:
                raise TypeNotFound(f"type of variable {name} (pass it explicitly)")
        return self.object(type_, gva)

    def member_offset(self, type_: TypeSpec, member: str) -> int:
        return member_offset(self.btf, type_, member)

    def size_of(self, type_: TypeSpec) -> int:
        return self.btf.size_of(type_)

    def container_of(self, ptr: int | Object, type_: TypeSpec, member: str) -> Object:
        return container_of(self, ptr, type_, member)

    def list_for_each_entry(self, head: int | Object, type_: TypeSpec, member: str, *,
                            limit: int = MAX_LIST_NODES) -> Iterator[Object]:
        return list_for_each_entry(self, head, type_, member, limit=limit)


def member_offset(btf: Btf, type_: TypeSpec, member: str) -> int:
    """``offsetof(type, member)`` in bytes; anonymous structs/unions are searched, dotted paths
    followed (``member_offset(btf, "mm_struct", "pgd")``). Raises FieldNotFound, TypeNotFound."""
    return btf.member_offset(type_, member)


def _gva_of(ptr: int | Object) -> int:
    """A node address from an int, a pointer Object (its value) or an in-memory Object (its address)."""
    if isinstance(ptr, Object):
        return ptr.value_() if ptr.type_.kind == BtfKind.PTR else ptr.address_
    return ptr


def container_of(prog: Program, ptr: int | Object, type_: TypeSpec, member: str) -> Object:
    """The ``type_`` object whose ``member`` is at ``ptr`` (kernel ``container_of``)."""
    gva = _gva_of(ptr)
    return prog.object(type_, gva - prog.btf.member_offset(type_, member))


def _list_next_offset(btf: Btf) -> int:
    try:
        return btf.member_offset("struct list_head", "next")
    except (TypeNotFound, FieldNotFound):
        return 0  # struct list_head { next, prev }: stable since forever


def list_for_each_entry(prog: Program, head: int | Object, type_: TypeSpec, member: str, *,
                        limit: int = MAX_LIST_NODES) -> Iterator[Object]:
    """The ``type_`` entries of the circular ``struct list_head`` list at ``head`` (a gva, or the
    list_head Object / a pointer to it), linked through ``member``. Raises CorruptData on a link that is not
    an aligned kernel address (NULL included), a cycle that does not return to the head, or more than
    ``limit`` nodes."""
    head_gva = _gva_of(head)
    next_off = _list_next_offset(prog.btf)
    moff = prog.btf.member_offset(type_, member)
    read = prog.read

    def read_next(gva: int) -> int:
        return int.from_bytes(_checked_read(read, gva + next_off, 8), "little")

    # the one bounded list walker (linux/lists.py); a Program does not know the paging mode, so the
    # wider 5-level kernel half bounds the links (NULL and user pointers are refused either way)
    for node in list_for_each(read_next, head_gva, max_nodes=limit, la57=True, what=f"list at {head_gva:#x}"):
        yield prog.object(type_, node - moff)


# --- adapters for vmsight.linux.kernel ---------------------------------------------------------------

def make_program(kernel: Any) -> Program:
    """A Program over an attached kernel (anything with ``read(gva, size)``, ``btf`` and ``symbols``)."""
    btf = kernel.btf
    if not isinstance(btf, Btf):
        raise VmsightError(f"kernel.btf is {type(btf).__name__}, not vmsight.linux.btf.Btf")
    return Program(kernel, btf, getattr(kernel, "symbols", None))


def kernel_object(kernel: Any, name: str, type_name: str | None = None, gva: int | None = None) -> Object:
    """``kernel_object(k, "init_task")`` or ``kernel_object(k, "", "struct task_struct", gva)``: a typed view
    of a kernel variable, or of the object of that type at ``gva``."""
    prog = make_program(kernel)
    if gva is not None:
        if type_name is None:
            raise TypeNotFound("type of the object at an explicit gva (pass type_name)")
        return prog.object(type_name, gva)
    return prog.variable(name, type_name)


__all__ = [
    "KNOWN_VARIABLES", "MAX_LIST_NODES", "MAX_STRING", "KernelReader", "Object", "Program", "as_read_fn",
    "container_of", "kernel_object", "list_for_each_entry", "make_program", "member_offset",
]
