"""`vmsight idle` and vm.json on bad or hostile input (issue 9 items 8, 9): bounded memory, one line naming the
fix, nothing changed. Every CLI run here is a subprocess under RLIMIT_AS = 1 GiB: an unbounded allocation is a
MemoryError (an internal error), not a slow machine."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_idle_host import Workload
from vmsight.idle.stats import read_recording, run_intervals

SRC = str(Path(__file__).resolve().parents[2] / "src")
AS_LIMIT = 1 << 30
HEADER = {"type": "header", "format_version": 1, "pid": 1, "comm": "w", "backend": "page_idle", "interval_ms": 1000}


def _limit(size: int = AS_LIMIT) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (size, size))


def vmsight(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            preexec: Any = _limit) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vmsight.cli.main", *args], capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": SRC, **(env or {})}, preexec_fn=preexec)


def assert_one_line_error(r: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    lines = [x for x in err.splitlines() if not x.startswith(("vmsight: warning:", "WARNING vmsight."))]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("vmsight: error:"), err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


def z(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode()


def interval(bitmap: list[Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"type": "interval", "index": 0, "elapsed_ms": 1000, "wss_bytes": 4096, "idle_bytes": 0,
            "swapped_bytes": 0, **({"bitmap": bitmap} if bitmap is not None else {}), **kw}


def write(path: Path, *records: Any, tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)
    return path


# --- item 8: unbounded input --------------------------------------------------------------------------------
def test_report_of_dev_zero_is_refused() -> None:
    r = vmsight("idle", "report", "/dev/zero")
    assert_one_line_error(r, "line 1 is over 64 MiB")


def test_zlib_bomb_stops_at_the_claimed_size(tmp_path: Path) -> None:
    bomb = z(bytes(256 << 20))  # 256 KiB of zlib, 256 MiB of words
    f = write(tmp_path / "r.jsonl", HEADER, interval([{"start_vfn": 0, "nr_pages": 64, "idle_b64z": bomb,
                                                        "tracked_b64z": bomb}]))
    assert_one_line_error(vmsight("idle", "report", str(f), "--heatmap", "-"), "does not hold exactly the 8 bytes")
    # claimed honestly (2 Gi pages, nothing tracked): decompressed and binned in pieces, memory stays bounded
    f = write(tmp_path / "r.jsonl", HEADER, interval([{"start_vfn": 0, "nr_pages": (256 << 20) * 8,
                                                        "idle_b64z": bomb, "tracked_b64z": bomb}]))
    r = vmsight("idle", "report", str(f), "--heatmap", "-", "--rows", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().count("|?|") == 4   # nothing tracked anywhere


def test_nr_pages_must_match_the_data(tmp_path: Path) -> None:
    ok = z(bytes(8))
    f = write(tmp_path / "r.jsonl", HEADER, interval([{"start_vfn": 0, "nr_pages": 1 << 40, "idle_b64z": ok,
                                                        "tracked_b64z": ok}]))
    assert_one_line_error(vmsight("idle", "report", str(f), "--heatmap", "-"), "holds fewer than")
    f = write(tmp_path / "r.jsonl", HEADER, interval([{"start_vfn": 1 << 44, "nr_pages": 64, "idle_b64z": ok,
                                                        "tracked_b64z": ok}]))
    assert_one_line_error(vmsight("idle", "report", str(f), "--heatmap", "-"), "outside the user address space")


def test_truncated_last_line_loses_that_line_only(tmp_path: Path) -> None:
    words = np.array([0xFFFF_FFFF_0000_0000], "<u8").tobytes()   # pages 0-31 accessed, 32-63 idle
    bm = [{"start_vfn": 64, "nr_pages": 64, "idle_b64z": z(words), "tracked_b64z": z(b"\xff" * 8)}]
    full = json.dumps(interval(bm, index=1)).encode()
    f = write(tmp_path / "r.jsonl", HEADER, interval(bm), tail=full[: len(full) // 2])
    r = vmsight("--json", "idle", "report", str(f), "--heatmap", "-", "--rows", "2")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["intervals"] == 1 and summary["wss_mean_bytes"] == 4096
    assert r.stderr.decode().startswith("vmsight: warning:") and "line 3 (the last) is cut short" in r.stderr.decode()
    # the same garbage in the middle is a damaged file, not a cut one
    f = write(tmp_path / "r.jsonl", HEADER, interval(bm))
    f.write_bytes(f.read_bytes() + full[: len(full) // 2] + b"\n" + full + b"\n")
    assert_one_line_error(vmsight("idle", "report", str(f)), "line 3: not JSON")


def test_recording_is_streamed_not_read_whole(tmp_path: Path) -> None:
    """Bitmaps are not held per interval: 256 intervals of ~2 MiB bitmaps (512 MiB of base64) report within a
    512 MiB address-space limit (a small report needs ~384 MiB)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 1 << 63, 200_000, dtype=np.uint64).astype("<u8").tobytes()
    rnd = base64.b64encode(zlib.compress(raw, 0)).decode()   # incompressible: ~2 MiB per line
    bm = [{"start_vfn": 0, "nr_pages": 200_000 * 64, "idle_b64z": rnd, "tracked_b64z": z(b"\xff" * len(raw))}]
    line = json.dumps(interval(bm)).encode() + b"\n"
    with open(tmp_path / "r.jsonl", "wb") as f:
        f.write(json.dumps(HEADER).encode() + b"\n")
        for _ in range(256):
            f.write(line)
    r = vmsight("--json", "idle", "report", str(tmp_path / "r.jsonl"), "--heatmap", "-", "--rows", "1",
                preexec=lambda: _limit(512 << 20))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["intervals"] == 256


