"""KVMi page access restriction (SET_PAGE_ACCESS / GET_PAGE_ACCESS, PF events) on a stock QEMU.

KVM restricted a GPA in its EPT; QEMU's gdbstub watches guest-*virtual* ranges only. So a restriction on a
GPA becomes watchpoints on **every guest-virtual mapping of it** that a bounded reverse walk finds: the
kernel half of ``init_top_pgt`` (direct map, kernel image, vmalloc, modules, fixmap) once, and the user half
of every live task's ``mm->pgd``. A hit is checked against the hitting vCPU's own page tables (the gva must
still map a restricted GPA under its CR3: stale aliases and other processes' same-gva pages are dropped).

Semantics (v6, KVMI-NOTES): access bits R 1, W 2, X 4; rwx (7) = no restriction (forgotten); a SET stops at
the first error. What this VM can catch (:func:`unsupported_reason`), as CHECK-able facts:

* TCG: W and R removal (write and read watches of any length, 4 KiB per alias). X removal: never (the gdbstub
  has no execute watch) -> ``-KVM_EOPNOTSUPP``.
* KVM: nothing: 4 debug registers of <= 8 bytes, no read-only watch, so a 4 KiB page cannot be watched ->
  ``-KVM_EOPNOTSUPP`` for any restriction (rwx, the removal of a restriction, always succeeds).

Limits, documented rather than hidden:

* Mappings are found when the reverse map is refreshed (with the VM stopped): at every SET_PAGE_ACCESS that
  changes restrictions and, while any restriction exists, by :meth:`PageRestrictions.poll` (the KVMi session:
  at a PF hit) once ``refresh_s`` (default 1 s) passed since the last walk. A mapping created in between is
  not watched until that refresh; in a session whose restricted pages see no hit and no SET, not at all.
* The watch traps *after* the access (QEMU, TCG): the access has completed when the PF event is sent.
  CONTINUE and RETRY both let it stand exactly once (what a KVM guest sees once the introspector gave the right
  back and retried); a RETRY without giving the right back leaves the restriction for the next access.
* ``gva`` of a write is exact when it changed a byte (the page is compared with a shadow copy); otherwise,
  and for reads, it is the alias's page start.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmsight.errors import CorruptData, TranslationFault, VmsightError
from vmsight.events.errors import CapabilityError
from vmsight.events.types import Access, Action, PageAccess, Reply
from vmsight.memory.paging import (
    PAGE_SIZE_4K,
    gva_to_gpa,
    kernel_half_start,
    kernel_pgd,
    user_half_end,
    walk_range,
)
from vmsight.memory.physical import PhysicalMemory

if TYPE_CHECKING:
    from vmsight.events.dispatcher import Capabilities, Dispatcher, WatchHandle
    from vmsight.kvmi.server import Session
    from vmsight.linux.kernel import Kernel

log = logging.getLogger(__name__)

ACCESS_R, ACCESS_W, ACCESS_X = 1, 2, 4
ACCESS_ALL = ACCESS_R | ACCESS_W | ACCESS_X
KVM_EINVAL, KVM_ENOENT, KVM_EOPNOTSUPP = 22, 2, 95   # the same values as wire.KVM_* (no import cycle)
PAGE = PAGE_SIZE_4K
MAX_TABLES = 1 << 14       # tables one root's walk may read (a cyclic or huge tree stops there)
MAX_ROOTS = 4096           # user page-table roots walked per refresh
MAX_ALIASES = 256          # aliases of one GPA that get watches (the zero page is mapped everywhere)


# --- access table ------------------------------------------------------------------------------------

class AccessTable:
    """Per-page rights (view 0). Pages not in the table have every right."""

    def __init__(self) -> None:
        self._rights: dict[int, int] = {}

    def get(self, gpa: int) -> int:
        return self._rights.get(gpa & ~(PAGE - 1), ACCESS_ALL)

    def set(self, gpa: int, access: int) -> None:
        page = gpa & ~(PAGE - 1)
        if access & ACCESS_ALL == ACCESS_ALL:
            self._rights.pop(page, None)   # rwx: the restriction is forgotten
        else:
            self._rights[page] = access & ACCESS_ALL

    def restricted(self) -> dict[int, int]:
        """page gpa -> rights, for every restricted page."""
        return dict(self._rights)

    def __len__(self) -> int:
        return len(self._rights)


def unsupported_reason(caps: Capabilities, access: int) -> str | None:
    """Why ``access`` (the rights left) cannot be enforced on a VM with ``caps``; None when it can."""
    removed = ACCESS_ALL & ~access
    if not removed:
        return None
    if removed & ACCESS_X:
        return "execute restrictions need an execute watch, which QEMU's gdbstub does not have"
    if caps.watch_lengths is not None and PAGE not in caps.watch_lengths:
        return (f"a 4 KiB page cannot be watched with {caps.accelerator} watchpoints "
                f"(lengths {list(caps.watch_lengths)})")
    if removed & ACCESS_R and not caps.read_watch:
        return f"{caps.accelerator} cannot watch reads"
    return None


# --- reverse mapping ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alias:
    """``gva`` maps the restricted page ``gpa``; ``dtb`` is the root it was found under (None: the shared
    kernel half, valid under every CR3)."""

    gva: int
    gpa: int
    dtb: int | None


@dataclass
class ReverseMap:
    aliases: dict[int, list[Alias]] = field(default_factory=dict)   # page gpa -> aliases
    roots: int = 0                                                 # roots walked
    truncated: list[str] = field(default_factory=list)             # why a walk stopped early
    seconds: float = 0.0


def find_aliases(mem: PhysicalMemory, kernel_dtb: int, user_dtbs: Iterable[int], pages: Iterable[int], *,
                 la57: bool, max_tables: int = MAX_TABLES, max_roots: int = MAX_ROOTS,
                 max_aliases: int = MAX_ALIASES) -> ReverseMap:
    """Every gva that maps one of ``pages`` (4 KiB-aligned gpas): the kernel half under ``kernel_dtb``
    and the user half under each of ``user_dtbs``. Bounded: at most ``max_tables`` tables per root (a cyclic
    or huge tree stops there, noted in ``truncated``), ``max_roots`` user roots, ``max_aliases`` per page."""
    t0 = time.perf_counter()
    targets = sorted({p & ~(PAGE - 1) for p in pages})
    out = ReverseMap({p: [] for p in targets})
    if not targets:
        return out
    wanted = set(targets)
    users = list(dict.fromkeys(user_dtbs))
    if len(users) > max_roots:
        out.truncated.append(f"{len(users)} user roots, only the first {max_roots} walked")
        users = users[:max_roots]
    roots: list[tuple[int, int, int, int | None]] = [(kernel_dtb, kernel_half_start(la57=la57), 1 << 64, None)]
    roots += [(d, 0, user_half_end(la57=la57), d) for d in users]
    full: set[int] = set()
    for dtb, lo, hi, tag in roots:
        try:
            for leaf in walk_range(mem, dtb, lo, hi, la57=la57, max_tables=max_tables):
                if leaf.page_size == PAGE:
                    if leaf.gpa in wanted:
                        _add(out, Alias(leaf.gva, leaf.gpa, tag), max_aliases, full)
                    continue
                # a large page: every target inside its frame
                i = bisect.bisect_left(targets, leaf.gpa)
                while i < len(targets) and targets[i] < leaf.gpa + leaf.page_size:
                    t = targets[i]
                    _add(out, Alias(leaf.gva + (t - leaf.gpa), t, tag), max_aliases, full)
                    i += 1
        except CorruptData as e:
            out.truncated.append(f"root {dtb:#x}: {e}")
        out.roots += 1
    out.seconds = time.perf_counter() - t0
    return out


def _add(out: ReverseMap, alias: Alias, limit: int, full: set[int]) -> None:
    lst = out.aliases[alias.gpa]
    if len(lst) < limit:
        lst.append(alias)
    elif alias.gpa not in full:
        full.add(alias.gpa)
        out.truncated.append(f"gpa {alias.gpa:#x} has more than {limit} mappings; the rest are not watched")


# --- the engine ------------------------------------------------------------------------------------

@dataclass
class PfHit:
    """A restricted access: what the KVMi PF event carries, and the dispatcher event (live) it came from."""

    vcpu: int
    gva: int
    gpa: int
    access: int            # ACCESS_R or ACCESS_W
    event: PageAccess


PfCallback = Callable[[PfHit], Action]


class PageRestrictions:
    """SET/GET_PAGE_ACCESS over a :class:`~vmsight.events.dispatcher.Dispatcher`: restricted pages become
    watches on their aliases; a hit calls ``on_pf`` (the KVMi PF event) with the VM stopped, which returns
    the introspector's action. ``user_dtbs`` (default: every live task's ``mm->pgd`` gpa) supplies user roots."""

    def __init__(self, dispatcher: Dispatcher, kernel: Kernel, on_pf: PfCallback, *,
                 refresh_s: float = 1.0, user_dtbs: Callable[[], Iterable[int]] | None = None) -> None:
        self.d = dispatcher
        self.kernel = kernel
        self.on_pf = on_pf
        self.refresh_s = refresh_s
        self.table = AccessTable()
        self._user_dtbs = user_dtbs or (lambda: task_dtbs(kernel))
        self._watches: dict[tuple[int, Access], WatchHandle] = {}   # (alias gva, kind) -> watch
        self._alias_dtbs: dict[int, set[int] | None] = {}              # alias gva -> roots (None: kernel)
        self._shadow: dict[int, bytes] = {}                            # restricted page -> last contents
        self.last = ReverseMap()
        self._last_walk = 0.0
        self.hits = 0
        self.dropped = 0

    # --- commands

    def get_page_access(self, gpas: Sequence[int]) -> list[int]:
        return [self.table.get(g) for g in gpas]

    def set_page_access(self, entries: Sequence[tuple[int, int]]) -> int:
        """Apply ``(gpa, access)`` pairs in order; returns 0 or the positive KVM error of the first entry
        that failed (the entries before it stay applied, as in v6)."""
        err = 0
        changed = False
        for gpa, access in entries:
            if access & ~ACCESS_ALL:
                err = KVM_EINVAL
                break
            if not self._in_ram(gpa):
                err = KVM_ENOENT
                break
            reason = unsupported_reason(self.d.capabilities(), access)
            if reason:
                log.info("SET_PAGE_ACCESS gpa %#x access %d: %s", gpa, access, reason)
                err = KVM_EOPNOTSUPP
                break
            if self.table.get(gpa) != access & ACCESS_ALL:
                self.table.set(gpa, access)
                changed = True
        if changed:
            self.refresh()
        return err

    def _in_ram(self, gpa: int) -> bool:
        return self.kernel.phys.layout.find(gpa) is not None

    # --- mapping upkeep

    def poll(self) -> None:
        """Refresh the aliases if restrictions exist and ``refresh_s`` passed (call from the event loop)."""
        if len(self.table) and time.monotonic() - self._last_walk >= self.refresh_s:
            self.refresh()

    def refresh(self) -> ReverseMap:
        """Walk again and make the watches match the restricted pages' aliases, with the VM stopped: the
        walk is consistent and the shadow copies are taken when every watch is in (a write after them
        traps, so the first hit's offset is exact)."""
        with self.d._stopped():   # noqa: SLF001 - the dispatcher's re-entrant stop block (no public one)
            return self._refresh()

    def _refresh(self) -> ReverseMap:
        rights = self.table.restricted()
        la57 = self.kernel.la57
        try:
            users = list(self._user_dtbs()) if rights else []
        except VmsightError as e:
            log.warning("task list unreadable (%s): user mappings keep their previous watches", e)
            users = sorted({d for s in self._alias_dtbs.values() if s for d in s})
        rmap = find_aliases(self.kernel.phys, self.kernel.dtb, users, rights, la57=la57)
        for note in rmap.truncated:
            log.warning("page-access reverse walk: %s", note)
        want: dict[tuple[int, Access], int] = {}
        dtbs: dict[int, set[int] | None] = {}
        for gpa, aliases in rmap.aliases.items():
            kinds = [k for bit, k in ((ACCESS_W, Access.WRITE), (ACCESS_R, Access.READ)) if not rights[gpa] & bit]
            for a in aliases:
                page_gva = a.gva & ~(PAGE - 1)
                for k in kinds:
                    want[(page_gva, k)] = gpa
                if a.dtb is None:
                    dtbs[page_gva] = None
                elif page_gva not in dtbs or dtbs[page_gva] is not None:
                    dtbs.setdefault(page_gva, set()).add(a.dtb)  # type: ignore[union-attr]
        self._alias_dtbs = {**self._alias_dtbs, **dtbs}
        self._shadow = {g: self._shadow.get(g) or self.kernel.phys.read_gpa(g, PAGE) for g in rights}
        for key in [k for k in self._watches if k not in want]:
            self.d.remove(self._watches.pop(key))
        for key in want:
            if key not in self._watches:
                try:
                    self._watches[key] = self.d.add_watchpoint(key[0], PAGE, key[1], self._on_hit)
                except CapabilityError as e:   # SET_PAGE_ACCESS checked this: a changed VM
                    log.warning("cannot watch alias %#x: %s", key[0], e)
        self._alias_dtbs = dtbs
        self.last = rmap
        self._last_walk = time.monotonic()
        return rmap

    def watched(self) -> list[tuple[int, str]]:
        """(alias gva, kind) of every watch in place."""
        return sorted((g, k.value) for g, k in self._watches)

    def close(self) -> None:
        """Forget every restriction and remove every watch."""
        self.table = AccessTable()
        for w in self._watches.values():
            self.d.remove(w)
        self._watches.clear()
        self._shadow.clear()

    # --- hits

    def _on_hit(self, ev: PageAccess) -> Reply | None:
        page_gva = ev.gva
        regs = ev.registers()
        root = kernel_pgd(regs["cr3"])
        roots = self._alias_dtbs.get(page_gva)
        if roots is not None and root not in roots:
            self.dropped += 1           # the same user gva in another process
            return None
        try:
            gpa = gva_to_gpa(self.kernel.phys, root, page_gva, la57=self.kernel.la57) & ~(PAGE - 1)
        except TranslationFault:
            gpa = -1
        rights = self.table.get(gpa) if gpa >= 0 else ACCESS_ALL
        kind = ACCESS_W if ev.access is Access.WRITE else ACCESS_R
        if rights & kind:
            self.dropped += 1           # a stale alias: it no longer maps a page restricted for this kind
            return None
        offset = 0
        if kind == ACCESS_W:
            now = self.kernel.phys.read_gpa(gpa, PAGE)
            old = self._shadow.get(gpa)
            if old is not None and old != now:
                x = int.from_bytes(old, "little") ^ int.from_bytes(now, "little")
                offset = ((x & -x).bit_length() - 1) // 8     # the lowest byte that changed
            self._shadow[gpa] = now
        self.hits += 1
        action = self.on_pf(PfHit(ev.vcpu, page_gva + offset, gpa + offset, kind, ev))
        # The access already happened (the watch traps after it): RETRY and CONTINUE both let it stand.
        return Reply(action if isinstance(action, Action) else Action.CONTINUE)


def task_dtbs(kernel: Kernel) -> list[int]:
    """gpa of ``mm->pgd`` (kernel PGD: it maps the user half too, also under PTI) of every process with
    an mm; tasks whose mm cannot be read are skipped."""
    from vmsight.linux.tasks import for_each_process

    out: list[int] = []
    for t in for_each_process(kernel):
        try:
            if t.mm:
                out.append(t.kernel_dtb)
        except VmsightError:
            continue
    return list(dict.fromkeys(out))



# --- KVMi session glue -------------------------------------------------------------------------------

class SessionPages:
    """SET/GET_PAGE_ACCESS and PF events of a :class:`vmsight.kvmi.server.Session` with a dispatcher: the
    engine is made on the first SET (the kernel is found then); hits send PF events while PF is enabled
    for the hitting vCPU (else the access just completes). The aliases are refreshed at every SET that
    changes rights and at a hit once ``refresh_s`` passed since the last walk."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.engine: PageRestrictions | None = None

    def _engine(self) -> PageRestrictions:
        if self.engine is None:
            d = self.s.dispatcher
            assert d is not None
            self.engine = PageRestrictions(d, d.kernel, self._on_pf)
        return self.engine

    def get_page_access(self, view: int, gpas: Sequence[int]) -> tuple[int, list[int]]:
        if view != 0:
            return KVM_EINVAL, []
        if self.engine is None:
            return 0, [ACCESS_ALL] * len(gpas)
        return 0, self.engine.get_page_access(gpas)

    def set_page_access(self, view: int, entries: Sequence[tuple[int, int]]) -> int:
        if view != 0:
            return KVM_EINVAL
        try:
            return self._engine().set_page_access(entries)
        except VmsightError as e:
            log.warning("KVMi SET_PAGE_ACCESS: %s", e)
            return KVM_EOPNOTSUPP

    def _on_pf(self, hit: PfHit) -> Action:
        from vmsight.kvmi import wire

        s = self.s
        eng = self._engine()
        vcpu = s.kvmi_vcpu(hit.vcpu)
        if not s.event_enabled(vcpu, s.dialect.event("PF").id):
            return Action.CONTINUE
        reply = s.send_event(hit.event, "PF", {"gva": hit.gva, "gpa": hit.gpa, "access": hit.access, "view": 0})
        if reply.data.get("singlestep"):
            log.info("KVMi PF reply asks for a single step: not supported here, the access completed")
        if time.monotonic() - eng._last_walk >= eng.refresh_s:  # noqa: SLF001 - our own engine
            eng.refresh()
        return Action.RETRY if reply.action == wire.ACTION_RETRY else Action.CONTINUE

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


__all__ = ["ACCESS_ALL", "ACCESS_R", "ACCESS_W", "ACCESS_X", "AccessTable", "Alias", "PageRestrictions", "PfHit",
           "ReverseMap", "SessionPages", "find_aliases", "task_dtbs", "unsupported_reason"]
