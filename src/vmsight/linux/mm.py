"""Memory maps: ``for_each_vma(mm)`` (maple tree since v6.1, linked list before), VMA permissions,
offsets and file paths (``d_path``), as ``/proc/PID/maps`` shows them.

VMAs live in ``mm->mm_mt``, a maple tree, since v6.1 (commit d4af56c5c7c6 "mm: start tracking VMAs with
maple tree"); the ``mm->mmap`` / ``vma->vm_next`` list was removed in the same release (commit
763ecb035029 "mm: remove the vma linked list") and is kept as the fallback for older kernels.

The maple-tree walker works on any ``read(gva, size) -> bytes`` so it can be fed adversarial memory:
nodes are read whole (256 bytes), node pointers must be 256-byte aligned kernel addresses, the walk is
depth- and node-bounded and detects revisits; anything off raises :class:`~vmsight.errors.CorruptData`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vmsight.errors import CorruptData, FieldNotFound, TypeNotFound, VmsightError
from vmsight.linux.kernel import Kernel
from vmsight.linux.tasks import Task, find_task
from vmsight.memory.paging import is_kernel_half, user_half_end

log = logging.getLogger(__name__)

ReadFn = Callable[[int, int], bytes]

# include/linux/maple_tree.h (unchanged v6.1 - v6.12)
MAPLE_NODE_SIZE = 256
MAPLE_NODE_MASK = 0xFF
MAPLE_NODE_TYPE_SHIFT = 3
MAPLE_NODE_TYPE_MASK = 0x0F
MAPLE_RESERVED_RANGE = 4096
MAPLE_HEIGHT_MAX = 31
MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 0, 1, 2, 3
MAX_VMAS = 1 << 20           # vm.max_map_count defaults to 65530
MAX_PATH_DEPTH = 256
MAX_PATH_LEN = 4096

# vm_flags (include/linux/mm.h)
VM_READ, VM_WRITE, VM_EXEC, VM_SHARED, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x8, 0x80


@dataclass(frozen=True)
class MapleLayout:
    """Where pivots, slots and the metadata ``end`` byte sit in a 256-byte node, per node type:
    (pivots offset, number of pivots, slots offset, number of slots, meta-end offset)."""

    range64: tuple[int, int, int, int, int] = (8, 15, 128, 16, 248)
    arange64: tuple[int, int, int, int, int] = (8, 9, 80, 10, 240)


DEFAULT_MAPLE_LAYOUT = MapleLayout()


def maple_layout(kernel: Kernel) -> MapleLayout:
    """The node layout from BTF when it describes the maple structs, else the header's constants."""
    try:
        off = kernel.offsetof
        r = (off("maple_range_64", "pivot"), 15, off("maple_range_64", "slot"), 16,
             off("maple_range_64", "meta") + off("maple_metadata", "end"))
        a = (off("maple_arange_64", "pivot"), 9, off("maple_arange_64", "slot"), 10,
             off("maple_arange_64", "meta") + off("maple_metadata", "end"))
        return MapleLayout(r, a)
    except (FieldNotFound, TypeNotFound, CorruptData):
        return DEFAULT_MAPLE_LAYOUT


def _xa_is_node(entry: int) -> bool:
    return entry & 3 == 2 and entry > MAPLE_RESERVED_RANGE


