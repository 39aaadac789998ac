"""Find the Linux kernel in a running guest's memory, with no symbol files: the :class:`Kernel` object.

Discovery (first sight of a build):

1. CR3 of every vCPU (the target's ``control_registers()``: for a live VM one HMP ``info registers -a``, a
   few ms, no gdbstub; for a dump its notes). Under PTI a vCPU in user
   mode holds the user PGD, so the kernel half of the PGD pair (``cr3 & ~0x1fff``) is tried as well.
2. The kernel image: the pages at the bottom of ``__START_KERNEL_map`` (0xffffffff80000000, 1 GiB) that
   share one virtual-to-physical delta (with PTI the gaps between sections are unmapped). ``cleanup_highmap()`` zaps that region below ``_text``, so the run starts at ``_text``; its
   frame is the physical base (2 MiB aligned). This is a candidate only: it is validated below.
3. kallsyms, searched only inside the image: ``kallsyms_relative_base`` holds the runtime ``_text``, so the
   token table is looked for near the 8-byte-aligned copies of that value first, then anywhere in the
   image. Layout detection and decoding are :mod:`vmsight.linux.kallsyms`'s; a candidate is accepted only
   if its ``relative_base``, ``_text`` and ``kallsyms_token_table`` symbols agree with where it was found.
4. Validation of the image: a page walk from ``init_top_pgt`` (a kallsyms symbol) must map ``_text`` back to
   the physical base; ``linux_banner`` must be a banner; BTF must sit at ``__start_BTF`` with a header whose
   sizes match ``__stop_BTF``.
5. Per-boot values: ``page_offset_base``, ``vmemmap_base`` (randomised by KASLR), paging mode (CR4.LA57).

If no vCPU gives a usable page table (odd CPU state), every RAM range is scanned for token tables instead
and each candidate is validated the same way. What was learned about a build is cached on disk
(:mod:`vmsight.linux.cache`); a later attach to the same build only re-validates it against memory.

Kernel memory is read through three paths: the image (linear to the physical base), the direct map
(``gva - page_offset_base``) and, for everything else (vmalloc, modules, fixmap), a page walk from
``init_top_pgt``. Guest memory is untrusted: the reads are bounded and every failure is a typed error.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import re
import struct
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from vmsight.errors import (
    CorruptData,
    FieldNotFound,
    MemoryAccessError,
    NoLinuxKernel,
    PhysicalAddressError,
    SymbolNotFound,
    TypeNotFound,
    UnsupportedKernel,
    VmsightError,
)
from vmsight.linux import cache as kcache
from vmsight.linux.banner import BANNER_MAX, parse_banner
from vmsight.linux.modules import module_at
from vmsight.memory.paging import (
    dtb_from_cr3,
    gva_to_gpa,
    kernel_half_start,
    kernel_pgd,
    la57_from_cr4,
    walk_range,
)
from vmsight.memory.physical import PhysicalMemory
from vmsight.memory.virtual import AddressSpace, cstr, read_cstr

if TYPE_CHECKING:
    import numpy as np

    from vmsight.linux.btf import Btf
    from vmsight.linux.kallsyms import Kallsyms
    from vmsight.target import Machine

# numpy, the kallsyms decoder and the BTF parser are imported where first needed: a re-attach to a kernel
# seen before (the disk cache) needs none of them, and `vmsight ps` then starts in half the time.

log = logging.getLogger(__name__)
T = TypeVar("T")

START_KERNEL_MAP = 0xFFFFFFFF80000000     # __START_KERNEL_map
KERNEL_MAP_END = 0xFFFFFFFFC0000000       # + KERNEL_IMAGE_SIZE (1 GiB with KASLR)
DEFAULT_TEXT_GVA = 0xFFFFFFFF81000000     # _text without KASLR (CONFIG_PHYSICAL_START 0x1000000)
DEFAULT_TEXT_GPA = 0x1000000
IMAGE_ALIGN = 0x200000                    # CONFIG_PHYSICAL_ALIGN minimum on x86-64
# Defaults when the variables do not exist (kernel without CONFIG_RANDOMIZE_MEMORY).
DEFAULT_PAGE_OFFSET = {False: 0xFFFF888000000000, True: 0xFF11000000000000}
DEFAULT_VMEMMAP = {False: 0xFFFFEA0000000000, True: 0xFFD4000000000000}

_BTF_MAGIC = b"\x9f\xeb\x01"
_DIGITS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
_TT_WINDOW = 24 << 20          # token table lies this close to kallsyms_relative_base in both layouts
_KALLSYMS_BEFORE = 24 << 20    # bytes before the token table handed to the decoder
_KALLSYMS_AFTER = 4 << 20
NO_LINUX = "no Linux kernel found in guest memory"


@dataclass(frozen=True)
class ImageCandidate:
    """A linearly mapped run at the bottom of ``__START_KERNEL_map`` (not yet validated)."""

    text_gva: int
    text_gpa: int
    size: int
    dtb: int


# --- small memory helpers ------------------------------------------------------------------------

def _ram_chunks(phys: PhysicalMemory, gpa: int, size: int, *, overlap: int = 0,
                align: int = 1) -> Iterator[tuple[int, memoryview | bytes]]:
    """[gpa, gpa+size) in 16 MiB pieces as (gpa, buffer), each ``overlap`` bytes longer so that a match across
    a boundary is seen, its length a multiple of ``align``: a zero-copy view of the mapped RAM when the
    backend offers one (released when the caller moves on: drop arrays over it first), else a copy."""
    view = getattr(phys, "view", None)
    step = 16 << 20
    for lo in range(gpa, gpa + size, step):
        n = min(step + overlap, gpa + size - lo) & ~(align - 1)
        if n <= overlap:
            break
        mv = view(lo, n) if view is not None else phys.read_gpa(lo, n)
        try:
            yield lo, mv
        finally:
            if isinstance(mv, memoryview):
                mv.release()


def _u64_hits(phys: PhysicalMemory, gpa: int, size: int, value: int) -> list[int]:
    """gpas of 8-byte-aligned u64s equal to ``value`` in [gpa, gpa+size) (numpy over the RAM)."""
    import numpy as np

    out: list[int] = []
    for lo, mv in _ram_chunks(phys, gpa, size, align=8):
        arr = np.frombuffer(mv, dtype="<u8")
        out.extend(lo + 8 * int(i) for i in np.flatnonzero(arr == np.uint64(value)))
        del arr
    return out


def _pattern_hits(phys: PhysicalMemory, gpa: int, size: int, pattern: bytes, limit: int = 64) -> list[int]:
    """gpas where ``pattern`` starts in [gpa, gpa+size): numpy filter on the first bytes, exact check after."""
    import numpy as np

    out: list[int] = []
    overlap = len(pattern) - 1
    for lo, mv in _ram_chunks(phys, gpa, size, overlap=overlap):
        a = np.frombuffer(mv, dtype=np.uint8)
        c = np.flatnonzero(a[: len(a) - overlap] == pattern[0])
        for k in range(1, len(pattern)):
            c = c[a[c + k] == pattern[k]]
            if not len(c):
                break
        out.extend(lo + int(i) for i in c[:limit])
        del a, c
        if len(out) >= limit:
            break
    return out[:limit]


# --- image candidates from page tables -----------------------------------------------------------

def image_candidates(phys: PhysicalMemory, cr3s: list[int], la57: bool) -> Iterator[ImageCandidate]:
    """Kernel-image candidates from the ``__START_KERNEL_map`` mappings of each CR3 (and, for PTI, the
    kernel half of its PGD pair), lazily: the first one is usually the kernel."""
    dtbs: list[int] = []
    for cr3 in cr3s:
        for d in (dtb_from_cr3(cr3), kernel_pgd(cr3)):
            if d and d not in dtbs:
                dtbs.append(d)
    seen: set[tuple[int, int]] = set()
    for dtb in dtbs:
        try:
            run: list[int] | None = None   # [gva, gpa, size]
            for m in walk_range(phys, dtb, START_KERNEL_MAP, KERNEL_MAP_END, la57=la57, max_tables=2048):
                if m.gpa < 0:
                    continue
                if run is None:
                    run = [m.gva, m.gpa, m.page_size]
                elif m.gva - run[0] == m.gpa - run[1]:
                    # Same virtual-to-physical delta: still the image. Holes are allowed: with PTI the
                    # text/rodata and rodata/data gaps are unmapped (set_memory_np_noalias in
                    # free_kernel_image_pages(), arch/x86/mm/init_64.c).
                    run[2] = m.gva + m.page_size - run[0]
                else:
                    break
        except (MemoryAccessError, CorruptData) as e:
            log.debug("dtb %#x: no kernel map (%s)", dtb, e)
            continue
        if run is None or run[0] % IMAGE_ALIGN or run[1] % IMAGE_ALIGN or run[2] < IMAGE_ALIGN:
            log.debug("dtb %#x: no 2 MiB-aligned image at the bottom of the kernel map (%s)", dtb, run)
            continue
        cand = ImageCandidate(run[0], run[1], run[2], dtb)
        if (cand.text_gva, cand.text_gpa) not in seen:
            seen.add((cand.text_gva, cand.text_gpa))
            yield cand


# --- kallsyms inside an image ----------------------------------------------------------------------

def _decode_at(phys: PhysicalMemory, lo_gpa: int, hi_gpa: int, tt_gpa: int,
               timings: dict[str, float] | None = None) -> tuple[Kallsyms, int] | None:
    """Decode the kallsyms whose token table is at ``tt_gpa``, handing the decoder a copy of
    [lo_gpa, hi_gpa). Returns (kallsyms, buffer gpa) or None. Seconds spent decoding are added to
    ``timings["kallsyms_decode"]``."""
    from vmsight.linux.kallsyms import decode_kallsyms, find_token_tables

    # Validate the token table on a small read first: most digit runs are not one.
    slo = max(lo_gpa, tt_gpa - 0x30 * 130 - 8)
    small = phys.read_gpa(slo, min(hi_gpa, tt_gpa + 256 * 130 + 1024) - slo)
    if not any(True for _ in find_token_tables(small, tt_gpa - slo - 0x30 * 130 if tt_gpa - slo > 0x30 * 130 else 0,
                                               tt_gpa - slo + 32)):
        return None
    buf = phys.read_gpa(lo_gpa, hi_gpa - lo_gpa)
    last: VmsightError | None = None
    for tt in find_token_tables(buf, max(0, tt_gpa - lo_gpa - 0x30 * 130), tt_gpa - lo_gpa + 32):
        try:
            t = time.perf_counter()
            ks = decode_kallsyms(buf, tt)
            if timings is not None:
                timings["kallsyms_decode"] = timings.get("kallsyms_decode", 0.0) + time.perf_counter() - t
            return ks, lo_gpa
        except (UnsupportedKernel, CorruptData) as e:
            log.debug("token table at gpa %#x: %s", lo_gpa + tt.offset, e)
            last = e
    if last is not None:
        raise last
    return None


def kallsyms_in_image(phys: PhysicalMemory, cand: ImageCandidate,
                      timings: dict[str, float] | None = None) -> tuple[Kallsyms, int]:
    """The validated kallsyms of an image candidate and the gpa of its token table.

    Raises UnsupportedKernel (a token table validates but no known layout surrounds it) or NoLinuxKernel."""
    end = cand.text_gpa + cand.size
    # Digits of the token table near kallsyms_relative_base (== runtime _text) first, then anywhere.
    windows: list[tuple[int, int]] = []
    for hit in _u64_hits(phys, cand.text_gpa, cand.size, cand.text_gva)[:16]:
        windows.append((max(cand.text_gpa, hit - _TT_WINDOW), min(end, hit + _TT_WINDOW)))
    windows.append((cand.text_gpa, end))
    unsupported: UnsupportedKernel | None = None
    tried: set[int] = set()
    for lo, hi in windows:
        for d in _pattern_hits(phys, lo, hi - lo, _DIGITS):
            if d in tried:
                continue
            tried.add(d)
            blo = max(cand.text_gpa, d - _KALLSYMS_BEFORE)
            bhi = min(end, d + _KALLSYMS_AFTER)
            try:
                res = _decode_at(phys, blo, bhi, d, timings)
            except UnsupportedKernel as e:
                unsupported = e
                continue
            except (CorruptData, PhysicalAddressError) as e:
                log.debug("digits at gpa %#x: %s", d, e)
                continue
            if res is None:
                continue
            ks, buf_gpa = res
            tt = ks.token_table
            assert tt is not None
            tt_gpa = buf_gpa + tt.offset
            why = _kallsyms_mismatch(ks, cand, tt_gpa)
            if why:
                log.info("kallsyms candidate at gpa %#x rejected: %s", tt_gpa, why)
                continue
            return ks, tt_gpa
    if unsupported is not None:
        raise unsupported
    raise NoLinuxKernel(f"{NO_LINUX} (no valid kallsyms in the image candidate at gpa {cand.text_gpa:#x})")


def _kallsyms_mismatch(ks: Kallsyms, cand: ImageCandidate, tt_gpa: int) -> str:
    """Why this decoded table is not the live kernel's (a stale copy), or '' if it is consistent."""
    if ks.relative_base != cand.text_gva:
        return f"relative_base {ks.relative_base:#x} != mapped _text {cand.text_gva:#x}"
    text = ks.get("_text")
    if text is not None and text != cand.text_gva:
        return f"_text {text:#x} != {cand.text_gva:#x}"
    tt_sym = ks.get("kallsyms_token_table")
    if tt_sym is not None and tt_sym - cand.text_gva != tt_gpa - cand.text_gpa:
        return "kallsyms_token_table symbol does not point at the table that was decoded"
    return ""