BAD_BITMAPS = [
    ("{}", "bitmap is not a list"), ([5], "not an object"), ([{"start_vfn": "x", "nr_pages": 64}], "integers"),
    ([{"start_vfn": 0, "nr_pages": True}], "integers"), ([{"start_vfn": -64, "nr_pages": 64}], "outside"),
    ([{"start_vfn": 0, "nr_pages": 0}], "outside"), ([{"start_vfn": 0, "nr_pages": 64, "idle_b64z": 5}], "string"),
    ([{"start_vfn": 0, "nr_pages": 64, "idle_b64z": "!!", "tracked_b64z": "!!"}], "not base64"),
    ([{"start_vfn": 0, "nr_pages": 64, "idle_b64z": "AAAA", "tracked_b64z": "AAAA"}], "not zlib"),
    ([{"start_vfn": 0, "nr_pages": 128, "idle_b64z": z(bytes(8)), "tracked_b64z": z(bytes(8))}], "fewer than"),
    ([{"start_vfn": 0, "nr_pages": 64, "idle_b64z": z(bytes(8))[:-4], "tracked_b64z": z(bytes(8))}], "idle_b64z"),
]


@pytest.mark.parametrize("bitmap,needle", BAD_BITMAPS)
def test_malformed_report_bitmaps(tmp_path: Path, bitmap: Any, needle: str) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(HEADER) + "\n" + json.dumps({**interval(), "bitmap": bitmap}) + "\n")
    assert_one_line_error(vmsight("idle", "report", str(f), "--heatmap", "-"), needle)


@pytest.mark.parametrize("line,needle", [
    ('{"type": "interval", "wss_bytes": "x"}', "wss_bytes is 'x', not a number"),
    ('{"type": "interval", "elapsed_ms": [1]}', "elapsed_ms"), ('[1, 2]', "not a JSON object"),
    ('{"type": "header", "format_version": "2"}', "format_version"), ("[" * 100_000, "not JSON"),
    ('{"type": "interval", "idle_age_hist_bytes": {"1": "x"}}', "not a number"),
    ('{"type": "interval", "wss_bytes": 1e308}\n{"type": "interval", "wss_bytes": 1e308}', "1e+308"),
    ('{"type": "interval", "wss_bytes": -5}', "wss_bytes is '-5', not a number from 0 to 2^63"),
    ('{"type": "interval", "elapsed_ms": NaN}', "elapsed_ms is 'nan'"),
])
def test_malformed_records(tmp_path: Path, line: str, needle: str) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(HEADER) + "\n" + line + "\n" + json.dumps(interval()) + "\n")
    assert_one_line_error(vmsight("idle", "report", str(f), "--wss"), needle)


