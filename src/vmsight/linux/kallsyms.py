"""Find and decode the kernel's own symbol table (kallsyms) in raw memory, with no symbol files.

The tables ``scripts/kallsyms.c`` emits into ``.rodata`` (every one preceded by ``.balign 8``):

* ``kallsyms_token_table``: 256 NUL-terminated strings; a byte in a compressed name stands for one token.
  Characters that occur in symbol names are their own single-character token, so ``"0".."9"`` sit at
  their ASCII index: that is the anchor of the scan.
* ``kallsyms_token_index``: 256 u16, offset of each token in the table (validates the anchor).
* ``kallsyms_names``: per symbol a length (1 byte, or 2 bytes ULEB128 when bit 7 is set, since v6.1:
  "kallsyms: support "big" kernel symbols") and that many token bytes; the first expanded character
  is the ``nm`` type.
* ``kallsyms_markers``: u32 offset into names of every 256th symbol.
* ``kallsyms_num_syms`` (u32), ``kallsyms_offsets`` (s32 per symbol), ``kallsyms_relative_base`` (u64,
  relocated at boot: the runtime ``_text``), ``kallsyms_seqs_of_names`` (v6.2+, u32 per symbol, then
  3-byte big-endian after "kallsyms: Reduce the memory occupied by kallsyms_seqs_of_names[]").

Their order changed in v6.4 ("scripts/kallsyms: change the output order"), and
distributions backport pieces (Debian's 6.1 has seqs_of_names). The layout is therefore *detected* from
the data around the token table and checked end to end (markers against the names walk, seqs against
a permutation); anything else raises :class:`UnsupportedKernel`.

Everything here works on a byte buffer (a vmlinux ``.rodata``, a RAM image, an mmap of guest RAM) or,
through :func:`kallsyms_from_reader`, on any ``read(gva, size) -> bytes``.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import operator
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmsight.errors import CorruptData, SymbolNotFound, UnsupportedKernel, VmsightError
from vmsight.linux.banner import BANNER_MAX, BANNER_RE, Banner, banner_from, parse_banner
from vmsight.memory.paging import kernel_half_start

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview | Any  # anything exposing the buffer protocol (mmap too)
ReadFn = Callable[[int, int], bytes]

#: Link-time ``_text`` of x86-64 kernels (CONFIG_PHYSICAL_START 0x1000000): the KASLR slide is relative to it.
DEFAULT_TEXT_GVA = 0xFFFFFFFF81000000

IMAGE_ALIGN = 0x200000     # CONFIG_PHYSICAL_ALIGN on x86-64: the image's physical and virtual base
MAX_SYMS = 1 << 24          # seqs_of_names entries are 3 bytes
MAX_TOKEN_LEN = 128         # tokens are short in practice (< 20); this only bounds the scan
MAX_NAME_LEN = 0x3FFF       # two-byte ULEB128 length limit in scripts/kallsyms.c
KSYM_NAME_LEN = 512         # v6.1+ ("kallsyms: increase maximum kernel symbol length to 512")
MAX_TABLES_SPAN = 32 << 20  # how far before the token table the other tables may start
_DIGITS = b"".join(bytes([c, 0]) for c in b"0123456789")
_DIGITS_RE = re.compile(re.escape(_DIGITS))
# kallsyms_relative_base is a kernel-image address. The tables are decoded before the paging mode is known
# (and from vmlinux files, which have none): accept either mode's kernel half, the 5-level one being wider.
_KERNEL_HALF_ANY_MODE = kernel_half_start(la57=True)


class _View:
    """Bounds-checked little-endian reads over a buffer; every failure is CorruptData."""

    def __init__(self, data: Buffer) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        self.mv = mv
        self.size = len(mv)

    def bytes(self, off: int, size: int) -> bytes:
        if off < 0 or size < 0 or off + size > self.size:
            raise CorruptData(f"kallsyms read {off:#x}+{size:#x} outside the {self.size:#x}-byte buffer")
        return self.mv[off:off + size].tobytes()

    def u32(self, off: int) -> int:
        return int.from_bytes(self.bytes(off, 4), "little")

    def u64(self, off: int) -> int:
        return int.from_bytes(self.bytes(off, 8), "little")

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if off < 0 or count < 0 or off + size > self.size:
            raise CorruptData(f"kallsyms table {off:#x}+{size:#x} outside the {self.size:#x}-byte buffer")
        return np.frombuffer(self.mv, dtype=dtype, count=count, offset=off)


@dataclass(frozen=True)
class TokenTable:
    """A validated ``kallsyms_token_table`` + ``kallsyms_token_index`` (buffer offsets)."""

    offset: int                # of kallsyms_token_table
    index_offset: int          # of kallsyms_token_index
    tokens: tuple[bytes, ...]  # 256 entries

    @property
    def end(self) -> int:
        return self.index_offset + 512


@dataclass(frozen=True)
class KallsymsLayout:
    """Where each table sits in the buffer, and which variant of the format this is."""

    order: str                  # "offsets-first" (<= v6.3) or "num_syms-first" (v6.4+)
    num_syms: int
    num_syms_offset: int
    names_offset: int
    names_size: int
    markers_offset: int
    token_table_offset: int
    token_index_offset: int
    offsets_offset: int
    relative_base_offset: int
    seqs_offset: int | None     # kallsyms_seqs_of_names, None when the kernel has none
    seqs_entry_size: int        # 3 or 4; 0 when absent
    absolute_percpu: bool       # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: non-negative offsets are absolute


def _align8(x: int, anchor: int) -> int:
    """Round x up to 8 in the anchor's address space (the anchor is an 8-aligned table in the guest)."""
    return x + (-(x - anchor)) % 8


