"""Interval statistics over idle snapshots and the versioned JSON-lines record format.

Record format (``format_version`` 1; one JSON object per line; units in key names; readers fill defaults for
keys added later, see :data:`INTERVAL_DEFAULTS`):

* ``{"type": "header", "pid", "comm", "backend", "backend_reason", "granularity", "approximate", "interval_ms",
  "page_size_bytes", "start_time_ns" (wall clock), "idle_age_ks"}``
* ``{"type": "interval", "index", "time_ns", "elapsed_ms", "wss_bytes", "idle_bytes", "present_bytes",
  "swapped_bytes", "untracked_bytes", "idle_age_hist_bytes": {"k": bytes idle for >= k intervals},
  "vmas": [{"label", "kind", "mapped_bytes", "present_bytes", "accessed_bytes", "idle_bytes",
  "swapped_bytes"}], "partial", "warnings", "bitmap": [{"start_vfn", "nr_pages", "idle_b64z",
  "tracked_b64z"}] (record mode only: zlib+base64 of the u64 words, little-endian)}``
* ``{"type": "end", "reason"}``
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vmsight.idle.abi import PAGE_SIZE, WORD_BITS, WORD_BYTES, pack_bits, unpack_bits
from vmsight.idle.result import FORMAT_VERSION, IdleSnapshot, PageState

if TYPE_CHECKING:
    from vmsight.idle.protocol import Ranges, Tracker

log = logging.getLogger(__name__)

IDLE_AGE_KS = (1, 2, 4, 8, 16, 32, 64)

INTERVAL_DEFAULTS: dict[str, Any] = {
    "wss_bytes": 0, "idle_bytes": 0, "present_bytes": 0, "swapped_bytes": 0, "untracked_bytes": 0,
    "idle_age_hist_bytes": {}, "vmas": [], "partial": False, "warnings": [], "bitmap": [], "elapsed_ms": 0,
}


class IdleAges:
    """Consecutive intervals each page has read idle (a page that reads accessed, or untracked, restarts at 0).
    Keyed by vfn, so VMAs that come and go between reads keep the ages of the pages they still cover."""

    def __init__(self) -> None:
        self._segs: list[tuple[int, npt.NDArray[np.uint32]]] = []

    def update(self, snap: IdleSnapshot) -> None:
        new: list[tuple[int, npt.NDArray[np.uint32]]] = []
        for s in snap.segments:
            age = np.zeros(s.nr_pages, np.uint32)
            for start, old in self._segs:
                a, b = max(start, s.start_vfn), min(start + len(old), s.end_vfn)
                if a < b:
                    age[a - s.start_vfn:b - s.start_vfn] = old[a - start:b - start]
            idle = s.idle_pages() & s.has(PageState.TRACKED)
            new.append((s.start_vfn, np.where(idle, age + 1, 0).astype(np.uint32)))
        self._segs = new

    def histogram_bytes(self, ks: Iterable[int] = IDLE_AGE_KS) -> dict[str, int]:
        ages = np.concatenate([a for _, a in self._segs]) if self._segs else np.zeros(0, np.uint32)
        return {str(k): int((ages >= k).sum()) * PAGE_SIZE for k in ks}


def header_record(pid: int, comm: str, backend: str, reason: str, granularity: str, approximate: bool,
                  interval_ms: float) -> dict[str, Any]:
    return {"type": "header", "format_version": FORMAT_VERSION, "tool": "vmsight idle", "pid": pid, "comm": comm,
            "backend": backend, "backend_reason": reason, "granularity": granularity, "approximate": approximate,
            "interval_ms": interval_ms, "page_size_bytes": PAGE_SIZE, "start_time_ns": time.time_ns(),
            "idle_age_ks": list(IDLE_AGE_KS)}


def vma_breakdown(snap: IdleSnapshot) -> list[dict[str, Any]]:
    """Per-VMA usage grouped by label: [heap], [stack], [anon] (all anonymous), each file, specials."""
    groups: dict[str, dict[str, Any]] = {}
    for u in snap.usage:
        g = groups.setdefault(u.vma.label, {"label": u.vma.label, "kind": u.vma.kind, "mapped_bytes": 0,
                                            "present_bytes": 0, "accessed_bytes": 0, "idle_bytes": 0,
                                            "swapped_bytes": 0})
        g["mapped_bytes"] += u.vma.size
        g["present_bytes"] += u.present_bytes
        g["accessed_bytes"] += u.accessed_bytes
        g["idle_bytes"] += u.idle_bytes
        g["swapped_bytes"] += u.swapped_bytes
    return sorted(groups.values(), key=lambda g: -g["present_bytes"])


def _z(words: npt.NDArray[np.uint64]) -> str:
    return base64.b64encode(zlib.compress(words.astype("<u8").tobytes(), 6)).decode()


def interval_record(snap: IdleSnapshot, index: int, elapsed_ms: float, ages: IdleAges,
                    with_bitmap: bool = False) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "interval", "format_version": FORMAT_VERSION, "index": index, "time_ns": time.time_ns(),
        "elapsed_ms": round(elapsed_ms, 3), "backend": snap.backend,
        "wss_bytes": snap.accessed_bytes, "idle_bytes": snap.idle_bytes, "present_bytes": snap.present_bytes,
        "swapped_bytes": snap.swapped_bytes, "untracked_bytes": sum(u.untracked_bytes for u in snap.usage),
        "idle_age_hist_bytes": ages.histogram_bytes(), "vmas": vma_breakdown(snap), "partial": snap.partial,
        "warnings": snap.warnings,
    }
    if with_bitmap:
        rec["bitmap"] = [{"start_vfn": s.start_vfn, "nr_pages": s.nr_pages, "idle_b64z": _z(s.idle),
                          "tracked_b64z": _z(pack_bits(s.has(PageState.TRACKED)))} for s in snap.segments]
    return rec


# --- reading recordings -------------------------------------------------------------------------------------
# Recordings are untrusted input (a file anyone may hand to `idle report`): every size in them is bounded
# before anything is allocated, and the file is streamed, never read whole.
MAX_LINE_BYTES = 64 << 20     # one record; an interval's bitmaps compress ~100x, so this is a huge process
MAX_INTERVALS = 1 << 18       # ~73 h at 1 s; the per-interval summaries kept in memory stay < ~300 MiB
MAX_BITMAP_SPANS = 1 << 16    # distinct bitmap segments over a whole recording (one per VMA range tracked)
USER_VFN_END = 1 << 44        # end of the largest user half (5-level paging, 2^56 bytes) in pages
MAX_KEPT_BITMAP_BYTES = 256 << 20  # bitmaps held when the source cannot be read twice (a pipe)
CHUNK_WORDS = 1 << 16         # heatmap: bitmap words decompressed and binned at a time (4 Mi pages)
_popcount = getattr(np, "bitwise_count", None)  # numpy >= 2.0
_SUMMARY_KEYS = ("index", "time_ns", "elapsed_ms", "wss_bytes", "idle_bytes", "present_bytes", "swapped_bytes",
                 "untracked_bytes")


class RecordingError(ValueError):
    """A recording that is not what `vmsight idle record` writes (the message names the line)."""


@dataclass
class Recording:
    """Header, per-interval summaries (numbers only: the keys of :data:`_SUMMARY_KEYS`,
    ``idle_age_hist_bytes``, ``partial``) and end record of a recording. Bitmaps are not held: a recording
    read from a path is read again for them (:meth:`bitmaps`), one read from lines keeps them."""

    header: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    path: str | None = None
    _bitmaps: list[Any] | None = field(default=None, repr=False)

    def bitmaps(self) -> Iterator[tuple[int, list[Any]]]:
        """(interval position, its ``bitmap`` list as found in the file), in interval order."""
        if self._bitmaps is not None:
            yield from enumerate(self._bitmaps)
            return
        if self.path is None:
            return
        i = 0
        with open(self.path, "rb") as f:
            for _, obj in iter_records(f):
                if obj.get("type") == "interval":
                    if i >= len(self.intervals):
                        return  # the file grew since it was read: stick to what the summaries cover
                    yield i, obj.get("bitmap", [])
                    i += 1


def _lines(source: IO[bytes] | Iterable[str | bytes]) -> Iterator[tuple[int, bytes | str]]:
    """Numbered lines, each at most MAX_LINE_BYTES; a binary file is read with a bounded readline (a file
    with no newline, such as /dev/zero, is refused after MAX_LINE_BYTES, not read into memory)."""
    readline = getattr(source, "readline", None)
    if readline is not None:
        n = 0
        while True:
            n += 1
            line = readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise RecordingError(f"line {n} is over {MAX_LINE_BYTES >> 20} MiB: not a vmsight recording")
            yield n, line
    for n, line in enumerate(source, 1):
        if len(line) > MAX_LINE_BYTES:
            raise RecordingError(f"line {n} is over {MAX_LINE_BYTES >> 20} MiB: not a vmsight recording")
        yield n, line


def iter_records(source: IO[bytes] | Iterable[str | bytes],
                 warnings: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each JSON object line. A last line that does not parse is a recording cut
    short (the recorder was killed mid-write): it is dropped with a note in ``warnings``; a bad line
    anywhere else is a :class:`RecordingError`."""
    bad: str | None = None
    last_n = 0
    for n, line in _lines(source):
        if not line.strip():
            continue
        if bad is not None:
            raise RecordingError(bad)
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            bad = f"line {n}: not JSON: {str(e)[:200]}"
            last_n = n
            continue
        if not isinstance(obj, dict):
            raise RecordingError(f"line {n}: a {type(obj).__name__}, not a JSON object")
        yield n, obj
    if bad is not None:
        msg = f"line {last_n} (the last) is cut short or not JSON: ignored"
        log.info(msg)
        if warnings is not None:
            warnings.append(msg)