# --- symbol table ---------------------------------------------------------------------------------

# Symbols every attach needs: kept by name in the cache so a warm attach does not build a full name index.
HOT_SYMBOLS = ("_text", "_end", "init_top_pgt", "linux_banner", "page_offset_base", "vmemmap_base",
               "init_task", "__per_cpu_offset", "nr_cpu_ids", "current_task", "pcpu_hot", "init_uts_ns",
               "saved_command_line", "modules", "boot_cpu_data", "__start_BTF", "__stop_BTF",
               "special_mapping_vmops", "legacy_special_mapping_vmops", "kallsyms_token_table")


class SymbolTable:
    """Name <-> gva over kallsyms arrays, with the lookup structures built lazily (a warm attach only
    needs the few :data:`HOT_SYMBOLS`; the arrays themselves come from ``load`` on first need). Duplicate
    names resolve like :meth:`vmsight.linux.kallsyms.Kallsyms.address` (first global, else first). Wraps a
    decoded :class:`~vmsight.linux.kallsyms.Kallsyms` directly when one is given."""

    def __init__(self, names: list[str] | None, types: bytes | None, addresses: np.ndarray | None, text_gva: int,
                 *, hot: dict[str, int] | None = None, kallsyms: Kallsyms | None = None,
                 load: Callable[[], tuple[list[str], bytes, np.ndarray]] | None = None,
                 absent: frozenset[str] = frozenset()) -> None:
        """``absent``: names known not to exist (hot symbols this kernel lacks), answered without loading."""
        self._names = names
        self._types = types
        self._addresses = addresses
        self._load = load
        self.relative_base = text_gva
        self._ks = kallsyms
        self._hot = dict(hot or {})
        self._absent = absent
        self._by_name: dict[str, int] | None = None
        self._order: np.ndarray | None = None
        self._sorted: np.ndarray | None = None

    def _arrays(self) -> tuple[list[str], bytes, np.ndarray]:
        if self._names is None or self._types is None or self._addresses is None:
            import numpy as np

            assert self._load is not None, "a SymbolTable needs arrays or a loader"
            names, types, addresses = self._load()
            self._names, self._types = names, types
            self._addresses = np.asarray(addresses, dtype=np.uint64)
            self._load = None
        return self._names, self._types, self._addresses

    @property
    def names(self) -> list[str]:
        return self._arrays()[0]

    @property
    def types(self) -> bytes:
        return self._arrays()[1]

    @property
    def addresses(self) -> np.ndarray:
        return self._arrays()[2]

    @classmethod
    def from_kallsyms(cls, ks: Kallsyms) -> SymbolTable:
        return cls(ks.names, bytes(ks.types), ks.addresses, ks.relative_base, kallsyms=ks)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"<SymbolTable {len(self)} symbols, _text={self.relative_base:#x}>"

    def _index(self) -> dict[str, int]:
        if self._by_name is None:
            if self._ks is not None:
                self._by_name = self._ks.as_dict()
            else:
                import numpy as np

                addr = self.addresses.tolist()
                by_name = dict(zip(reversed(self.names), reversed(addr), strict=True))
                t = np.frombuffer(self.types, dtype=np.uint8)
                glob = np.nonzero((t >= 65) & (t <= 90))[0][::-1].tolist()
                by_name.update((self.names[i], addr[i]) for i in glob)
                self._by_name = by_name
        return self._by_name

    def get(self, name: str, default: int | None = None) -> int | None:
        hit = self._hot.get(name)
        if hit is not None:
            return hit
        if name in self._absent:
            return default
        if self._ks is not None:
            return self._ks.get(name, default)
        return self._index().get(name, default)

    def address(self, name: str) -> int:
        gva = self.get(name)
        if gva is None:
            raise SymbolNotFound(name)
        return gva

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def hot(self) -> dict[str, int]:
        """Addresses of the :data:`HOT_SYMBOLS` present in this kernel."""
        return {n: a for n in HOT_SYMBOLS if (a := self.get(n)) is not None}

    def lookup(self, gva: int) -> tuple[str, int] | None:
        """(name, offset) of the symbol at or below ``gva``, or None below the first symbol."""
        if self._ks is not None:
            return self._ks.lookup(gva)
        import numpy as np

        if self._order is None:
            self._order = np.argsort(self.addresses, kind="stable")
            self._sorted = self.addresses[self._order]
        assert self._sorted is not None
        i = int(np.searchsorted(self._sorted, np.uint64(gva), side="right")) - 1
        if i < 0:
            return None
        return self.names[int(self._order[i])], gva - int(self._sorted[i])


