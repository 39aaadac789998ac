"""Bad input that needs no guest: one line naming the fix, never a traceback; guest strings escaped for
terminals and lossless in JSON."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsight.cli.common import escape, json_safe, positive_duration, positive_int0
from vmsight.cli.uname import hostname_arg
from vmsight.errors import TargetError
from vmsight.qemu.qmp import tcp_address
from vmsight.vm import attach

SRC = str(Path(__file__).resolve().parents[2] / "src")
EVIL = b"\x1b[2J\x1b]0;t\x07\xffz\\ \xc2\x9b\xe2\x80\xae\x7f\n"


def test_escape_leaves_no_control_bytes() -> None:
    text = EVIL.decode("utf-8", "surrogateescape")
    out = escape(text)
    assert out == "\\x1b[2J\\x1b]0;t\\x07\\xffz\\\\ \\u009b\\u202e\\x7f\\n"
    raw = out.encode("utf-8")  # encodable: no surrogates left
    assert all(0x20 <= b < 0x7F for b in raw)
    assert escape("/usr/bin/python3 -c 'x'") == "/usr/bin/python3 -c 'x'"


def test_json_safe_round_trips_the_bytes() -> None:
    text = EVIL.decode("utf-8", "surrogateescape")
    rec = json.loads(json.dumps(json_safe({"comm": text, "argv": ["a", text], "pid": 1, "ok": "plain"})))
    assert bytes.fromhex(rec["comm_hex"]) == EVIL and "\ufffd" in rec["comm"]
    assert [bytes.fromhex(h) for h in rec["argv_hex"]] == [b"a", EVIL]
    assert rec["pid"] == 1 and rec["ok"] == "plain" and "ok_hex" not in rec and "pid_hex" not in rec


@pytest.mark.parametrize("text", ["tcp:127.0.0.1", "tcp:h:0", "tcp:h:70000", "tcp:h:x", "tcp:", "tcp:[::1]"])
def test_tcp_without_a_port(text: str) -> None:
    with pytest.raises(TargetError, match="expected tcp:HOST:PORT"):
        tcp_address(text)
    assert tcp_address("tcp::4444") == ("127.0.0.1", 4444) and tcp_address("tcp:[::1]:5") == ("::1", 5)


@pytest.mark.parametrize("typ,text", [(positive_int0, "-3"), (positive_int0, "0"), (positive_duration, "0"),
                                      (positive_duration, "-1"), (positive_duration, "inf"), (positive_duration, "nan")])
def test_sizes_counts_durations_are_positive(typ: object, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        typ(text)  # type: ignore[operator]


@pytest.mark.parametrize("raw", [b"h\xff", b"a\x1bb", b"x" * 65, "é".encode() * 33, b""])
def test_hostname_refused(raw: bytes) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        hostname_arg(os.fsdecode(raw))
    assert hostname_arg("x" * 64) == "x" * 64


@pytest.mark.parametrize("content", [b"", b'{"qmp": ', b"[1, 2]", b'{"qmp": 5}', b"\xff\xfe", b" " * (2 << 20)])
def test_corrupt_vm_json(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "vm.json").write_bytes(content)
    with pytest.raises(TargetError, match="vm.json"):
        attach(str(tmp_path))


def _vmsight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsight.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})


@pytest.mark.parametrize("argv", [["--vm", "tcp:127.0.0.1", "ps"], ["read-virt", "0x1000", "--", "-3"],
                                  ["read-phys", "0x1000", "-5"], ["trace", "exec", "--count", "-1"],
                                  ["uname", "--set-hostname", os.fsdecode(b"h\xff")]])
def test_cli_one_line(argv: list[str]) -> None:
    r = _vmsight(*argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr.splitlines()[-1], r.stderr
