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
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vmsight.idle.abi import PAGE_SIZE, pack_bits, unpack_bits
from vmsight.idle.result import FORMAT_VERSION, IdleSnapshot, PageState

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


def _unz(text: str) -> npt.NDArray[np.uint64]:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u8").astype(np.uint64)


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


@dataclass
class Recording:
    header: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None


def read_recording(lines: Iterable[str]) -> Recording:
    """Parse a JSON-lines recording; unknown record types are skipped, missing keys get defaults."""
    rec: Recording | None = None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"line {n}: not JSON: {e}") from None
        if obj.get("format_version", 1) > FORMAT_VERSION:
            log.warning("line %d: format_version %s is newer than this reader (%d)", n,
                        obj.get("format_version"), FORMAT_VERSION)
        t = obj.get("type")
        if t == "header":
            rec = Recording(obj)
        elif t == "interval":
            if rec is None:
                rec = Recording({"type": "header", "format_version": FORMAT_VERSION})
            rec.intervals.append({**INTERVAL_DEFAULTS, **obj})
        elif t == "end" and rec is not None:
            rec.end = obj
    if rec is None:
        raise ValueError("no header or interval records")
    return rec


def heatmap_matrix(rec: Recording, rows: int = 64) -> tuple[npt.NDArray[np.float64], list[tuple[int, int]]]:
    """Address x time matrix of the accessed fraction of tracked pages (NaN = nothing tracked there).

    The address axis concatenates every range ever recorded (gaps between VMAs are skipped) and splits it into
    ``rows`` bins; returns the matrix (rows x intervals) and each row's [start_gva, end_gva) of its first/last
    page."""
    spans: dict[int, int] = {}
    for it in rec.intervals:
        for b in it.get("bitmap", []):
            s, n = int(b["start_vfn"]), int(b["nr_pages"])
            spans[s] = max(spans.get(s, 0), n)
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
    offsets = np.cumsum([0] + [e - s for s, e in merged])
    rows = max(1, min(rows, total))
    edges = np.linspace(0, total, rows + 1).astype(np.int64)
    mat = np.full((rows, len(rec.intervals)), np.nan)
    for t, it in enumerate(rec.intervals):
        acc = np.zeros(total, bool)
        trk = np.zeros(total, bool)
        for b in it.get("bitmap", []):
            s, n = int(b["start_vfn"]), int(b["nr_pages"])
            k = next(i for i, (ms, me) in enumerate(merged) if ms <= s < me)
            pos = offsets[k] + (s - merged[k][0])
            idle = unpack_bits(_unz(b["idle_b64z"]))[:n]
            tracked = unpack_bits(_unz(b["tracked_b64z"]))[:n]
            trk[pos:pos + n] |= tracked
            acc[pos:pos + n] |= tracked & ~idle
        tsum = np.add.reduceat(trk.astype(np.int64), edges[:-1])
        asum = np.add.reduceat(acc.astype(np.int64), edges[:-1])
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


def run_intervals(tracker: Any, interval_s: float, duration_s: float | None,
                  on_interval: Callable[[dict[str, Any], IdleSnapshot], None], ranges: Any = None,
                  with_bitmap: bool = False, sleep: Callable[[float], None] = time.sleep) -> str:
    """mark, then every ``interval_s``: read and re-mark (``read_and_mark``), calling ``on_interval(record, snapshot)``. Returns why
    it stopped ("duration", or the error text when the process exited)."""
    from vmsight.idle.errors import ProcessGone

    ages = IdleAges()
    t0 = time.monotonic()
    tracker.mark_idle(ranges)
    last = time.monotonic()
    i = 0
    while duration_s is None or time.monotonic() - t0 < duration_s - 1e-3:
        sleep(max(0.0, last + interval_s - time.monotonic()))
        try:
            snap = tracker.read_and_mark(ranges)
            now = time.monotonic()
        except ProcessGone as e:
            return str(e)
        ages.update(snap)
        on_interval(interval_record(snap, i, (now - last) * 1000, ages, with_bitmap), snap)
        last = now
        i += 1
    return "duration"
