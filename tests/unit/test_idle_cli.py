"""`vmsight idle` on this host (clear_refs backend) against a real workload: live JSON lines, record, report
with WSS and heatmaps, and the proposed-ABI bitmap output."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_idle_host import Workload
from vmsight.cli.common import parse_duration
from vmsight.idle.stats import heatmap_matrix, read_recording

VMSIGHT = [sys.executable, "-m", "vmsight.cli.main"]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workload]:
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", str(tmp_path))
    w = Workload("--mib", "4")
    yield w
    w.close()


def test_parse_duration() -> None:
    assert parse_duration("1s") == 1.0 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120.0
    assert parse_duration("1.5") == 1.5


def test_live_json_lines(work: Workload) -> None:
    r = subprocess.run(VMSIGHT + ["idle", str(work.p.pid), "--interval", "200ms", "--duration", "1s",
                                  "--backend", "clear_refs", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert recs[0]["type"] == "header" and recs[0]["format_version"] == 1 and recs[0]["backend"] == "clear_refs"
    ivs = [x for x in recs if x["type"] == "interval"]
    assert 3 <= len(ivs) <= 6 and recs[-1]["type"] == "end"
    for iv in ivs:
        assert {"wss_bytes", "idle_bytes", "swapped_bytes", "idle_age_hist_bytes", "vmas"} <= iv.keys()
        labels = {g["label"] for g in iv["vmas"]}
        assert "[anon]" in labels and "[stack]" in labels and any(lb.startswith("/") for lb in labels)
    # the workload sleeps on stdin: its 4 MiB mapping stays idle, and idle ages grow interval by interval
    assert ivs[-1]["idle_age_hist_bytes"]["2"] >= 4 << 20


def test_record_report_heatmap(work: Workload, tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    r = subprocess.run(VMSIGHT + ["idle", "record", str(work.p.pid), "-o", str(out), "--interval", "200ms",
                                  "--duration", "1s", "--backend", "clear_refs", "--range",
                                  f"{work.addr:#x}-{work.addr + work.size:#x}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rec = read_recording(out.read_text().splitlines())
    assert rec.header["pid"] == work.p.pid and rec.end is not None and len(rec.intervals) >= 3
    mat, labels = heatmap_matrix(rec, rows=8)
    assert mat.shape == (8, len(rec.intervals)) and labels[0][0] == work.addr
    assert np.nanmax(mat) == 0.0           # nothing touched: accessed fraction 0 everywhere
    png = tmp_path / "heat.png"
    r = subprocess.run(VMSIGHT + ["idle", "report", str(out), "--wss", "--heatmap", str(png), "--rows", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "WSS mean" in r.stdout and f"{work.addr:#014x} |" in r.stdout


def test_bitmap_words(work: Workload) -> None:
    r = subprocess.run(VMSIGHT + ["--json", "idle", "bitmap", str(work.p.pid), "--start", hex(work.addr),
                                  "--end", hex(work.addr + work.size), "--mark", "--wait", "0.2s",
                                  "--backend", "clear_refs"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["offset_bytes"] == (work.addr >> 12) // 64 * 8 and len(d["words"]) == work.size // 4096 // 64
    assert all(int(w, 16) == 2**64 - 1 for w in d["words"])  # untouched VMA: every page idle


def test_errors_are_one_line(work: Workload) -> None:
    r = subprocess.run(VMSIGHT + ["idle", "bitmap", "999999999", "--start", "0", "--end", "4096"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("vmsight: error:") and "999999999" in r.stderr
    r = subprocess.run(VMSIGHT + ["idle", str(work.p.pid), "--backend", "page_idle", "--duration", "1s"],
                       capture_output=True, text=True, timeout=60)
    if not Path("/sys/kernel/mm/page_idle/bitmap").exists():
        assert r.returncode != 0 and "CONFIG_IDLE_PAGE_TRACKING" in r.stderr