# --- the Kernel ----------------------------------------------------------------------------------

class Kernel:
    """A discovered guest kernel. Create with :func:`discover` (or :meth:`Guest.kernel`).

    Attributes: ``text_gva``/``text_gpa`` (virtual and physical base: ``_text``), ``kaslr_slide``
    (virtual), ``phys_slide``, ``image_size``, ``symbols`` (:class:`~vmsight.linux.kallsyms.Kallsyms`),
    ``release`` (``uname -r``), ``banner``, ``build_id``, ``page_offset_base``, ``vmemmap_base``,
    ``la57``/``paging_mode``, ``dtb`` (gpa of ``init_top_pgt``), ``from_cache``, ``timings`` (seconds
    per discovery step)."""

    def __init__(self, phys: PhysicalMemory, *, text_gva: int, text_gpa: int, image_size: int, la57: bool,
                 symbols: SymbolTable, release: str, banner: str, build_id: str, btf_raw_gva: int,
                 btf_size: int, btf: Btf | None = None, vm: Machine | None = None, from_cache: bool = False,
                 timings: dict[str, float] | None = None, offsets: dict[str, int] | None = None,
                 cached: bool = False) -> None:
        """``offsets``: member offsets/sizes resolved before (the disk cache); ``cached``: the build has a
        cache entry, where offsets resolved from now on are added at exit."""
        self.phys = phys
        self.vm = vm
        self.text_gva = text_gva
        self.text_gpa = text_gpa
        self.image_size = image_size
        self.la57 = la57
        self.symbols = symbols
        self.release = release
        self.banner = banner
        self.build_id = build_id
        self.from_cache = from_cache
        self.timings = timings or {}
        self._btf = btf
        self._btf_gva = btf_raw_gva
        self._btf_size = btf_size
        self._derived: dict[Callable[[Kernel], Any], Any] = {}
        self._offsets: dict[tuple[str, str], int] = {
            tuple(k.split("\t", 1)): v for k, v in (offsets or {}).items() if "\t" in k}  # type: ignore[misc]
        self._new_offsets: dict[str, int] | None = {} if cached else None
        self.dtb = self.image_gpa(symbols.address("init_top_pgt"))
        # Through the VM when there is one, so its resume hook drops this translation cache too.
        self._aspace = (vm.address_space(self.dtb, la57=la57) if vm is not None
                        else AddressSpace(phys, self.dtb, la57=la57))
        self._pob_known = False
        self.page_offset_base = DEFAULT_PAGE_OFFSET[la57]
        self.page_offset_base = self._read_var("page_offset_base", DEFAULT_PAGE_OFFSET[la57])
        self._pob_known = True
        self.vmemmap_base = self._read_var("vmemmap_base", DEFAULT_VMEMMAP[la57])
        self._ram_end = phys.layout.end_gpa

    def __repr__(self) -> str:
        return (f"<Kernel {self.release} _text={self.text_gva:#x}@{self.text_gpa:#x} "
                f"slide={self.kaslr_slide:#x} {self.paging_mode}>")

    # --- facts ---

    @property
    def kaslr_slide(self) -> int:
        """Virtual KASLR slide: runtime ``_text`` minus the link-time 0xffffffff81000000."""
        return self.text_gva - DEFAULT_TEXT_GVA

    @property
    def phys_slide(self) -> int:
        """Physical base minus CONFIG_PHYSICAL_START (0x1000000)."""
        return self.text_gpa - DEFAULT_TEXT_GPA

    @property
    def paging_mode(self) -> str:
        return "5-level" if self.la57 else "4-level"

    @property
    def version(self) -> tuple[int, ...]:
        """(major, minor) from the release, e.g. (6, 1) — for messages only; drift is handled by feature."""
        m = re.match(r"(\d+)\.(\d+)", self.release)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def facts(self) -> dict[str, Any]:
        """Discovery results as a JSON-friendly dict."""
        return {"release": self.release, "banner": self.banner, "build_id": self.build_id,
                "text_gva": self.text_gva, "text_gpa": self.text_gpa, "kaslr_slide": self.kaslr_slide,
                "phys_slide": self.phys_slide, "image_size": self.image_size,
                "page_offset_base": self.page_offset_base, "vmemmap_base": self.vmemmap_base,
                "paging_mode": self.paging_mode, "init_top_pgt_gpa": self.dtb,
                "kallsyms_symbols": len(self.symbols), "btf_gva": self._btf_gva, "btf_size": self._btf_size,
                "from_cache": self.from_cache}

    # --- symbols ---

    def symbol(self, name: str) -> int:
        """gva of a kallsyms symbol. Raises SymbolNotFound."""
        return self.symbols.address(name)

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def lookup(self, gva: int) -> tuple[str, int] | None:
        """(symbol, offset) for a kernel gva (image symbols; module addresses give ``[module]``)."""
        if self.text_gva <= gva < self.text_gva + self.image_size:
            return self.symbols.lookup(gva)
        mod = module_at(self, gva)
        if mod is not None:
            return f"[{mod.name}]", gva - mod.base
        return None

    def symbolize(self, gva: int) -> str:
        """``name+0xoff`` (``0x...`` when unknown)."""
        hit = self.lookup(gva)
        if hit is None:
            return f"{gva:#x}"
        return f"{hit[0]}+{hit[1]:#x}" if hit[1] else hit[0]

    # --- memory ---

    def image_gpa(self, gva: int) -> int:
        """gpa of a gva inside the kernel image (linear). Raises CorruptData outside it."""
        off = gva - self.text_gva
        if not 0 <= off < self.image_size:
            raise CorruptData(f"gva {gva:#x} is outside the kernel image", gva)
        return self.text_gpa + off

    def gva_to_gpa(self, gva: int) -> int:
        """Kernel gva -> gpa: image, direct map, else a page walk from ``init_top_pgt``."""
        off = gva - self.text_gva
        if 0 <= off < self.image_size:
            return self.text_gpa + off
        if self._pob_known:
            off = gva - self.page_offset_base
            if 0 <= off < self._ram_end:
                return off
        return self._aspace.gva_to_gpa(gva)

    def read(self, gva: int, size: int) -> bytes:
        """``size`` bytes of kernel memory at ``gva``. Raises MemoryAccessError subclasses."""
        off = gva - self.text_gva
        if 0 <= off and off + size <= self.image_size:
            return self.phys.read_gpa(self.text_gpa + off, size)
        if self._pob_known:
            off = gva - self.page_offset_base
            if 0 <= off and off + size <= self._ram_end:
                return self.phys.read_gpa(off, size)
        return self._aspace.read(gva, size)

    def read_u64(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 8), "little")

    def read_u32(self, gva: int) -> int:
        return int.from_bytes(self.read(gva, 4), "little")

    def read_cstr(self, gva: int, max_len: int = 4096) -> bytes:
        """NUL-terminated string (without the NUL), at most ``max_len`` bytes (:func:`~vmsight.memory.virtual.read_cstr`)."""
        return read_cstr(self.read, gva, max_len)

    def write(self, gva: int, data: bytes) -> None:
        """Write kernel memory (explicit request only; the kernel is not told)."""
        off = gva - self.text_gva
        if 0 <= off and off + len(data) <= self.image_size:
            self.phys.write_gpa(self.text_gpa + off, data)
        else:
            self._aspace.write(gva, data)

    def invalidate(self) -> None:
        """Drop cached translations (call after the guest ran)."""
        self._aspace.invalidate()

    def _read_var(self, name: str, default: int) -> int:
        gva = self.symbols.get(name)
        return default if gva is None else self.read_u64(gva)

    def read_symbol_u64(self, name: str) -> int:
        return self.read_u64(self.symbol(name))

    # --- BTF and typed objects ---

    @property
    def btf(self) -> Btf:
        """The guest's parsed BTF (:mod:`vmsight.linux.btf`), parsed on first use if not cached."""
        if self._btf is None:
            self._btf = _parse_btf(self.read(self._btf_gva, self._btf_size))
        return self._btf

    def _resolved(self, key: tuple[str, str], resolve: Callable[[], int]) -> int:
        """An offset or size from BTF, remembered here and, for a cached build, on disk (-1/-2 record a
        missing member/type, so that has_member probes of absent fields cost nothing next time either)."""
        value = self._offsets.get(key)
        if value is None:
            try:
                value = int(resolve())
            except FieldNotFound:
                value = -1
            except TypeNotFound:
                value = -2
            self._offsets[key] = value
            if self._new_offsets is not None:
                if not self._new_offsets:
                    atexit.register(_flush_offsets, weakref.ref(self))
                self._new_offsets["\t".join(key)] = value
        if value == -1:
            raise FieldNotFound(key[0], key[1].removesuffix("#size"))
        if value == -2:
            raise TypeNotFound(key[0])
        return value

    def flush_offsets(self) -> None:
        """Add the offsets resolved since the last flush to the build's cache entry (also done at exit)."""
        if self._new_offsets:
            kcache.save_offsets(self.build_id, self._new_offsets)
            self._new_offsets = {}

    def offsetof(self, struct: str, member: str) -> int:
        """Byte offset of ``member`` (dotted path through nested structs allowed; anonymous members are
        searched) in ``struct`` (``"task_struct"``), from BTF, cached. Raises FieldNotFound, TypeNotFound."""
        return self._resolved((struct, member), lambda: self.btf.member_offset(struct, member))

    def has_member(self, struct: str, member: str) -> bool:
        try:
            self.offsetof(struct, member)
        except (FieldNotFound, TypeNotFound):
            return False
        return True

    def sizeof(self, type_name: str) -> int:
        return self._resolved((type_name, ""), lambda: self.btf.size_of(type_name))

    def member_size(self, struct: str, member: str) -> int:
        """sizeof() of a member (e.g. 4 or 8 for ``task_struct.__state`` depending on the kernel)."""
        return self._resolved((struct, member + "#size"),
                              lambda: self.btf.size_of(self.btf.member(struct, member).type_id))

    def btf_raw(self) -> bytes:
        return self.read(self._btf_gva, self._btf_size)

    # --- per-cpu and a few globals ---

    def nr_cpu_ids(self) -> int:
        gva = self.symbols.get("nr_cpu_ids")
        n = self.read_u32(gva) if gva is not None else 1
        if not 1 <= n <= 8192:
            raise CorruptData(f"nr_cpu_ids is {n}", gva)
        return n

    def per_cpu_offset(self, cpu: int) -> int:
        """``__per_cpu_offset[cpu]`` (equals the vCPU's gs_base in kernel mode)."""
        if not 0 <= cpu < self.nr_cpu_ids():
            raise VmsightError(f"no cpu {cpu}: the guest has nr_cpu_ids={self.nr_cpu_ids()}")
        return self.read_u64(self.symbol("__per_cpu_offset") + 8 * cpu)

    def per_cpu_ptr(self, name: str, cpu: int) -> int:
        """gva of per-cpu variable ``name`` on ``cpu`` (``per_cpu_ptr(&name, cpu)``)."""
        return (self.symbol(name) + self.per_cpu_offset(cpu)) & ((1 << 64) - 1)

    def saved_command_line(self) -> str:
        """The kernel command line (``saved_command_line``, a ``char *``)."""
        return self.read_cstr(self.read_symbol_u64("saved_command_line")).decode("utf-8", "surrogateescape")

    def pti_enabled(self) -> bool:
        """X86_FEATURE_PTI (word 7, bit 11: arch/x86/include/asm/cpufeatures.h) in boot_cpu_data."""
        gva = self.symbol("boot_cpu_data") + self.offsetof("cpuinfo_x86", "x86_capability") + 7 * 4
        return bool(self.read_u32(gva) >> 11 & 1)

    @property
    def pti(self) -> bool:
        """Page-table isolation is on (read once per kernel; off when the feature word is unreadable)."""
        return self.derived(_pti_or_off)

    def derived(self, make: Callable[[Kernel], T]) -> T:
        """``make(self)``, computed on first use and kept for this kernel: how helpers keep what they derive
        once per kernel (a struct layout from BTF offsets, a CPU feature) without attributes of their own on it.
        Boot-time facts only: nothing the guest changes while it runs."""
        try:
            return self._derived[make]
        except KeyError:
            value = self._derived[make] = make(self)
            return value