def test_terminal_output_is_escaped(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", {**HEADER, "comm": "\x1b[2J$\\x"}, interval())
    r = vmsight("idle", "report", str(f))
    assert r.returncode == 0 and b"\x1b" not in r.stdout and b"\\x1b[2J" in r.stdout


# --- hypothesis: no traceback, bounded memory ---------------------------------------------------------------
def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                     max_size=4), max_leaves=12)


def _bitmap_entries() -> st.SearchStrategy[dict[str, Any]]:
    sizes = st.sampled_from([0, 1, 8, 64, 4096, 1 << 20])
    blobs = st.one_of(sizes.map(lambda n: z(bytes(n))), sizes.map(lambda n: z(b"\xff" * n)),
                      st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=10))
    pages = st.one_of(st.sampled_from([0, 1, 63, 64, 4096, 1 << 23, 1 << 40, 1 << 44, -64]), st.integers())
    return st.fixed_dictionaries({"start_vfn": pages, "nr_pages": pages, "idle_b64z": blobs, "tracked_b64z": blobs})


def _records() -> st.SearchStrategy[bytes]:
    rec = st.one_of(
        st.just(HEADER), st.builds(interval, st.lists(_bitmap_entries(), max_size=3)),
        st.dictionaries(st.sampled_from(["type", "format_version", "wss_bytes", "elapsed_ms", "index", "bitmap",
                                         "idle_age_hist_bytes", "comm", "pid"]), _json_values(), max_size=5),
        st.builds(lambda k, v: {**interval(), k: v}, st.sampled_from(["wss_bytes", "bitmap", "index", "vmas"]),
                  _json_values()), _json_values())
    line = st.one_of(rec.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30))
    return st.lists(line, max_size=5).flatmap(
        lambda ls: st.integers(0, max(0, sum(len(x) + 1 for x in ls))).map(
            lambda cut: (b"\n".join(ls) + b"\n")[:cut] if ls else b""))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(content=_records(), heatmap=st.booleans())
def test_fuzz_idle_report(tmp_path: Path, content: bytes, heatmap: bool) -> None:
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(content)
    r = vmsight("idle", "report", str(f), "--wss", *(["--heatmap", str(tmp_path / "h.png")] if heatmap else []))
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, (content[:300], err)
    if r.returncode != 0:
        assert_one_line_error(r)


VALID_VM_JSON = {"dir": "/nonexistent/vm", "pid": 1 << 30, "qmp": "/nonexistent/vm/qmp.sock",
                 "gdb": "/nonexistent/vm/gdb.sock", "agent_socket": "/nonexistent/vm/agent.sock", "ram_file": None,
                 "ram_size": 1 << 28, "console_log": "/nonexistent/vm/console.log", "kernel": "k", "accel": "tcg",
                 "config": {}, "format_version": 1}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=200), _json_values().map(lambda v: json.dumps(v).encode()),
                         st.tuples(st.sampled_from(sorted(VALID_VM_JSON)), _json_values()).map(  # one field off
                             lambda kv: json.dumps({**VALID_VM_JSON, kv[0]: kv[1]}).encode()),
                         st.dictionaries(st.sampled_from(["qmp", "gdb", "ram_file", "pid", "dir", "agent_socket",
                                                          "format_version"]), _json_values(), max_size=6)
                         .map(lambda d: json.dumps(d).encode())),
       command=st.sampled_from([["uname"], ["ps"], ["vm", "exec", "--dir", "{dir}", "--", "true"]]))