def mt_entries(read: ReadFn, root: int, *, la57: bool, layout: MapleLayout = DEFAULT_MAPLE_LAYOUT,
               max_entries: int = MAX_VMAS, max_nodes: int = 1 << 18) -> Iterator[tuple[int, int, int]]:
    """Yield (first index, last index, entry) for every non-NULL entry of the maple tree whose
    ``ma_root`` is ``root``, in index order (``mt_for_each``). Node pointers must lie in the kernel half
    of the paging mode (``la57``). Raises CorruptData on a malformed tree."""
    if root == 0:
        return
    if not _xa_is_node(root):
        # A tree holding one entry at index 0 keeps it in ma_root directly.
        yield 0, 0, root
        return
    seen: set[int] = set()
    count = 0
    # Explicit stack of (encoded node, min, max, depth), so depth does not use Python recursion.
    stack: list[tuple[int, int, int, int]] = [(root, 0, (1 << 64) - 1, 0)]
    while stack:
        enode, lo, hi, depth = stack.pop()
        node = enode & ~MAPLE_NODE_MASK
        ntype = (enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
        if depth > MAPLE_HEIGHT_MAX:
            raise CorruptData(f"maple tree deeper than {MAPLE_HEIGHT_MAX}", node)
        if not is_kernel_half(node, la57=la57):
            raise CorruptData(f"maple node pointer {enode:#x} is not a kernel address", node)
        if node in seen:
            raise CorruptData("maple tree node visited twice (cycle)", node)
        seen.add(node)
        if len(seen) > max_nodes:
            raise CorruptData(f"maple tree has more than {max_nodes} nodes", node)
        if ntype == MAPLE_ARANGE_64:
            poff, npiv, soff, nslots, meta = layout.arange64
        elif ntype in (MAPLE_LEAF_64, MAPLE_RANGE_64):
            poff, npiv, soff, nslots, meta = layout.range64
        else:
            raise CorruptData(f"maple node type {ntype} is not used by VMA trees", node)
        raw = read(node, MAPLE_NODE_SIZE)
        if len(raw) != MAPLE_NODE_SIZE:
            raise CorruptData("short read of a maple node", node)
        parent = struct.unpack_from("<Q", raw, 0)[0]
        if parent & ~MAPLE_NODE_MASK == node:
            raise CorruptData("dead maple node (freed while walked): pause the VM", node)
        pivots = struct.unpack_from(f"<{npiv}Q", raw, poff)
        slots = struct.unpack_from(f"<{nslots}Q", raw, soff)
        end = _data_end(ntype, pivots, raw[meta], hi, nslots)
        leaf = ntype < MAPLE_RANGE_64
        children: list[tuple[int, int, int, int]] = []
        prev = lo
        for i in range(end + 1):
            piv = pivots[i] if i < npiv else hi
            if i > 0 and piv == 0:
                break                      # unused tail
            if piv < prev or piv > hi:
                raise CorruptData(f"maple pivot {piv:#x} outside [{prev:#x}, {hi:#x}]", node)
            entry = slots[i]
            if leaf:
                if entry and not (entry < MAPLE_RESERVED_RANGE and entry & 3 == 2):
                    count += 1
                    if count > max_entries:
                        raise CorruptData(f"maple tree has more than {max_entries} entries", node)
                    yield prev, piv, entry
            elif entry:
                # Child slots hold encoded nodes (mt_mk_node: node | type << 3 | MAPLE_ENODE_NULL), not
                # xa-internal pointers like the root (mte_mk_root adds MAPLE_ROOT_NODE, 0x2).
                if entry & 0x3 or not entry & 0x4 or not is_kernel_half(entry, la57=la57):
                    raise CorruptData(f"maple child {entry:#x} is not a node pointer", node)
                children.append((entry, prev, piv, depth + 1))
            if piv >= hi:
                break
            prev = piv + 1
        stack.extend(reversed(children))


def _data_end(ntype: int, pivots: tuple[int, ...], meta_end: int, hi: int, nslots: int) -> int:
    """``ma_data_end()``: index of the last used slot."""
    npiv = len(pivots)
    if ntype == MAPLE_ARANGE_64:
        end = meta_end
    elif pivots[npiv - 1] == 0:
        end = meta_end
    elif pivots[npiv - 1] == hi:
        end = npiv - 1
    else:
        end = npiv
    if end >= nslots:
        raise CorruptData(f"maple node data end {end} beyond {nslots} slots")
    return end


# --- VMAs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vma:
    """One ``struct vm_area_struct`` as a line of /proc/PID/maps shows it: read from guest memory
    (:func:`for_each_vma`) or parsed from a maps file (:func:`vmsight.idle.procfs.parse_maps`). Addresses
    are virtual addresses in that process (guest-virtual when it runs inside a VM).

    ``perms`` like "r-xp"; ``offset`` in bytes (0 for anonymous mappings, as /proc shows); ``dev``/``inode``
    as the maps file gives them ("00:00"/0 for guest VMAs, whose file identity is not read); ``name`` is the
    path, ``[heap]``/``[stack]``/``[vdso]``..., or "" for anonymous. Read from guest memory only: ``flags``
    (vm_flags), ``file`` (gva of its struct file, or 0) and ``gva`` (of the vm_area_struct); 0 otherwise."""

    start_gva: int
    end_gva: int
    perms: str
    offset: int
    dev: str = "00:00"
    inode: int = 0
    name: str = ""
    flags: int = 0
    file: int = 0
    gva: int = 0

    # the kernel's own names (vm_start, vm_end) and /proc's column name, for callers of the Linux layer
    @property
    def start(self) -> int:
        return self.start_gva

    @property
    def end(self) -> int:
        return self.end_gva

    @property
    def path(self) -> str:
        return self.name

    @property
    def size(self) -> int:
        return self.end_gva - self.start_gva

    @property
    def kind(self) -> str:
        """``heap``, ``stack``, ``anon``, ``file`` or ``special`` ([vdso], [vvar], ...)."""
        if self.name == "[heap]":
            return "heap"
        if self.name.startswith("[stack"):
            return "stack"
        if not self.name or self.name.startswith("[anon"):
            return "anon"
        if self.name.startswith("["):
            return "special"
        return "file"

    @property
    def label(self) -> str:
        """Key of the per-VMA breakdown: heap, stack, all anonymous memory together, each file by path."""
        k = self.kind
        if k == "anon":
            return "[anon]"
        if k == "stack":
            return "[stack]"
        return self.name

    def as_dict(self) -> dict[str, Any]:
        """What ``vmsight maps --json`` prints."""
        return {"start": self.start_gva, "end": self.end_gva, "perms": self.perms, "offset": self.offset,
                "path": self.name}

    def maps_line(self) -> str:
        """The line without device and inode columns: ``start-end perms offset path``."""
        return f"{self.start_gva:08x}-{self.end_gva:08x} {self.perms} {self.offset:08x} {self.name}".rstrip()

    def to_json(self) -> dict[str, object]:
        """The idle record's form (:meth:`from_json` reads it back; keys added later get defaults)."""
        return {"start_gva": self.start_gva, "end_gva": self.end_gva, "perms": self.perms,
                "offset": self.offset, "dev": self.dev, "inode": self.inode, "name": self.name}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Vma:
        return cls(int(d["start_gva"]), int(d["end_gva"]), str(d["perms"]),  # type: ignore[call-overload]
                   int(d.get("offset", 0)), str(d.get("dev", "00:00")),  # type: ignore[call-overload]
                   int(d.get("inode", 0)), str(d.get("name", "")))  # type: ignore[call-overload]


def perms_of(flags: int) -> str:
    return ("r" if flags & VM_READ else "-") + ("w" if flags & VM_WRITE else "-") + \
        ("x" if flags & VM_EXEC else "-") + ("s" if flags & VM_MAYSHARE else "p")


def vma_pointers(kernel: Kernel, mm: int) -> Iterator[int]:
    """gvas of the VMAs of ``mm`` in address order."""
    if not is_kernel_half(mm, la57=kernel.la57):
        raise CorruptData(f"mm pointer {mm:#x} is not a kernel address", mm)
    try:
        mt = kernel.offsetof("mm_struct", "mm_mt")
    except FieldNotFound:
        yield from _vma_list(kernel, mm)   # before v6.1 (commit 763ecb035029)
        return
    root = kernel.read_u64(mm + mt + kernel.offsetof("maple_tree", "ma_root"))
    for _lo, _hi, entry in mt_entries(kernel.read, root, la57=kernel.la57, layout=kernel.derived(maple_layout)):
        if not is_kernel_half(entry, la57=kernel.la57):
            raise CorruptData(f"maple entry {entry:#x} is not a VMA pointer", mm)
        yield entry


def _vma_list(kernel: Kernel, mm: int) -> Iterator[int]:
    nxt = kernel.offsetof("vm_area_struct", "vm_next")
    vma = kernel.read_u64(mm + kernel.offsetof("mm_struct", "mmap"))
    seen: set[int] = set()
    while vma:
        if not is_kernel_half(vma, la57=kernel.la57) or vma in seen or len(seen) >= MAX_VMAS:
            raise CorruptData("mm->mmap VMA list is corrupt (bad pointer, cycle or too long)", vma)
        seen.add(vma)
        yield vma
        vma = kernel.read_u64(vma + nxt)


@dataclass(frozen=True)
class _VmaLayout:
    start: int
    end: int
    flags: int
    pgoff: int
    file: int
    ops: int
    private: int
    f_path: int
    mm_brk: int
    mm_start_brk: int
    mm_start_stack: int


def _vma_layout(kernel: Kernel) -> _VmaLayout:
    o = kernel.offsetof
    return _VmaLayout(o("vm_area_struct", "vm_start"), o("vm_area_struct", "vm_end"),
                      o("vm_area_struct", "vm_flags"), o("vm_area_struct", "vm_pgoff"),
                      o("vm_area_struct", "vm_file"), o("vm_area_struct", "vm_ops"),
                      o("vm_area_struct", "vm_private_data"), o("file", "f_path"),
                      o("mm_struct", "brk"), o("mm_struct", "start_brk"), o("mm_struct", "start_stack"))


def for_each_vma(kernel: Kernel, mm: int) -> Iterator[Vma]:
    """The VMAs of ``mm`` (a ``struct mm_struct *``) in address order, named as /proc/PID/maps names
    them. Raises CorruptData for an inconsistent tree (overlapping or unordered VMAs, or one reaching
    beyond the user half of the paging mode)."""
    lay = kernel.derived(_vma_layout)
    u64 = kernel.read_u64
    brk, start_brk, start_stack = u64(mm + lay.mm_brk), u64(mm + lay.mm_start_brk), u64(mm + lay.mm_start_stack)
    special_ops = {kernel.symbols.get("special_mapping_vmops")} - {None}
    new_heap_rule = kernel.version >= (6, 5)
    prev_end = 0
    user_end = user_half_end(la57=kernel.la57)
    for vma in vma_pointers(kernel, mm):
        start, end = u64(vma + lay.start), u64(vma + lay.end)
        if end <= start or start < prev_end:
            raise CorruptData(f"VMA {start:#x}-{end:#x} is empty or overlaps the previous one", vma)
        if end > user_end:
            raise CorruptData(f"VMA {start:#x}-{end:#x} reaches beyond the user half ({user_end:#x})", vma)
        prev_end = end
        flags = u64(vma + lay.flags)
        file = u64(vma + lay.file)
        path = ""
        offset = 0
        if file:
            offset = u64(vma + lay.pgoff) << 12
            path = d_path(kernel, file + lay.f_path)
        else:
            ops = u64(vma + lay.ops)
            if ops and ops in special_ops:
                # special_mapping_name(): ((struct vm_special_mapping *)vm_private_data)->name
                sm = u64(vma + lay.private)
                if is_kernel_half(sm, la57=kernel.la57):
                    name_ptr = u64(sm + kernel.offsetof("vm_special_mapping", "name"))
                    if is_kernel_half(name_ptr, la57=kernel.la57):
                        path = kernel.read_cstr(name_ptr, 64).decode("utf-8", "surrogateescape")
            if not path:
                # vma_is_initial_heap()/_stack(): v6.5 (commit 11250fd12eb8) made the heap test strict.
                if (start < brk and end > start_brk) if new_heap_rule else (start <= brk and end >= start_brk):
                    path = "[heap]"
                elif start <= start_stack <= end:
                    path = "[stack]"
        yield Vma(start, end, perms_of(flags), offset, name=path, flags=flags, file=file, gva=vma)


def d_path(kernel: Kernel, path_gva: int) -> str:
    """The name of a ``struct path`` (vfsmount, dentry): dentry names up to the mount root, then across
    mount points up to the root mount (``d_path`` relative to the global root). A file that was
    unlinked gets " (deleted)" as in /proc."""
    o = kernel.offsetof
    u64 = kernel.read_u64
    mnt = u64(path_gva + o("path", "mnt"))
    dentry = u64(path_gva + o("path", "dentry"))
    d_parent, d_name = o("dentry", "d_parent"), o("dentry", "d_name")
    q_name, q_len = o("qstr", "name"), o("qstr", "len")
    mnt_root = o("vfsmount", "mnt_root")
    mount_mnt = o("mount", "mnt")
    mnt_parent, mnt_mountpoint = o("mount", "mnt_parent"), o("mount", "mnt_mountpoint")
    parts: list[bytes] = []
    total = 0
    deleted = False
    first = True
    for _ in range(MAX_PATH_DEPTH):
        if not is_kernel_half(dentry, la57=kernel.la57) or not is_kernel_half(mnt, la57=kernel.la57):
            raise CorruptData(f"path walk reached a bad pointer (dentry {dentry:#x}, mnt {mnt:#x})", path_gva)
        parent = u64(dentry + d_parent)
        if first:
            # d_unlinked(): hashed entries have d_hash.pprev set (include/linux/dcache.h).
            deleted = parent != dentry and u64(dentry + o("dentry", "d_hash") + 8) == 0
            first = False
        at_mnt_root = dentry == u64(mnt + mnt_root)
        if at_mnt_root or parent == dentry:
            mount = mnt - mount_mnt
            up = u64(mount + mnt_parent)
            if not at_mnt_root or up == mount:
                break          # the root mount (or a dentry disconnected from its mount)
            dentry = u64(mount + mnt_mountpoint)   # cross into the parent mount
            mnt = up + mount_mnt
            continue
        length = int.from_bytes(kernel.read(dentry + d_name + q_len, 4), "little")
        name_ptr = u64(dentry + d_name + q_name)
        if length > 255 or not is_kernel_half(name_ptr, la57=kernel.la57):
            raise CorruptData(f"dentry name of length {length} at {name_ptr:#x}", dentry)
        name = kernel.read(name_ptr, length)
        total += length + 1
        if total > MAX_PATH_LEN:
            raise CorruptData("path longer than PATH_MAX", path_gva)
        parts.append(name)
        dentry = parent
    else:
        raise CorruptData(f"path deeper than {MAX_PATH_DEPTH} components (cycle?)", path_gva)
    path = "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in reversed(parts))
    return path + " (deleted)" if deleted else path


def vmas_of(task: Task) -> list[Vma]:
    """The VMAs of ``task`` (empty for kernel threads and exited tasks, which have no mm)."""
    mm = task.mm
    return list(for_each_vma(task.kernel, mm)) if mm else []


def task_vmas(kernel: Kernel, pid: int) -> list[Vma]:
    """The VMAs of process ``pid`` (empty for kernel threads). Raises ProcessNotFound."""
    return vmas_of(find_task(kernel, pid))


def vma_of(task: Task, gva: int) -> Vma | None:
    """The VMA of ``task`` containing ``gva`` (``find_vma`` semantics without the 'next' case)."""
    if not task.mm:
        return None
    for v in for_each_vma(task.kernel, task.mm):
        if v.start <= gva < v.end:
            return v
        if v.start > gva:
            break
    return None


__all__ = [
    "DEFAULT_MAPLE_LAYOUT", "MapleLayout", "Vma", "d_path", "for_each_vma", "maple_layout", "mt_entries",
    "perms_of", "task_vmas", "vma_of", "vmas_of", "vma_pointers", "VmsightError",
]