def _pti_or_off(kernel: Kernel) -> bool:
    try:
        return kernel.pti_enabled()
    except VmsightError as e:
        log.info("cannot read X86_FEATURE_PTI (%s); assuming PTI off", e)
        return False


# --- uts namespace ---------------------------------------------------------------------------------

UTS_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")
_UTS_LEN = 65   # __NEW_UTS_LEN + 1


def uname(kernel: Kernel) -> dict[str, str]:
    """``init_uts_ns.name`` (struct new_utsname: six char[65])."""
    base = _utsname_gva(kernel)
    raw = kernel.read(base, _UTS_LEN * len(UTS_FIELDS))
    out = {}
    for i, f in enumerate(UTS_FIELDS):
        field = raw[i * _UTS_LEN:(i + 1) * _UTS_LEN]
        out[f] = cstr(field).decode("utf-8", "surrogateescape")
    return out


def _utsname_gva(kernel: Kernel) -> int:
    return kernel.symbol("init_uts_ns") + kernel.offsetof("uts_namespace", "name")


def set_hostname(kernel: Kernel, hostname: str) -> None:
    """Write ``init_uts_ns.name.nodename`` (what ``hostname`` and ``uname -n`` print). Explicit write."""
    raw = hostname.encode()
    if not raw or len(raw) >= _UTS_LEN or b"\0" in raw:
        raise VmsightError(f"hostname must be 1-{_UTS_LEN - 1} bytes without NUL, got {len(raw)}")
    kernel.write(_utsname_gva(kernel) + _UTS_LEN, raw.ljust(_UTS_LEN, b"\0"))


