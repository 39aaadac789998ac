"""`vmsight idle` is a group (issue 11): live, record, report, bitmap, each with its own --help listing only its
own options; `vmsight idle PID` is still `idle live PID`; bad input is one line naming the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsight.cli.main import build_parser, parse_args

SRC = str(Path(__file__).resolve().parents[2] / "src")
OWN = {
    "live": {"--interval", "--duration", "--backend", "--range"},
    "record": {"-o", "--interval", "--duration", "--backend", "--range"},
    "report": {"--wss", "--heatmap", "--rows"},
    "bitmap": {"--start", "--end", "--mark", "--wait", "--raw", "--backend"},
}
ALL = set().union(*OWN.values())


def _help(*argv: str) -> None:
    with pytest.raises(SystemExit) as ei:
        build_parser(list(argv)).parse_args(list(argv))
    assert ei.value.code == 0


@pytest.mark.parametrize("cmd", sorted(OWN))
def test_each_command_lists_only_its_own_options(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    _help("idle", cmd, "--help")
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vmsight idle {cmd} ")
    words = set(out.replace(",", " ").replace("[", " ").replace("]", " ").split())
    assert OWN[cmd] <= words, OWN[cmd] - words
    assert not (ALL - OWN[cmd]) & words, (ALL - OWN[cmd]) & words
    assert {"--vm", "--gdb", "--json", "-v"} <= words       # the global options work after the command too


def test_group_help_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    _help("idle", "--help")
    out = capsys.readouterr().out
    assert all(f"\n    {c} " in out for c in OWN) and "vmsight idle PID" in out
    assert "--heatmap" not in out.split("options:")[1] and "--interval" not in out.split("options:")[1]


@pytest.mark.parametrize("argv,cmd,pid", [
    (["idle", "123"], "live", 123),
    (["idle", "0x10", "--interval", "2s", "--range", "[heap]"], "live", 16),
    (["--json", "idle", "--interval", "2s", "7"], "live", 7),          # options before the pid, as before
    (["idle", "--vm", "record", "8"], "live", 8),                       # --vm's value is not a command
    (["idle", "live", "9"], "live", 9),
    (["idle", "record", "5", "-o", "f"], "record", 5),
    (["-v", "idle", "bitmap", "5", "--start", "0", "--end", "0x1000", "--wait", "200ms"], "bitmap", 5),
])
def test_idle_pid_is_still_live(argv: list[str], cmd: str, pid: int) -> None:
    a = parse_args(argv)
    assert (a.idle_command, a.pid) == (cmd, pid) and a.command_name == "idle"
    if cmd == "live" and "--interval" in argv:
        assert a.interval_s == 2.0
    if cmd == "bitmap":
        assert (a.start, a.end, a.wait_s, a.verbose) == (0, 0x1000, 0.2, 1)
    assert parse_args(["idle", "report", "r.jsonl", "--rows", "4"]).file == "r.jsonl"


@pytest.mark.parametrize("argv,needle", [
    (["idle", "x"], "idle live: argument PID: not a pid: 'x'"),
    (["idle", "record", "5"], "idle record: the following arguments are required: -o/--output"),
    (["idle", "bitmap", "5", "--start", "0"], "idle bitmap: the following arguments are required: --end"),
    (["idle", "report"], "idle report: the following arguments are required: FILE"),
    (["idle", "5", "--heatmap", "-"], "idle live: unrecognized arguments: --heatmap - (--heatmap is an option of "
                                      "idle report)"),
    (["idle", "report", "f", "--interval=2s"], "(--interval is an option of idle live and idle record)"),
    (["idle", "live", "5", "--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
    (["idle", "bitmap", "5", "--start", "0x2000", "--end", "0x1000"], "0 <= start < end"),
])
def test_bad_input_is_one_line(argv: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", *argv], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmsight: error: idle ") and needle in r.stderr, r.stderr