# --- token table --------------------------------------------------------------------------------------

def _token_table_at_digits(v: _View, digits_off: int) -> TokenTable | None:
    """Validate a token-table candidate whose token '0' (index 0x30) starts at digits_off.

    Walking back to token 0 is ambiguous (the table before it need not end in NUL), so walk forward
    over tokens 0x30..0xff to the end of the table; ``kallsyms_token_index`` follows (8-aligned) and
    its entry 0x30 says how far back token 0 is. The whole index must then match the table."""
    fwd = v.mv[digits_off:min(v.size, digits_off + 208 * (MAX_TOKEN_LEN + 1) + 8 + 512)].tobytes()
    p = 0
    for _ in range(256 - 0x30):
        e = fwd.find(b"\0", p, p + MAX_TOKEN_LEN + 1)
        if e < 0:
            return None
        p = e + 1
    for pad in range(8):
        idx_rel = p + pad
        if idx_rel + 512 > len(fwd):
            return None
        if pad and fwd[idx_rel - 1] != 0:
            return None  # alignment padding is zeros
        back = struct.unpack_from("<H", fwd, idx_rel + 2 * 0x30)[0]
        tt_off = digits_off - back
        if tt_off < 0 or (digits_off + idx_rel - tt_off) % 8:
            continue
        tt = _token_table_at(v, tt_off, digits_off + idx_rel)
        if tt is not None:
            return tt
    return None


def _token_table_at(v: _View, tt_off: int, index_off: int) -> TokenTable | None:
    """The token table at tt_off if the 256 u16 at index_off are exactly its token offsets."""
    if index_off + 512 > v.size or index_off <= tt_off:
        return None
    table = v.mv[tt_off:index_off].tobytes()
    index = struct.unpack_from("<256H", v.mv, index_off)
    tokens: list[bytes] = []
    p = 0
    for i in range(256):
        if index[i] != p:
            return None
        e = table.find(b"\0", p, p + MAX_TOKEN_LEN + 1)
        if e < 0:
            return None
        tokens.append(table[p:e])
        p = e + 1
    if table[p:].strip(b"\0"):
        return None  # only alignment padding may follow the 256th token
    for c in range(0x30, 0x3A):
        if tokens[c] != bytes([c]):
            return None
    return TokenTable(tt_off, index_off, tuple(tokens))


def find_token_tables(data: Buffer, start: int = 0, end: int | None = None) -> Iterator[TokenTable]:
    """Every validated ``kallsyms_token_table`` in data[start:end], in buffer order. RAM may hold stale
    copies: the caller decides which one is live."""
    v = _View(data)
    stop = v.size if end is None else min(end, v.size)
    for m in _DIGITS_RE.finditer(v.mv, start, stop):
        tt = _token_table_at_digits(v, m.start())
        if tt is not None:
            yield tt


# --- names walk ---------------------------------------------------------------------------------------