# --- BTF adapter -----------------------------------------------------------------------------------

def _parse_btf(raw: bytes) -> Btf:
    from vmsight.linux.btf import Btf

    return Btf(raw)


def _check_btf_header(raw: bytes, gva: int) -> None:
    """BTF header (include/uapi/linux/btf.h): magic 0xeb9f, version 1, hdr_len, type/str sections that
    fit the blob between __start_BTF and __stop_BTF."""
    if len(raw) < 24 or raw[:3] != _BTF_MAGIC:
        raise CorruptData("no BTF header at __start_BTF", gva)
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<5I", raw, 4)
    if hdr_len < 24 or hdr_len + max(type_off + type_len, str_off + str_len) > len(raw):
        raise CorruptData("BTF header sizes exceed __stop_BTF - __start_BTF", gva)


# --- discovery ---------------------------------------------------------------------------------------

def _vcpu_state(vm: Machine) -> tuple[list[int], list[bool], bool]:
    """(CR3 of every vCPU with paging on, the paging modes to try, any vCPU in long mode with paging).
    A target that knows no control state (a raw image) or only CR3 (``--cr3``) gets both modes tried."""
    regs_by_cpu = vm.control_registers()
    if not regs_by_cpu:
        return [], [False, True], True
    cr3s: list[int] = []
    la57 = False
    paging = False
    unknown_mode = False
    for regs in regs_by_cpu.values():
        if "cr3" in regs and not {"cr0", "efer", "cr4"} <= regs.keys():
            cr3s.append(regs["cr3"])
            paging = unknown_mode = True
            continue
        cr0, cr3, cr4, efer = (regs.get(k, 0) for k in ("cr0", "cr3", "cr4", "efer"))
        if cr0 >> 31 & 1 and efer >> 10 & 1:  # CR0.PG and EFER.LMA: 64-bit paging is on
            paging = True
            la57 = la57 or la57_from_cr4(cr4)
            cr3s.append(cr3)
    return cr3s, ([la57, not la57] if unknown_mode else [la57]), paging