def test_fuzz_vm_json(tmp_path: Path, content: bytes, command: list[str]) -> None:
    d = tmp_path / "vm"
    d.mkdir(exist_ok=True)
    (d / "vm.json").write_bytes(content)
    argv = [a.replace("{dir}", str(d)) for a in command]
    r = vmsight(*(argv if command[0] == "vm" else ["--vm", str(d), *argv]), timeout=60)
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, (content[:300], err)
    assert_one_line_error(r)
    assert (d / "vm.json").read_bytes() == content


# --- idle bitmap over huge ranges ---------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workload]:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", str(tmp_path))
    w = Workload("--mib", "4")
    yield w
    w.close()


def test_bitmap_over_the_whole_user_range(work: Workload) -> None:
    pid = str(work.p.pid)
    r = vmsight("idle", "bitmap", pid, "--start", "0", "--end", "0x7ffffffff000", "--backend", "clear_refs")
    assert_one_line_error(r, "1048576-word limit", "--raw")
    # --raw streams it: 2^29 words (4 GiB), most of them the zeros of unmapped space, under the 1 GiB limit
    p = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "idle", "bitmap", pid, "--start", "0",
                          "--end", "0x7ffffffff000", "--backend", "clear_refs", "--raw", "--mark", "--wait", "200ms"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=_limit, env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout is not None and p.stderr is not None
    n = 0
    idle_at = None
    word = work.addr >> 12 >> 6
    while chunk := p.stdout.read(1 << 22):
        if n <= word * 8 < n + len(chunk):
            idle_at = chunk[word * 8 - n: word * 8 - n + 8]
        n += len(chunk)
    assert p.wait(120) == 0, p.stderr.read()
    assert n == -(-(0x7FFFFFFFF000 >> 12) // 64) * 8
    assert idle_at == b"\xff" * 8      # the workload's untouched mapping reads idle at its word


def test_raw_bitmap_pieces_match_the_words(work: Workload) -> None:
    """--raw is written in pieces of 2^16 words (16 GiB of addresses): a range across pieces gives the
    same words as --json."""
    lo, hi = work.addr - (20 << 30), work.addr + work.size + (20 << 30)
    args = ["idle", "bitmap", str(work.p.pid), "--start", hex(lo), "--end", hex(hi), "--backend", "clear_refs",
            "--mark", "--wait", "200ms"]
    raw = vmsight(*args, "--raw")
    js = vmsight("--json", *args)
    assert raw.returncode == 0 and js.returncode == 0, (raw.stderr, js.stderr)
    words = [int(w, 16) for w in json.loads(js.stdout)["words"]]
    got = np.frombuffer(raw.stdout, np.uint64).tolist()
    assert len(got) == len(words) > 1 << 16
    # the workload's untouched 4 MiB lie in the second piece: all idle, at the same word in both outputs
    w0 = (work.addr >> 12) // 64 - (lo >> 12) // 64
    w1 = w0 + (work.size >> 12) // 64
    assert w0 > 1 << 16 and got[w0:w1] == words[w0:w1] == [2**64 - 1] * (w1 - w0)


# --- item 9: idle's bad options and outputs -----------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["idle", "999999999", "--interval", "0"], "must be > 0"),
    (["idle", "999999999", "--duration", "0ms"], "must be > 0"),
    (["idle", "999999999", "--interval", "99999999h"], "is over"),
    (["idle", "report", "x", "--heatmap", "-", "--rows", "0"], "--rows 0"),
    (["idle", "bitmap", "999999999", "--start", "-4096", "--end", "4096"], "0 <= start < end"),
    (["idle", "bitmap", "999999999", "--start", "0", "--end", hex(1 << 60)], "user address space"),
    (["idle", "999999999", "--range", "0-0x7ffffffff000"], "--range spans 131071 GiB, over the 64 GiB"),
    (["idle", "record", "999999999", "-o", "/nonexistent/x", "--range", "0x5000-0x3000"], "need START < END"),
])
def test_bad_idle_options(argv: list[str], needle: str) -> None:
    """Refused before any process is looked at (the pid does not exist)."""
    r = vmsight(*argv)
    err = r.stderr.decode()
    assert r.returncode == 2 and needle in err and "Traceback" not in err, err