def _number(obj: dict[str, Any], key: str, n: int, default: float = 0) -> float:
    v = obj.get(key, default)
    # counts, bytes and times are >= 0 and fit in 64 bits: sums and bar widths of them stay finite
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1 << 63:
        raise RecordingError(f"line {n}: {key} is {str(v)[:40]!r}, not a number from 0 to 2^63")
    return v


def _summary(obj: dict[str, Any], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: _number(obj, k, n, INTERVAL_DEFAULTS.get(k, 0)) for k in _SUMMARY_KEYS}
    hist = obj.get("idle_age_hist_bytes", {})
    if not isinstance(hist, dict) or len(hist) > 64:
        raise RecordingError(f"line {n}: idle_age_hist_bytes is not an object of at most 64 counts")
    out["idle_age_hist_bytes"] = {str(k)[:20]: _number(hist, k, n) for k in hist}
    out["partial"] = bool(obj.get("partial", False))
    return out


def read_recording(source: str | os.PathLike[str] | IO[bytes] | Iterable[str | bytes],
                   bitmaps: bool = True) -> Recording:
    """Parse a JSON-lines recording (a path, a binary file or lines); unknown record types are skipped,
    missing keys get defaults. A regular file is streamed and read again for its bitmaps: memory stays bounded
    whatever it holds. A pipe cannot be read twice: its bitmaps are kept (``bitmaps=False``: dropped), at
    most MAX_KEPT_BITMAP_BYTES of them."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                rec = _read(f, keep_bitmaps=False)
                rec.path = os.fspath(source)
            else:
                rec = _read(f, keep_bitmaps=bitmaps)
        return rec
    return _read(source, keep_bitmaps=bitmaps)


def _read(source: IO[bytes] | Iterable[str | bytes], keep_bitmaps: bool) -> Recording:
    rec: Recording | None = None
    warnings: list[str] = []
    bitmaps: list[Any] = []
    kept = 0
    for n, obj in iter_records(source, warnings):
        version = obj.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise RecordingError(f"line {n}: format_version {str(version)[:40]!r} is not a number")
        if version > FORMAT_VERSION and not any("format_version" in w for w in warnings):
            warnings.append(f"line {n}: format_version {version} is newer than this reader ({FORMAT_VERSION})")
        t = obj.get("type")
        if t == "header":
            rec = Recording(obj, warnings=warnings)
            bitmaps = []
        elif t == "interval":
            if rec is None:
                rec = Recording({"type": "header", "format_version": FORMAT_VERSION}, warnings=warnings)
            if len(rec.intervals) >= MAX_INTERVALS:
                raise RecordingError(f"line {n}: over {MAX_INTERVALS} intervals; split the recording")
            rec.intervals.append(_summary(obj, n))
            if keep_bitmaps:
                bm = obj.get("bitmap", [])
                kept += sum(len(v) for b in bm if isinstance(b, dict) for v in b.values()
                            if isinstance(v, str)) if isinstance(bm, list) else 0
                if kept > MAX_KEPT_BITMAP_BYTES:
                    raise RecordingError(f"line {n}: over {MAX_KEPT_BITMAP_BYTES >> 20} MiB of bitmaps from a "
                                         "pipe or lines: save the recording to a file (it is then streamed)")
                bitmaps.append(bm)
        elif t == "end" and rec is not None:
            rec.end = {k: v for k, v in obj.items() if k in ("type", "format_version", "reason")}
    if rec is None:
        raise RecordingError("no header or interval records")
    rec._bitmaps = bitmaps if keep_bitmaps else None
    return rec


def _span(b: Any, where: str) -> tuple[int, int]:
    """(start_vfn, nr_pages) of one bitmap entry, checked against the user address space."""
    if not isinstance(b, dict):
        raise RecordingError(f"{where}: not an object")
    s, n = b.get("start_vfn"), b.get("nr_pages")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, n)):
        raise RecordingError(f"{where}: start_vfn and nr_pages must be integers")
    assert isinstance(s, int) and isinstance(n, int)
    if not (0 <= s < USER_VFN_END and 0 < n <= USER_VFN_END - s):
        raise RecordingError(f"{where}: pages [{s:#x}, {s:#x} + {n:#x}) are outside the user address space")
    for key in ("idle_b64z", "tracked_b64z"):
        if not isinstance(b.get(key), str):
            raise RecordingError(f"{where}: {key} is not a string")
    return s, n


def _exactly(d: Any, data: bytes, size: int, where: str) -> Iterator[bytes]:
    """``size`` bytes decompressed from ``data`` in pieces of at most CHUNK_WORDS words; the stream must hold
    exactly that many (decompressobj's max_length: a zlib bomb never expands beyond what nr_pages claims)."""
    tail = data
    left = size
    buf = b""
    try:
        while left > 0:
            want = min(CHUNK_WORDS * WORD_BYTES, left) - len(buf)
            out = d.decompress(tail, want)
            tail = d.unconsumed_tail
            if not out:
                raise RecordingError(f"{where}: holds fewer than the {size} bytes nr_pages needs")
            buf += out
            if len(buf) == min(CHUNK_WORDS * WORD_BYTES, left):
                left -= len(buf)
                yield buf
                buf = b""
        if d.decompress(tail, 1) or not d.eof:
            raise RecordingError(f"{where}: does not hold exactly the {size} bytes nr_pages needs")
    except zlib.error as e:
        raise RecordingError(f"{where}: not zlib data ({e})") from None


def _words(text: str, nr_words: int, where: str) -> Iterator[npt.NDArray[np.uint64]]:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise RecordingError(f"{where}: not base64") from None
    for chunk in _exactly(zlib.decompressobj(), data, nr_words * WORD_BYTES, where):
        yield np.frombuffer(chunk, dtype="<u8").astype(np.uint64)


def heatmap_matrix(rec: Recording, rows: int = 64) -> tuple[npt.NDArray[np.float64], list[tuple[int, int]]]:
    """Address x time matrix of the accessed fraction of tracked pages (NaN = nothing tracked there).

    The address axis concatenates every range ever recorded (gaps between VMAs are skipped) and splits it into
    ``rows`` bins; returns the matrix (rows x intervals) and each row's [start_gva, end_gva) of its first/last
    page. Bitmaps are decompressed and binned CHUNK_WORDS words at a time: memory does not grow with them."""
    spans: dict[int, int] = {}
    for t, bitmap in rec.bitmaps():
        if not isinstance(bitmap, list):
            raise RecordingError(f"interval {t}: bitmap is not a list")
        for j, b in enumerate(bitmap):
            s, n = _span(b, f"interval {t} bitmap {j}")
            spans[s] = max(spans.get(s, 0), n)
            if len(spans) > MAX_BITMAP_SPANS:
                raise RecordingError(f"over {MAX_BITMAP_SPANS} distinct bitmap segments: not a vmsight recording")
    merged: list[list[int]] = []
    for s in sorted(spans):
        e = s + spans[s]
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    total = sum(e - s for s, e in merged)
    if total == 0 or not rec.intervals:
        return np.zeros((0, len(rec.intervals))), []
    starts = [s for s, _ in merged]
    offsets = np.cumsum([0] + [e - s for s, e in merged])
    rows = max(1, min(rows, total))
    edges = np.linspace(0, total, rows + 1).astype(np.int64)
    mat = np.full((rows, len(rec.intervals)), np.nan)
    for t, bitmap in rec.bitmaps():
        tsum = np.zeros(rows, np.int64)
        asum = np.zeros(rows, np.int64)
        for j, b in enumerate(bitmap):
            where = f"interval {t} bitmap {j}"
            s, n = _span(b, where)
            k = bisect.bisect_right(starts, s) - 1
            if k < 0 or s + n > merged[k][1]:
                raise RecordingError(f"{where}: not seen on the first pass (did the file change?)")
            pos = int(offsets[k]) + (s - merged[k][0])
            nw = -(-n // WORD_BITS)
            for idle_w, trk_w in zip(_words(b["idle_b64z"], nw, where + " idle_b64z"),
                                     _words(b["tracked_b64z"], nw, where + " tracked_b64z"), strict=True):
                m = min(len(idle_w) * WORD_BITS, n)
                r0 = int(np.searchsorted(edges, pos, side="right")) - 1
                if _popcount is not None and m == len(idle_w) * WORD_BITS and edges[r0 + 1] >= pos + m:
                    # the usual case, the piece inside one row: count bits, no unpacking (8x less memory)
                    tsum[r0] += int(_popcount(trk_w).sum())
                    asum[r0] += int(_popcount(trk_w & ~idle_w).sum())
                    pos += m
                    n -= m
                    continue
                trk = unpack_bits(trk_w)[:m]
                acc = trk & ~unpack_bits(idle_w)[:m]
                # the rows this piece [pos, pos + m) falls in, and where it crosses a row edge
                r1 = int(np.searchsorted(edges, pos + m - 1, side="right")) - 1
                cuts = np.concatenate(([0], edges[r0 + 1:r1 + 1] - pos))
                tsum[r0:r1 + 1] += np.add.reduceat(trk.astype(np.int64), cuts)
                asum[r0:r1 + 1] += np.add.reduceat(acc.astype(np.int64), cuts)
                pos += m
                n -= m
        with np.errstate(invalid="ignore", divide="ignore"):
            mat[:, t] = np.where(tsum > 0, asum / np.maximum(tsum, 1), np.nan)
    labels = []
    for r in range(rows):
        lo, hi = int(edges[r]), int(edges[r + 1]) - 1
        labels.append((_pos_to_gva(lo, merged, offsets), _pos_to_gva(max(hi, lo), merged, offsets) + PAGE_SIZE))
    return mat, labels


def _pos_to_gva(pos: int, merged: list[list[int]], offsets: npt.NDArray[np.int64]) -> int:
    k = int(np.searchsorted(offsets, pos, side="right") - 1)
    k = min(k, len(merged) - 1)
    return (merged[k][0] + pos - int(offsets[k])) * PAGE_SIZE


def run_intervals(tracker: Tracker, interval_s: float, duration_s: float | None,
                  on_interval: Callable[[dict[str, Any], IdleSnapshot], None], ranges: Ranges = None,
                  with_bitmap: bool = False, sleep: Callable[[float], None] = time.sleep) -> str:
    """mark, then every ``interval_s``: read and re-mark (``read_and_mark``), calling ``on_interval(record, snapshot)``. Returns why
    it stopped ("duration", or the error text when the process exited). A ``duration_s`` makes
    floor(duration / interval) reads: the run never overshoots by a whole interval (an interval longer than the
    duration is refused rather than run once past it)."""
    from vmsight.idle.errors import ProcessGone

    count = None if duration_s is None else int(duration_s / interval_s + 1e-9)
    if interval_s <= 0 or count == 0:
        raise ValueError(f"interval {interval_s} s must be > 0 and at most the duration {duration_s} s")
    ages = IdleAges()
    tracker.mark_idle(ranges)
    last_s = time.monotonic()
    i = 0
    while count is None or i < count:
        sleep(max(0.0, last_s + interval_s - time.monotonic()))
        try:
            snap = tracker.read_and_mark(ranges)
            now_s = time.monotonic()
        except ProcessGone as e:
            return str(e)
        ages.update(snap)
        on_interval(interval_record(snap, i, (now_s - last_s) * 1000, ages, with_bitmap), snap)
        last_s = now_s
        i += 1
    return "duration"