def discover(vm: Machine, *, use_cache: bool = True) -> Kernel:
    """Find and validate the kernel of a target (a running or paused VM, a dump). Raises NoLinuxKernel when
    there is none (not Linux, not booted yet), UnsupportedKernel for a kernel whose kallsyms layout is
    unknown."""
    t0 = time.perf_counter()
    cr3s, modes, paging = _vcpu_state(vm)
    t_regs = time.perf_counter() - t0
    if not paging:
        raise NoLinuxKernel(f"{NO_LINUX} (no vCPU has 64-bit paging enabled: not booted yet?)")
    for i, la57 in enumerate(modes):
        try:
            k = discover_in_memory(vm.phys, cr3s, la57, use_cache=use_cache, vm=vm)
            break
        except NoLinuxKernel:
            if i == len(modes) - 1:
                raise
    k.timings["registers"] = t_regs
    k.timings["total"] = time.perf_counter() - t0
    return k


def discover_in_memory(phys: PhysicalMemory, cr3s: list[int], la57: bool, *, use_cache: bool = True,
                       vm: Machine | None = None) -> Kernel:
    """Discovery over any physical-memory backend, given CR3 values (may be empty: then all RAM is
    scanned). Tests call this on a :class:`~vmsight.memory.physical.BufferRam`."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    errors: list[VmsightError] = []
    for cand in image_candidates(phys, cr3s, la57):
        timings["image_walk"] = time.perf_counter() - t
        if use_cache:
            k = _from_cache(phys, cand, la57, vm, timings)
            if k is not None:
                return k
        try:
            return _discover_cold(phys, cand, la57, vm, timings, use_cache)
        except (NoLinuxKernel, CorruptData, MemoryAccessError) as e:
            log.info("image candidate %#x@%#x rejected: %s", cand.text_gva, cand.text_gpa, e)
            errors.append(e)
    # No page table led to a kernel: scan all of RAM (slow, but works whatever the vCPUs are doing).
    t = time.perf_counter()
    for cand in _candidates_from_ram_scan(phys, la57):
        try:
            k = _discover_cold(phys, cand, la57, vm, timings, use_cache)
            k.timings["ram_scan"] = time.perf_counter() - t
            return k
        except (NoLinuxKernel, CorruptData, MemoryAccessError) as e:
            errors.append(e)
    unsupported = [e for e in errors if isinstance(e, UnsupportedKernel)]
    if unsupported:
        raise unsupported[0]
    raise NoLinuxKernel(NO_LINUX + (f" ({errors[-1]})" if errors else ""))


def _candidates_from_ram_scan(phys: PhysicalMemory, la57: bool) -> Iterator[ImageCandidate]:
    """Image candidates from every token table in RAM. The physical base comes from where the table (when
    ``kallsyms_token_table`` is itself a symbol, v6.2+) or a ``linux_banner`` copy sits relative to
    ``_text``; RAM holds stale copies of both, so each candidate is validated like a page-table one
    (2 MiB alignment, then the ``init_top_pgt`` walk)."""
    banners: list[int] | None = None
    seen: set[int] = set()
    for r in phys.layout:
        for d in _pattern_hits(phys, r.gpa, r.size, _DIGITS, limit=256):
            lo = max(r.gpa, d - _KALLSYMS_BEFORE)
            hi = min(r.end, d + _KALLSYMS_AFTER)
            try:
                res = _decode_at(phys, lo, hi, d)
            except VmsightError:
                continue
            if res is None:
                continue
            ks, buf_gpa = res
            text, pgt, end = ks.get("_text", ks.relative_base), ks.get("init_top_pgt"), ks.get("_end")
            if text is None or pgt is None or end is None or ks.token_table is None:
                continue
            bases: list[int] = []
            tt_sym = ks.get("kallsyms_token_table")
            if tt_sym is not None:
                bases.append(buf_gpa + ks.token_table.offset - (tt_sym - text))
            banner = ks.get("linux_banner")
            if banner is not None:
                if banners is None:
                    banners = [h for rr in phys.layout
                               for h in _pattern_hits(phys, rr.gpa, rr.size, b"Linux version ", limit=64)]
                bases += [b - (banner - text) for b in banners]
            size = (end - text + IMAGE_ALIGN - 1) & ~(IMAGE_ALIGN - 1)
            for text_gpa in bases:
                if text_gpa < 0 or text_gpa % IMAGE_ALIGN or text_gpa in seen:
                    continue
                seen.add(text_gpa)
                yield ImageCandidate(text, text_gpa, size, text_gpa + pgt - text)


def _validate_image(phys: PhysicalMemory, ks: Kallsyms | SymbolTable, cand: ImageCandidate, la57: bool) -> int:
    """Walk from ``init_top_pgt``: ``_text`` must map back to the physical base. Returns its gpa."""
    pgt = ks.address("init_top_pgt")
    off = pgt - cand.text_gva
    if not 0 <= off < cand.size:
        raise CorruptData("init_top_pgt lies outside the kernel image", pgt)
    dtb = cand.text_gpa + off
    for name in ("_text", "init_top_pgt", "linux_banner"):
        gva = ks.get(name)
        if gva is None:
            continue
        if gva_to_gpa(phys, dtb, gva, la57=la57) != cand.text_gpa + gva - cand.text_gva:
            raise CorruptData(f"init_top_pgt does not map {name} to the image candidate", gva)
    return dtb


def _banner_at(phys: PhysicalMemory, gpa: int) -> tuple[str, str]:
    b = parse_banner(phys.read_gpa(gpa, BANNER_MAX))
    if b is None:
        raise CorruptData(f"no 'Linux version' banner at gpa {gpa:#x}")
    return b.text, b.release


def _build_id(banner: str, token_table: bytes) -> str:
    return hashlib.blake2b(banner.encode() + b"\0" + token_table, digest_size=10).hexdigest()


def _discover_cold(phys: PhysicalMemory, cand: ImageCandidate, la57: bool, vm: Machine | None,
                   timings: dict[str, float], use_cache: bool) -> Kernel:
    t = time.perf_counter()
    timings["kallsyms_decode"] = 0.0
    ks, tt_gpa = kallsyms_in_image(phys, cand, timings)
    timings["kallsyms"] = time.perf_counter() - t
    t = time.perf_counter()
    _validate_image(phys, ks, cand, la57)
    image_size = cand.size
    end = ks.get("_end")
    if end is not None and end - cand.text_gva > image_size:
        raise CorruptData("kernel image is larger than its mapping", end)
    banner, release = _banner_at(phys, cand.text_gpa + ks.address("linux_banner") - cand.text_gva)
    btf_gva = ks.address("__start_BTF")
    btf_size = ks.address("__stop_BTF") - btf_gva
    if not 24 <= btf_size <= 64 << 20:
        raise CorruptData(f"BTF size {btf_size:#x} out of range", btf_gva)
    btf_raw = phys.read_gpa(cand.text_gpa + btf_gva - cand.text_gva, btf_size)
    _check_btf_header(btf_raw, btf_gva)
    tt = ks.token_table
    assert tt is not None
    tt_raw = phys.read_gpa(tt_gpa, tt.end - tt.offset)
    build_id = _build_id(banner, tt_raw)
    timings["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    btf = _parse_btf(btf_raw)
    timings["btf"] = time.perf_counter() - t
    syms = SymbolTable.from_kallsyms(ks)
    k = Kernel(phys, text_gva=cand.text_gva, text_gpa=cand.text_gpa, image_size=image_size, la57=la57,
               symbols=syms, release=release, banner=banner, build_id=build_id, btf_raw_gva=btf_gva,
               btf_size=btf_size, btf=btf, vm=vm, timings=timings)
    if use_cache:
        import numpy as np

        t = time.perf_counter()
        addrs = ks.addresses.astype(np.uint64)
        # kallsyms keeps absolute values (per-cpu offsets) below the kernel half, relative ones above it
        half = kernel_half_start(la57=la57)
        absolute = addrs < np.uint64(half)
        rel = np.where(absolute, addrs, addrs - np.uint64(cand.text_gva)).astype(np.int64)
        meta = {"release": release, "banner": banner, "banner_offset": ks.address("linux_banner") - cand.text_gva,
                "token_table_offset": tt_gpa - cand.text_gpa, "token_table_sha": hashlib.sha256(tt_raw).hexdigest(),
                "btf_offset": btf_gva - cand.text_gva, "btf_size": btf_size, "image_size": image_size,
                "kallsyms_order": ks.layout.order if ks.layout else None,
                "hot_symbols": {n: (a - cand.text_gva if a >= half else None)
                                for n, a in syms.hot().items()},
                "hot_absolute": {n: a for n, a in syms.hot().items() if a < half},
                "hot_absent": sorted(set(HOT_SYMBOLS) - set(syms.hot()))}
        if kcache.save(build_id, meta, ks.names, bytes(ks.types), rel, absolute) is not None:
            k._new_offsets = {}
        timings["cache_write"] = time.perf_counter() - t
    return k


def _from_cache(phys: PhysicalMemory, cand: ImageCandidate, la57: bool, vm: Machine | None,
                timings: dict[str, float]) -> Kernel | None:
    """A Kernel from a cache entry whose banner and token table are where the entry says (validated)."""
    t = time.perf_counter()
    for build_id, meta in kcache.list_entries():
        try:
            if not 0 <= meta["banner_offset"] < cand.size or not 0 <= meta["token_table_offset"] < cand.size:
                continue
            banner, release = _banner_at(phys, cand.text_gpa + meta["banner_offset"])
            if banner != meta["banner"]:
                continue
            tt_gpa = cand.text_gpa + meta["token_table_offset"]
            tt_raw = phys.read_gpa(tt_gpa, 256 * 2 + 4096)
        except (KeyError, TypeError, VmsightError):
            continue
        # The token table's exact length is in the cache's token table hash; recompute from the bytes.
        tt = _token_table_len(tt_raw)
        if tt is None or hashlib.sha256(phys.read_gpa(tt_gpa, tt)).hexdigest() != meta["token_table_sha"]:
            continue
        if _build_id(banner, phys.read_gpa(tt_gpa, tt)) != build_id:
            continue
        try:
            hot = {n: cand.text_gva + int(off) for n, off in meta.get("hot_symbols", {}).items() if off is not None}
            hot.update({n: int(a) for n, a in meta.get("hot_absolute", {}).items()})
            btf_gva, btf_size = cand.text_gva + int(meta["btf_offset"]), int(meta["btf_size"])
            absent = frozenset(str(n) for n in meta.get("hot_absent", ())) & frozenset(HOT_SYMBOLS)
            if not 24 <= btf_size <= 64 << 20:
                continue
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        ks = SymbolTable(None, None, None, cand.text_gva, hot=hot, absent=absent - hot.keys(),
                         load=functools.partial(_cached_symbols, build_id, cand.text_gva))
        try:
            _validate_image(phys, ks, cand, la57)
        except VmsightError as e:
            log.info("cache entry %s does not validate: %s", build_id, e)
            continue
        timings["cache_load"] = time.perf_counter() - t
        return Kernel(phys, text_gva=cand.text_gva, text_gpa=cand.text_gpa, image_size=cand.size, la57=la57,
                      symbols=ks, release=release, banner=banner, build_id=build_id,
                      btf_raw_gva=btf_gva, btf_size=btf_size, vm=vm, from_cache=True, timings=timings,
                      offsets=kcache.load_offsets(build_id), cached=True)
    return None


def _cached_symbols(build_id: str, text_gva: int) -> tuple[list[str], bytes, np.ndarray]:
    """The whole symbol table of a cached build, at this boot's ``_text`` (read on first non-hot lookup)."""
    import numpy as np

    try:
        names, types, rel, absolute = kcache.load_symbols(build_id)
    except (OSError, ValueError, KeyError) as e:
        raise CorruptData(f"kernel cache entry {build_id} is unreadable ({e}): remove it from "
                          f"{kcache.cache_root()}") from None
    addrs = np.where(absolute, rel.astype(np.uint64), rel.astype(np.uint64) + np.uint64(text_gva))
    return names, types, addrs


