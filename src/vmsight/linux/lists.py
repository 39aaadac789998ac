"""The kernel's circular doubly linked lists (``struct list_head``), walked with bounds: a generic helper
like drgn's ``list_for_each``, below every kernel object that is kept in a list (tasks, threads, modules). Not ``list.py``: importing
a submodule binds its name in the package, and ``list`` would shadow the builtin in ``linux/__init__``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vmsight.errors import CorruptData
from vmsight.memory.paging import is_kernel_half


def list_for_each(read_u64: Callable[[int], int], head: int, *, max_nodes: int, la57: bool,
                  what: str = "list") -> Iterator[int]:
    """Yield the ``struct list_head`` gvas of the circular list at ``head`` (``head`` itself excluded).

    Bounded: raises CorruptData for a pointer outside the kernel half of the paging mode (``la57``:
    the kernel's ``Kernel.la57``), a cycle that does not pass through ``head``, or more than
    ``max_nodes`` nodes. Read failures propagate as MemoryAccessError."""
    seen: set[int] = set()
    prev = head
    node = read_u64(head)
    while node != head:
        if not is_kernel_half(node, la57=la57) or node & 7:
            raise CorruptData(f"{what}: next pointer {node:#x} is not an aligned kernel address", prev)
        if node in seen:
            raise CorruptData(f"{what}: cycle at {node:#x} that does not return to the head", node)
        if len(seen) >= max_nodes:
            raise CorruptData(f"{what}: more than {max_nodes} entries", head)
        seen.add(node)
        yield node
        prev = node
        node = read_u64(node)


__all__ = ["list_for_each"]