def _walk_chunks(v: _View, names_off: int, num: int, markers: list[int],
                 limit: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Walk the compressed names, the 256-name chunks that start at the markers side by side (numpy).
    Returns (starts, lens, names_end): start of each name's token bytes relative to names_off, its
    length, and the buffer offset where the names end; None unless every chunk ends exactly where
    the next marker says and the names end before `limit`."""
    m = len(markers)
    size = min(limit, v.size) - names_off
    if m == 0 or m != (num + 255) // 256 or size <= 0 or names_off < 0:
        return None
    pos = np.asarray(markers, dtype=np.int64)
    if not _plausible_markers(pos, size):
        return None
    buf = v.array(names_off, size, "u1")
    last = size - 1
    counts = np.full(m, 256, dtype=np.int64)
    counts[-1] = num - 256 * (m - 1)
    starts = np.empty((m, 256), dtype=np.int64)
    lens = np.empty((m, 256), dtype=np.int64)
    overflow = np.zeros(m, dtype=bool)
    for step in range(256):
        b0 = buf[np.minimum(pos, last)].astype(np.int64)
        two = b0 >> 7
        ln = np.where(two != 0, (b0 & 0x7F) | (buf[np.minimum(pos + 1, last)].astype(np.int64) << 7), b0)
        st = pos + 1 + two
        starts[:, step] = st
        lens[:, step] = ln
        nxt = st + ln
        active = step < counts
        overflow |= active & ((nxt > size) | (ln == 0))
        if step % 32 == 31 and overflow.any():
            return None
        pos = np.where(active, np.minimum(nxt, size), pos)
    if overflow.any():
        return None
    if m > 1 and not np.array_equal(pos[:-1], np.asarray(markers[1:], dtype=np.int64)):
        return None
    s_flat = starts.ravel()[:num]
    l_flat = lens.ravel()[:num]
    if num and int(l_flat.min()) < 1:
        return None
    return s_flat, l_flat, names_off + int(pos[-1])


def _walk_scalar(v: _View, pos: int, count: int, limit: int) -> int | None:
    """End of `count` names starting at pos, or None if one is empty or crosses limit."""
    buf = v.mv[pos:min(limit, v.size)].tobytes()
    p = 0
    n = len(buf)
    for _ in range(count):
        if p >= n:
            return None
        ln = buf[p]
        if ln & 0x80:
            if p + 1 >= n:
                return None
            ln = (ln & 0x7F) | (buf[p + 1] << 7)
            p += 1
        if ln == 0:
            return None
        p += 1 + ln
    return pos + p if p <= n else None


def _plausible_markers(markers: np.ndarray, names_size: int) -> bool:
    """kallsyms_markers start at 0 and every 256 names take 512 (length byte + one token each) to
    256 * (2 + MAX_NAME_LEN) bytes."""
    if len(markers) == 0 or int(markers[0]) != 0 or int(markers[-1]) >= names_size:
        return False
    d = np.diff(markers)
    return not (len(d) and (int(d.min()) < 512 or int(d.max()) > 256 * (2 + MAX_NAME_LEN)))


def _markers_ending_at(v: _View, end: int) -> tuple[int, list[int]] | None:
    """Walk a strictly increasing u32 array that ends at `end` back to its first element (0)."""
    vals: list[int] = []
    p = end - 4
    prev = 1 << 32
    for _ in range(MAX_SYMS // 256 + 1):
        if p < 0:
            return None
        x = v.u32(p)
        if x >= prev:
            return None
        vals.append(x)
        if x == 0:
            vals.reverse()
            return p, vals
        prev = x
        p -= 4
    return None


def _seqs_entry_size(v: _View, off: int, num: int, limit: int | None) -> int:
    """3 or 4 when a valid kallsyms_seqs_of_names (a permutation of 0..num-1) sits at off, else 0.
    With limit given, the table must end (8-aligned) exactly at it."""
    for size in (3, 4):
        if limit is not None and _align8(off + size * num, off) != limit:
            continue
        if off + size * num > v.size:
            continue
        raw = v.array(off, size * num, "u1").reshape(num, size).astype(np.int64)
        if size == 3:
            seq = (raw[:, 0] << 16) | (raw[:, 1] << 8) | raw[:, 2]
        else:
            seq = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16) | (raw[:, 3] << 24)
        if seq.size and seq.max() < num and np.bincount(seq, minlength=num).min() == 1:
            return size
    return 0


def _is_kernel_va(x: int) -> bool:
    return _KERNEL_HALF_ANY_MODE <= x < 1 << 64


def _absolute_percpu(v: _View, offsets_off: int, num: int) -> bool:
    # With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP until v6.15), every non-percpu symbol has a
    # negative offset; without it all offsets are unsigned distances from relative_base.
    return bool((v.array(offsets_off, num, "<i4") < 0).any())


def _layout_num_syms_first(v: _View, tt: TokenTable) -> KallsymsLayout | None:
    """v6.4+: num_syms, names, markers, token_table, token_index, offsets, relative_base, seqs_of_names."""
    for mend in (tt.offset, tt.offset - 4):
        found = _markers_ending_at(v, mend)
        if found is None:
            continue
        markers_off, markers = found
        if _align8(markers_off + 4 * len(markers), tt.offset) != tt.offset:
            continue
        if not _plausible_markers(np.asarray(markers, dtype=np.int64), markers_off):
            continue
        m = len(markers)
        # names_off + markers[-1] is where the last chunk starts; its names lie before markers_off.
        hi = markers_off - markers[-1]
        lo = max(8, hi - 256 * (2 + KSYM_NAME_LEN))
        first = _align8(lo, tt.offset)
        if hi <= first:
            continue
        cand = v.array(first - 8, (hi - first) // 8 + 1, "<u8")
        num_lo = cand & np.uint64(0xFFFFFFFF)
        ok = (num_lo > (m - 1) * 256) & (num_lo <= m * 256) & ((cand >> np.uint64(32)) == 0)
        for i in np.nonzero(ok)[0][::-1].tolist():  # closest to the markers first
            names_off = first + 8 * i
            num = int(num_lo[i])
            # Cheap test first: the last chunk, walked name by name, must end right before the markers.
            end = _walk_scalar(v, names_off + markers[-1], num - 256 * (m - 1), markers_off)
            if end is None or _align8(end, tt.offset) != markers_off:
                continue
            walk = _walk_chunks(v, names_off, num, markers, markers_off)
            if walk is None or _align8(walk[2], tt.offset) != markers_off:
                continue
            offsets_off = _align8(tt.end, tt.offset)
            rb_off = _align8(offsets_off + 4 * num, tt.offset)
            if rb_off + 8 > v.size or not _is_kernel_va(v.u64(rb_off)):
                continue
            seqs_off = rb_off + 8
            esize = _seqs_entry_size(v, seqs_off, num, None)
            return KallsymsLayout("num_syms-first", num, names_off - 8, names_off, walk[2] - names_off,
                                  markers_off, tt.offset, tt.index_offset, offsets_off, rb_off,
                                  seqs_off if esize else None, esize,
                                  _absolute_percpu(v, offsets_off, num))
    return None


_RB_SCAN_CHUNK = 1 << 17   # u64s per backward step: the tables usually start ~1.5 MiB before the token table


def _relative_base_candidates(v: _View, tt: TokenTable) -> Iterator[tuple[int, int]]:
    """(offset, num_syms) of each u64 pair that could be kallsyms_relative_base + kallsyms_num_syms
    before the token table, closest first. Scanned backwards in bounded steps: one pass over the whole
    span costs ~0.1 s of page faults for its temporaries, and the answer is nearly always in the first."""
    first = _align8(max(0, tt.offset - MAX_TABLES_SPAN), tt.offset)
    hi = first + ((tt.offset - first) // 8 - 1) * 8   # one past the last pair's relative_base
    while hi > first:
        lo = max(first, hi - 8 * _RB_SCAN_CHUNK)
        q = v.array(lo, (hi - lo) // 8 + 1, "<u8")
        rb, nxt = q[:-1], q[1:]
        num_lo = nxt & np.uint64(0xFFFFFFFF)
        ok = ((rb >= np.uint64(_KERNEL_HALF_ANY_MODE)) & (num_lo >= 1) & (num_lo <= MAX_SYMS)
              & ((nxt >> np.uint64(32)) == 0))
        for i in np.nonzero(ok)[0][::-1].tolist():
            yield lo + 8 * i, int(num_lo[i])
        hi = lo


def _layout_offsets_first(v: _View, tt: TokenTable) -> KallsymsLayout | None:
    """<= v6.3: offsets, relative_base, num_syms, names, markers, [seqs_of_names], token_table, token_index."""
    for rb_off, num in _relative_base_candidates(v, tt):
        names_off = rb_off + 16
        offsets_off = rb_off - _align8(4 * num, 0)
        m = (num + 255) // 256
        if offsets_off < 0:
            continue
        # markers end where seqs_of_names (3- or 4-byte entries, or none) begins.
        for esize in (3, 4, 0):
            after = tt.offset - _align8(esize * num, 0)
            markers_off = after - _align8(4 * m, 0)
            if markers_off <= names_off or v.u32(markers_off) != 0:
                continue
            marr = v.array(markers_off, m, "<u4").astype(np.int64)
            if not _plausible_markers(marr, markers_off - names_off):
                continue
            markers = marr.tolist()
            walk = _walk_chunks(v, names_off, num, markers, markers_off)
            if walk is None or _align8(walk[2], tt.offset) != markers_off:
                continue
            if esize and _seqs_entry_size(v, after, num, tt.offset) != esize:
                continue
            return KallsymsLayout("offsets-first", num, rb_off + 8, names_off, walk[2] - names_off,
                                  markers_off, tt.offset, tt.index_offset, offsets_off, rb_off,
                                  after if esize else None, esize, _absolute_percpu(v, offsets_off, num))
    return None


def detect_layout(data: Buffer, tt: TokenTable) -> KallsymsLayout:
    """Which table order surrounds this token table. Raises UnsupportedKernel if none fits."""
    v = _View(data)
    for probe in (_layout_num_syms_first, _layout_offsets_first):
        try:
            layout = probe(v, tt)
        except CorruptData as e:  # a candidate pointed outside the buffer: this order does not fit
            log.debug("kallsyms %s: %s", probe.__name__, e)
            layout = None
        if layout is not None:
            log.debug("kallsyms layout %s: %d symbols", layout.order, layout.num_syms)
            return layout
    raise UnsupportedKernel(
        "kallsyms layout",
        f"token table at buffer offset {tt.offset:#x} validates, but neither the v6.4+ order "
        "(num_syms, names, markers, token_table, token_index, offsets, relative_base) nor the older "
        "one (offsets, relative_base, num_syms, names, markers, [seqs], token_table) fits around it")


# --- decoding -----------------------------------------------------------------------------------------

_DECODE_CACHE: dict[bytes, tuple[list[str], bytes, dict[str, int]]] = {}
_DECODE_CACHE_MAX = 4


def _decode_names(v: _View, layout: KallsymsLayout,
                  tokens: tuple[bytes, ...]) -> tuple[list[str], bytes, dict[str, int]]:
    """(names without type char, type chars, name index) for every symbol, vectorised with numpy;
    cached per kernel build (keyed by a hash of the token table and the compressed names)."""
    blob = v.bytes(layout.names_offset, layout.names_size)
    key = hashlib.blake2b(b"".join(tokens) + b"\0" + blob, digest_size=20).digest()
    hit = _DECODE_CACHE.get(key)
    if hit is not None:
        return hit
    markers = v.array(layout.markers_offset, (layout.num_syms + 255) // 256, "<u4").tolist()
    walk = _walk_chunks(v, layout.names_offset, layout.num_syms, markers,
                        layout.names_offset + layout.names_size)
    if walk is None:
        raise CorruptData("kallsyms names disagree with kallsyms_markers", layout.names_offset)
    st, ln, _ = walk
    # The token bytes of all names in one stream: drop the 1- or 2-byte length prefixes.
    keep = np.ones(layout.names_size, dtype=bool)
    keep[st - 1] = False
    keep[(st - 2)[ln > 0x7F]] = False
    comp = np.frombuffer(blob, dtype=np.uint8)[keep]
    # Expand every token byte through the token table in one gather: esrc[k] is the token-table
    # index of expanded byte k, built as a cumulative sum of +1 steps and per-token jumps.
    table = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    # int32 indices: the temporaries are as long as the expanded names (~3 M), and their page faults
    # are most of the decode time; 2**31 bytes of expanded names is far beyond any kernel (checked).
    tlen = np.array([len(t) for t in tokens], dtype=np.int32)
    toff = np.cumsum(tlen, dtype=np.int32) - tlen
    clen = tlen[comp]
    cstart = toff[comp]
    total = int(clen.sum(dtype=np.int64))
    if total >= 1 << 31:
        raise CorruptData(f"kallsyms names expand to {total} bytes", layout.names_offset)
    eoff = np.cumsum(clen, dtype=np.int32) - clen
    step = np.ones(total, dtype=np.int32)
    if len(comp):
        step[0] = cstart[0]
        step[eoff[1:]] = cstart[1:] - (cstart[:-1] + clen[:-1] - 1)
    expanded = table[np.cumsum(step, dtype=np.int32)]
    # First expanded byte of each symbol is its type: read it, then overwrite it with NUL so one
    # split() yields every name (names never contain NUL).
    first_tok = np.cumsum(ln) - ln
    eoff_ext = np.append(eoff, len(expanded))
    begins = eoff_ext[first_tok]
    if len(begins) and int((eoff_ext[first_tok + ln] - begins).min()) < 1:
        raise CorruptData("kallsyms name expands to nothing (empty tokens only)", layout.names_offset)
    types = expanded[begins].tobytes()
    expanded[begins] = 0
    names = expanded.tobytes().decode("latin-1").split("\0")[1:]
    if len(names) != layout.num_syms or not set(types) <= _TYPE_CHARS:
        raise CorruptData("kallsyms names do not decode to typed symbols", layout.names_offset)
    if len(_DECODE_CACHE) >= _DECODE_CACHE_MAX:
        _DECODE_CACHE.pop(next(iter(_DECODE_CACHE)))
    result = (names, types, name_index(names, types))
    _DECODE_CACHE[key] = result
    return result


_TYPE_CHARS = frozenset(b"ABCDGINRSTUVWabcdginrstuvw?")

def name_index(names: list[str], types: bytes) -> dict[str, int]:
    """name -> symbol index. Duplicate names (static symbols) resolve to the first global one, else
    to the first one: insert locals then globals, each in reverse, so the wanted one lands last."""
    t = np.frombuffer(types, dtype=np.uint8)
    upper = (t >= 65) & (t <= 90)
    order = np.concatenate([np.nonzero(~upper)[0][::-1], np.nonzero(upper)[0][::-1]]).tolist()
    if not order:
        return {}
    picked = operator.itemgetter(*order)(names)
    if len(order) == 1:
        picked = (picked,)
    return dict(zip(picked, order, strict=True))


class Kallsyms:
    """The guest kernel's symbol table.

    ``names[i]``, ``types[i]`` (nm type letter), ``addresses[i]`` (gva, numpy uint64) are in kallsyms
    order. ``relative_base`` is the runtime ``_text`` gva; ``layout``/``token_table`` give buffer offsets
    of the tables, for validating a candidate found in RAM."""

    def __init__(self, names: list[str], types: bytes, addresses: np.ndarray, relative_base: int,
                 layout: KallsymsLayout | None = None, token_table: TokenTable | None = None,
                 index: dict[str, int] | None = None) -> None:
        if not (len(names) == len(types) == len(addresses)):
            raise CorruptData("kallsyms names/types/addresses differ in length")
        self.names = names
        self.types = types
        self.addresses = np.asarray(addresses, dtype=np.uint64)
        self.relative_base = relative_base
        self.layout = layout
        self.token_table = token_table
        self._addr_list: list[int] = self.addresses.tolist()
        self._index = index if index is not None else name_index(names, types)
        self._order = np.argsort(self.addresses, kind="stable")
        self._sorted = self.addresses[self._order]
        self._sorted_list: list[int] | None = None
        self._order_list: list[int] = []

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> int:
        return self.address(name)

    def __repr__(self) -> str:
        return f"<Kallsyms {len(self)} symbols, _text={self.relative_base:#x}>"

    def address(self, name: str) -> int:
        """gva of symbol `name`. Raises SymbolNotFound."""
        try:
            return self._addr_list[self._index[name]]
        except KeyError:
            raise SymbolNotFound(name) from None

    def get(self, name: str, default: int | None = None) -> int | None:
        i = self._index.get(name)
        return default if i is None else self._addr_list[i]

    def symbol_type(self, name: str) -> str:
        """nm type letter of `name` ('T' global text, 't' local text, 'D' data, 'A' absolute/percpu...)."""
        i = self._index.get(name)
        if i is None:
            raise SymbolNotFound(name)
        return chr(self.types[i])

    def all_addresses(self, name: str) -> list[int]:
        """Every gva carrying `name` (static symbols repeat)."""
        return [int(self.addresses[i]) for i, n in enumerate(self.names) if n == name]

    def lookup(self, gva: int) -> tuple[str, int] | None:
        """(name, offset) of the symbol at or below gva, or None below the first symbol."""
        if self._sorted_list is None:  # bisect on a list: ~20x faster per call than numpy scalars
            self._sorted_list = self._sorted.tolist()
            self._order_list = self._order.tolist()
        i = bisect.bisect_right(self._sorted_list, gva) - 1
        if i < 0:
            return None
        return self.names[self._order_list[i]], gva - self._sorted_list[i]

    def items(self) -> Iterator[tuple[str, int]]:
        al = self._addr_list
        return ((n, al[i]) for n, i in self._index.items())

    def as_dict(self) -> dict[str, int]:
        """name -> gva (one address per name, as :meth:`address` resolves it)."""
        return dict(self.items())

    @property
    def text_gva(self) -> int:
        """Runtime gva of ``_text``."""
        text = self.get("_text")
        return self.relative_base if text is None else text

    @property
    def kaslr_slide(self) -> int:
        """Virtual KASLR slide: runtime ``_text`` minus the x86-64 link-time 0xffffffff81000000."""
        return self.text_gva - DEFAULT_TEXT_GVA

    def buffer_delta(self) -> int | None:
        """gva minus buffer offset of the scanned buffer, from the ``kallsyms_token_table`` symbol
        (needs CONFIG_KALLSYMS_ALL); None when unknown."""
        tt_gva = self.get("kallsyms_token_table")
        if self.token_table is None or tt_gva is None:
            return None
        return tt_gva - self.token_table.offset


def decode_kallsyms(data: Buffer, tt: TokenTable, layout: KallsymsLayout | None = None) -> Kallsyms:
    """Decode the symbol table around a validated token table. Raises UnsupportedKernel, CorruptData."""
    v = _View(data)
    layout = layout or detect_layout(data, tt)
    names, types, index = _decode_names(v, layout, tt.tokens)
    rb = v.u64(layout.relative_base_offset)
    off = v.array(layout.offsets_offset, layout.num_syms, "<i4")
    if layout.absolute_percpu:
        # kernel/kallsyms.c kallsyms_sym_address(): off >= 0 is absolute; else relative_base - 1 - off.
        neg = off < 0
        rel = np.uint64(rb) + (~off).astype(np.int64).astype(np.uint64)
        addresses = np.where(neg, rel, off.astype(np.uint64))
    else:
        addresses = np.uint64(rb) + off.view(np.uint32).astype(np.uint64)
    return Kallsyms(names, types, addresses, rb, layout, tt, index)


def find_all_kallsyms(data: Buffer, start: int = 0, end: int | None = None) -> list[Kallsyms]:
    """Every decodable kallsyms in data (RAM holds stale copies: validate before trusting one)."""
    out = []
    errors: list[VmsightError] = []
    for tt in find_token_tables(data, start, end):
        try:
            out.append(decode_kallsyms(data, tt))
        except (UnsupportedKernel, CorruptData) as e:
            log.debug("token table at %#x: %s", tt.offset, e)
            errors.append(e)
    if not out and errors:
        raise errors[0]
    return out


def find_kallsyms(data: Buffer, start: int = 0, end: int | None = None) -> Kallsyms:
    """The first decodable kallsyms in data. Raises NoLinuxKernel-like CorruptData when there is no
    token table, UnsupportedKernel when one is found but the layout around it is unknown."""
    errors: list[VmsightError] = []
    for tt in find_token_tables(data, start, end):
        try:
            return decode_kallsyms(data, tt)
        except (UnsupportedKernel, CorruptData) as e:
            log.debug("token table at %#x: %s", tt.offset, e)
            errors.append(e)
    if errors:
        raise errors[0]
    raise CorruptData("no kallsyms_token_table found (kernel built without CONFIG_KALLSYMS?)")


def _read_around(read: ReadFn, center: int, before: int, after: int, chunk: int) -> tuple[bytes, int]:
    """Readable bytes in [center - before, center + after), grown outward from the page holding
    `center` in chunks (page by page once a chunk fails) up to the first unreadable page.
    Returns (buffer, gva of buffer[0])."""
    page = 4096
    chunk = max(page, chunk - chunk % page)

    def readable(gva: int, size: int) -> bytes | None:
        try:
            data = read(gva, size)
        except VmsightError:
            return None
        return data if len(data) == size else None

    base = center - center % page
    lo: list[bytes] = []
    gva = base
    while gva > base - before:
        n = min(chunk, gva - (base - before))
        data = readable(gva - n, n)
        if data is None:  # the readable pages at the top of this chunk
            while n > 0 and (data := readable(gva - page, page)) is not None:
                lo.append(data)
                gva -= page
                n -= page
            break
        lo.append(data)
        gva -= n
    hi: list[bytes] = []
    gva = base
    while gva < base + after:
        n = min(chunk, base + after - gva)
        data = readable(gva, n)
        if data is None:
            while n > 0 and (data := readable(gva, page)) is not None:
                hi.append(data)
                gva += page
                n -= page
            break
        hi.append(data)
        gva += n
    return b"".join(reversed(lo)) + b"".join(hi), base - sum(len(c) for c in lo)


def kallsyms_from_reader(read: ReadFn, token_table_gva: int, before: int = MAX_TABLES_SPAN,
                         after: int = 8 << 20, chunk: int = 1 << 16) -> Kallsyms:
    """Decode kallsyms through ``read(gva, size)`` around a known ``kallsyms_token_table`` gva.
    Tries a small window first (4 MiB before, 2 MiB after: enough for ~200k symbols), then the full
    ``before``/``after`` one, so a slow reader (gdbstub) moves little data. Raises CorruptData,
    UnsupportedKernel."""
    windows = [(min(before, 4 << 20), min(after, 2 << 20)), (before, after)]
    last: VmsightError | None = None
    for i, (lo, hi) in enumerate(windows):
        if i and (lo, hi) == windows[0]:
            break
        buf, buf_gva = _read_around(read, token_table_gva, lo, hi, chunk)
        tt_off = token_table_gva - buf_gva
        if not 0 <= tt_off < len(buf):
            raise CorruptData("kallsyms_token_table is unreadable", token_table_gva)
        try:
            digits = tt_off + _token_offset_of_digit0(buf, tt_off)
        except CorruptData:
            digits = -1
        tt = _token_table_at_digits(_View(buf), digits) if digits >= 0 else None
        if tt is None or tt.offset != tt_off:
            raise CorruptData("no valid kallsyms_token_table at the given address", token_table_gva)
        try:
            return decode_kallsyms(buf, tt)
        except (UnsupportedKernel, CorruptData) as e:
            last = e
    assert last is not None
    raise last


def _token_offset_of_digit0(buf: bytes, tt_off: int) -> int:
    """Offset of token 0x30 ('0') from the start of a token table (walks 48 strings forward)."""
    p = tt_off
    for _ in range(0x30):
        e = buf.find(b"\0", p, p + MAX_TOKEN_LEN + 1)
        if e < 0:
            raise CorruptData("malformed kallsyms_token_table", tt_off)
        p = e + 1
    return p - tt_off


# --- banner -------------------------------------------------------------------------------------------

def find_banners(data: Buffer, start: int = 0, end: int | None = None) -> list[Banner]:
    """Every well-formed ``linux_banner`` ("Linux version R (builder) ... \\n\\0") in data."""
    v = _View(data)
    stop = v.size if end is None else min(end, v.size)
    return [banner_from(m) for m in BANNER_RE.finditer(v.mv, start, stop)]


def find_banner(data: Buffer, kallsyms: Kallsyms | None = None, buffer_gva: int | None = None) -> Banner:
    """The kernel's ``linux_banner``. With ``kallsyms`` and the buffer's gva (``buffer_gva``: gva of
    buffer offset 0; derived from the ``kallsyms_token_table`` symbol when omitted) the banner must sit
    exactly at ``linux_banner``; when neither is known (v6.1), the one candidate congruent to
    ``linux_banner`` modulo 2 MiB. Without ``kallsyms``, the first well-formed banner. Raises
    CorruptData / SymbolNotFound."""
    if kallsyms is not None:
        delta = kallsyms.buffer_delta() if buffer_gva is None else buffer_gva
        if delta is None:
            # No kallsyms_token_table symbol (v6.1 lists none of the kallsyms_* tables). The kernel
            # image is placed 2 MiB-aligned both physically and virtually, so in a buffer of guest RAM
            # (or the image itself) the live banner sits at linux_banner modulo 2 MiB; stale copies
            # elsewhere rarely do. Accept exactly one such candidate.
            want = kallsyms.address("linux_banner") % IMAGE_ALIGN
            banners = [b for b in find_banners(data) if b.offset % IMAGE_ALIGN == want]
            if len(banners) != 1:
                raise CorruptData(f"{len(banners)} 'Linux version' candidates at linux_banner modulo 2 MiB "
                                  "and no kallsyms_token_table symbol to place the buffer: pass buffer_gva")
            return banners[0]
        off = kallsyms.address("linux_banner") - delta
        v = _View(data)
        if not 0 <= off < v.size:
            raise CorruptData("linux_banner lies outside the buffer", kallsyms.address("linux_banner"))
        b = parse_banner(v.mv[off:off + BANNER_MAX].tobytes())
        if b is None:
            raise CorruptData("no 'Linux version' string at linux_banner", kallsyms.address("linux_banner"))
        return Banner(off, b.text, b.release)
    banners = find_banners(data)
    if not banners:
        raise CorruptData("no 'Linux version' banner found")
    return banners[0]


__all__ = [
    "DEFAULT_TEXT_GVA", "Banner", "Kallsyms", "KallsymsLayout", "TokenTable", "decode_kallsyms",
    "detect_layout", "find_all_kallsyms", "find_banner", "find_banners", "find_kallsyms",
    "find_token_tables", "kallsyms_from_reader",
]
