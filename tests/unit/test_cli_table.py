"""cli.common.table, the one table helper (issue 11): cells and titles are plain text, escaped for the terminal,
so a guest or recorded string (comm, VMA name) is shown as it is, never read as rich markup (an unbalanced "[/]"
raised MarkupError in the live idle table) nor sent as control characters."""

from __future__ import annotations

from rich.console import Console

from vmsight.cli.common import table
from vmsight.cli.idle import _table

EVIL = "[/][bold red]x\x1b[2J"


def _render(obj: object) -> str:
    con = Console(record=True, width=160, color_system=None, force_terminal=False)
    con.print(obj)
    return con.export_text()


def test_cells_and_title_are_plain_escaped_text() -> None:
    out = _render(table(("name", "KiB"), [[EVIL, 4], ["b", 1024]], title=f"pid 1 ({EVIL})", right=("KiB",)))
    assert out.count("[/][bold red]x\\x1b[2J") == 2 and "\x1b" not in out      # title and cell, literally
    rows = [line for line in out.splitlines() if "│" in line and "name" not in line]
    assert rows[0].rstrip().endswith("4 │") and rows[1].rstrip().endswith("1024 │")   # right-aligned


def test_live_idle_table_shows_hostile_names() -> None:
    head = {"pid": 7, "comm": EVIL, "backend": "guest-pte", "granularity": "page", "approximate": False}
    rec = {"index": 0, "elapsed_ms": 1000.0, "wss_bytes": 1 << 20, "idle_bytes": 0, "present_bytes": 1 << 20,
           "swapped_bytes": 0, "untracked_bytes": 0, "idle_age_hist_bytes": {"1": 0, "2": 4096},
           "vmas": [{"label": EVIL, "kind": "file", "mapped_bytes": 1 << 20, "present_bytes": 1 << 20,
                     "accessed_bytes": 1 << 20, "idle_bytes": 0, "swapped_bytes": 0}],
           "warnings": [EVIL]}
    out = _render(_table(head, rec))
    assert out.count("[/][bold red]x\\x1b[2J") == 3 and "\x1b" not in out      # title, VMA row, warning
    assert ">=2" in out and "0.0" in out and "1.0" in out


def test_text_table_aligns_escapes_and_leaves_the_last_column_unpadded() -> None:
    from vmsight.cli.common import text_table

    out = text_table(("PID", "S", "COMMAND"), [(1, "S", "/sbin/init"), (12345, "R", "evil\x1b[2J [b]x[/b]")],
                     right=("PID",))
    lines = out.split("\n")
    assert lines[0] == "  PID S COMMAND"
    assert lines[1] == "    1 S /sbin/init"
    assert lines[2].startswith("12345 R evil") and "\x1b" not in out and "[b]x[/b]" in lines[2]
    assert all(not ln.endswith(" ") for ln in lines)
    # A wide cell widens its column for every row; a right-aligned last column is padded like the others.
    assert text_table(("A", "N"), [("x", 1), ("yyyy", 100)], right=("N",)).split("\n") == ["A      N", "x      1",
                                                                                         "yyyy 100"]
