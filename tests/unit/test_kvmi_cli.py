"""`vmsight kvmi` bad input without a guest: one line naming the fix, exit 2, no traceback, and the address
and secret are checked before any VM is touched (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsight.cli.kvmi import read_secret
from vmsight.errors import VmsightError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _vmsight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsight.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})


@pytest.mark.parametrize("address,message", [("vsock:3", "expected vsock:CID:PORT"), ("vsock:x:1", "CID"),
                                             ("unix:", "expected unix:PATH"), ("/" + "a" * 200, "at most 107")])
def test_bad_address_is_one_line(tmp_path: Path, address: str, message: str) -> None:
    # --vm names nothing that exists: the address must be refused first
    r = _vmsight("--vm", str(tmp_path / "absent"), "kvmi", address)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr


def test_secret_files(tmp_path: Path) -> None:
    good = tmp_path / "s"
    good.write_bytes(b"k\n")
    good.chmod(0o600)
    assert read_secret(str(good)) == b"k\n"
    open_to_all = tmp_path / "o"
    open_to_all.write_bytes(b"k")
    open_to_all.chmod(0o644)
    link = tmp_path / "l"
    link.symlink_to(good)
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    huge = tmp_path / "h"
    huge.write_bytes(b"x" * (64 << 10 | 1))
    huge.chmod(0o600)
    for path, message in ((open_to_all, "chmod 600"), (link, "cannot open"), (empty, "1 byte to 64 KiB"),
                          (huge, "1 byte to 64 KiB"), (tmp_path, "not a regular file"),
                          (tmp_path / "absent", "cannot open")):
        with pytest.raises(VmsightError, match=message):
            read_secret(str(path))
    r = _vmsight("--vm", str(tmp_path / "absent"), "kvmi", "unix:/tmp/x.sock", "--secret", str(open_to_all))
    assert r.returncode == 2 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