def _flush_offsets(ref: weakref.ref[Kernel]) -> None:
    k = ref()
    if k is not None:
        k.flush_offsets()


def _token_table_len(raw: bytes) -> int | None:
    """Length of a token table + 8-aligned index at the start of ``raw`` (256 strings, then 256 u16)."""
    p = 0
    for _ in range(256):
        e = raw.find(b"\0", p)
        if e < 0:
            return None
        p = e + 1
    p += (-p) % 8
    return p + 512 if p + 512 <= len(raw) else None


# --- one Kernel per attached VM ------------------------------------------------------------------

_KERNELS: weakref.WeakKeyDictionary[Any, Kernel] = weakref.WeakKeyDictionary()


def kernel_of(vm: Machine) -> Kernel:
    """The target's kernel, discovered on first use (per VM object; the disk cache makes re-attach fast)."""
    k = _KERNELS.get(vm)
    if k is None:
        with vm.paused():
            k = discover(vm)
        _KERNELS[vm] = k
    return k


@contextlib.contextmanager
def paused_kernel(vm: Machine) -> Iterator[Kernel]:
    """``with paused_kernel(vm) as k:`` the target's kernel (:func:`kernel_of`), the target paused for the
    whole block, so discovery and the reads share one pause. A kernel found before has its translations
    dropped first: a paused VM drops them itself when it resumes, but one whose run state another command
    controls is read live, and pauses nothing (:meth:`vmsight.vm.VM.paused`)."""
    with vm.paused():
        known = vm in _KERNELS
        k = kernel_of(vm)
        if known:
            k.invalidate()
        yield k


__all__ = [
    "DEFAULT_TEXT_GVA", "ImageCandidate", "Kernel", "NO_LINUX", "discover", "discover_in_memory",
    "image_candidates", "kallsyms_in_image", "kernel_of", "paused_kernel", "set_hostname", "uname", "SymbolNotFound",
]