def test_interval_longer_than_duration_is_refused_at_once(work: Workload, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = vmsight("idle", str(work.p.pid), "--interval", "15s", "--duration", "2s", "--backend", "clear_refs")
    assert_one_line_error(r, "--interval 15s is longer than --duration 2s")
    r = vmsight("idle", "record", str(work.p.pid), "-o", str(tmp_path / "r"), "--interval", "1m")
    assert_one_line_error(r, "--interval 60s is longer than --duration 30s (the default of idle record)")
    assert time.monotonic() - t0 < 10 and not (tmp_path / "r").exists()


class _FakeTracker:
    def __init__(self) -> None:
        self.reads = 0

    def mark_idle(self, ranges: Any) -> None:
        pass

    def read_and_mark(self, ranges: Any) -> Any:
        from vmsight.idle.result import IdleSnapshot

        self.reads += 1
        return IdleSnapshot(1, "x", 0, "fake", "page", False, [], [], [], 0)


@pytest.mark.parametrize("interval,duration,reads", [(1.0, 2.5, 2), (0.2, 1.0, 5), (1.0, 1.0, 1), (15, None, 3)])
def test_run_intervals_never_overshoots_by_an_interval(interval: float, duration: float | None, reads: int) -> None:
    t = _FakeTracker()
    slept: list[float] = []
    recs: list[Any] = []

    def on(rec: Any, snap: Any) -> None:
        recs.append(rec)
        if duration is None and len(recs) == 3:
            raise KeyboardInterrupt

    try:
        run_intervals(t, interval, duration, on, sleep=slept.append)
    except KeyboardInterrupt:
        pass
    assert t.reads == reads == len(recs)
    with pytest.raises(ValueError):
        run_intervals(_FakeTracker(), 15, 2, on)


def test_record_to_a_missing_dir_or_a_full_disk(work: Workload, tmp_path: Path) -> None:
    pid = str(work.p.pid)
    r = vmsight("idle", "record", pid, "-o", str(tmp_path / "no" / "r.jsonl"), "--duration", "1s",
                "--backend", "clear_refs")
    assert_one_line_error(r, "no directory", "create it first")
    r = vmsight("idle", "record", pid, "-o", "/dev/full", "--duration", "1s", "--interval", "500ms",
                "--backend", "clear_refs")
    assert_one_line_error(r, "cannot write /dev/full: No space left on device")


def test_record_is_0600_and_a_bad_pid_leaves_the_file(work: Workload, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text("keep me")
    r = vmsight("idle", "record", "999999999", "-o", str(out), "--duration", "1s")
    assert_one_line_error(r, "999999999")
    assert out.read_text() == "keep me"
    out.unlink()
    r = vmsight("idle", "record", str(work.p.pid), "-o", str(out), "--duration", "400ms", "--interval", "200ms",
                "--backend", "clear_refs")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    rec = read_recording(out)
    assert len(rec.intervals) == 2 and rec.end is not None and not rec.warnings
    (tmp_path / "link").symlink_to(out)
    r = vmsight("idle", "record", str(work.p.pid), "-o", str(tmp_path / "link"), "--duration", "200ms",
                "--interval", "200ms", "--backend", "clear_refs")
    assert_one_line_error(r, "symlink")


def test_named_and_gva_ranges_are_bounded() -> None:
    """A 1 TiB VMA (a reservation, or a corrupt guest VMA) named as a range is refused, not allocated page by
    page; the default set skips it (truncated, flagged partial) as before."""
    from vmsight.idle.errors import BadRange
    from vmsight.idle.procfs import Vma
    from vmsight.idle.tracker import resolve_ranges

    big = Vma(0x7F00_0000_0000, 0x7F00_0000_0000 + (1 << 40), "rw-p", 0, "00:00", 0, "[anon:huge]")
    heap = Vma(0x5000_0000, 0x5010_0000, "rw-p", 0, "00:00", 0, "[heap]")
    with pytest.raises(BadRange, match="1024 GiB, over the 64 GiB"):
        resolve_ranges("[anon]", [heap, big])
    with pytest.raises(BadRange, match="over the 64 GiB"):
        resolve_ranges([(0, 1 << 47)], [])
    assert resolve_ranges("[heap]", [heap, big]) == ([(0x50000, 0x50100)], False)
    assert resolve_ranges(None, [heap, big]) == ([(0x50000, 0x50100)], True)


def test_iter_words_pieces_are_words() -> None:
    from vmsight.idle.result import IdleSegment, IdleSnapshot

    segs = []
    for start, n in ((64, 640), (4096, 128), (100_032, 64)):
        s = IdleSegment.empty(start, n)
        s.idle[:] = np.arange(1, len(s.idle) + 1, dtype=np.uint64) * np.uint64(start)
        segs.append(s)
    snap = IdleSnapshot(1, "x", 0, "fake", "page", False, segs, [], [], 0)
    for lo, hi, chunk in ((0, 100_100, 3), (70, 5000, 1), (64, 128, 100), (0, 130_000, 1 << 16)):
        pieces = list(snap.iter_words(lo, hi, chunk))
        assert all(len(w) <= chunk for _, w in pieces) and pieces[0][0] == lo // 64 * 64
        assert np.concatenate([w for _, w in pieces]).tolist() == snap.words(lo, hi).tolist()


def test_heatmap_size_is_bounded(tmp_path: Path) -> None:
    """4096 rows x 65536 intervals would be a 2 GiB matrix: refused, naming the --rows that fits."""
    bm = [{"start_vfn": 0, "nr_pages": 4096, "idle_b64z": z(bytes(512)), "tracked_b64z": z(b"\xff" * 512)}]
    f = write(tmp_path / "r.jsonl", HEADER, *[interval(bm, index=i) for i in range(1 << 16)])
    assert_one_line_error(vmsight("idle", "report", str(f), "--heatmap", "-", "--rows", "4096"),
                          "4096 rows x 65536 intervals is over 16777216 cells: give --rows 256 or fewer")


def test_report_from_a_pipe(tmp_path: Path) -> None:
    """A pipe cannot be read twice for the heatmap: its bitmaps are kept, at most 256 MiB of them."""
    words = np.array([0xFFFF_FFFF_0000_0000], "<u8").tobytes()   # pages 0-31 accessed, 32-63 idle
    bm = [{"start_vfn": 64, "nr_pages": 64, "idle_b64z": z(words), "tracked_b64z": z(b"\xff" * 8)}]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in (HEADER, interval(bm), interval(bm)))
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "idle", "report", "/dev/stdin", "--heatmap", "-",
                        "--rows", "2"], input=data, capture_output=True, timeout=60, preexec_fn=_limit,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[-2:] == ["0x000000040000 |@@|", "0x000000060000 |  |"]
    rnd = base64.b64encode(np.random.default_rng(0).bytes(3 << 20)).decode()   # 4 MiB a line
    big = [{"start_vfn": 0, "nr_pages": 64, "idle_b64z": rnd, "tracked_b64z": ""}]
    line = json.dumps(interval(big)).encode() + b"\n"
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "idle", "report", "/dev/stdin", "--heatmap", "-"],
                       input=json.dumps(HEADER).encode() + b"\n" + line * 70, capture_output=True, timeout=60,
                       preexec_fn=_limit, env={**os.environ, "PYTHONPATH": SRC})
    assert_one_line_error(r, "over 256 MiB of bitmaps from a pipe", "save the recording to a file")
