"""Issue 9 item 10 without a guest: a QEMU that exits during launch is reported in its own words (qemu.log),
nothing is left behind, and a VM whose QEMU is gone is reported as stopped (fake QEMUs: small scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsight.errors import TargetError
from vmsight.qemu import launch as L
from vmsight.qemu.launch import LaunchConfig, log_tail, runtime_dir_vm, stopped_message

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Exits at once with QEMU's message, as qemu-system-x86_64 -kernel /etc/passwd does.
EXITS = r"""#!/bin/sh
echo "qemu: linux kernel too old to load a ram disk" >&2
exit 1
"""
# Serves the agent socket, then closes the connection and exits: the launcher saw "connection reset".
RESETS = r"""#!/usr/bin/env python3
import socket, sys, time
path = next(a.split("path=")[1].split(",")[0] for a in sys.argv if a.startswith("socket,id=agent,"))
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)
c, _ = s.accept(); c.recv(100)
print("qemu-system-x86_64: -device foo: Device 'foo' not found\n\n", file=sys.stderr, flush=True)
c.close(); sys.exit(1)
"""


def _fake(tmp_path: Path, script: str) -> str:
    p = tmp_path / "fake-qemu"
    p.write_text(script)
    p.chmod(0o755)
    return str(p)


def _no_leftovers(d: Path) -> None:
    assert not d.exists(), sorted(os.listdir(d))
    for rt in Path("/dev/shm").glob("vmsight-*"):
        assert runtime_dir_vm(str(rt)) != str(d), f"runtime dir {rt} of the failed launch is left"
    r = subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True)
    assert r.stdout == "", f"a process of the failed launch runs: {r.stdout}"


@pytest.mark.parametrize("script,said", [(EXITS, "qemu: linux kernel too old to load a ram disk"),
                                         (RESETS, "qemu-system-x86_64: -device foo: Device 'foo' not found")])
def test_qemu_exit_during_launch_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str,
                                          said: str) -> None:
    monkeypatch.setattr(L, "QEMU", _fake(tmp_path, script))
    (tmp_path / "kernel").write_bytes(b"x")
    d = tmp_path / "vm"
    cfg = LaunchConfig(kernel=str(tmp_path / "kernel"), initrd=str(tmp_path / "kernel"), accel="tcg",
                       boot_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(TargetError) as ei:
        L.launch(cfg, d)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert msg.startswith("QEMU exited with status 1 during start-up: ") and msg.endswith(said), msg
    assert "\n" not in msg and "connection" not in msg
    _no_leftovers(d)


def test_failed_launch_keeps_a_directory_it_did_not_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "QEMU", _fake(tmp_path, EXITS))
    d = tmp_path / "vm"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(TargetError, match="too old"):
        L.launch(LaunchConfig(kernel="/etc/passwd", initrd="/etc/passwd", accel="tcg"), d)
    assert sorted(os.listdir(d)) == ["notes.txt"]


def test_cli_launch_failure_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / "vm"
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "vm", "launch", "--kernel", "/etc/passwd",
                        "--initrd", "/etc/passwd", "--accel", "tcg", "--dir", str(d), "--detach"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": SRC, "VMSIGHT_QEMU": _fake(tmp_path, EXITS)})
    assert r.returncode != 0
    assert r.stderr.splitlines() == ["vmsight: error: QEMU exited with status 1 during start-up: "
                                     "qemu: linux kernel too old to load a ram disk"], r.stderr
    _no_leftovers(d)


def test_log_tail(tmp_path: Path) -> None:
    p = tmp_path / "log"
    assert log_tail(p) == ""
    p.write_bytes(b"a\n\n  b  \nc\r\n\n\xff\x1b[2J\n\n")
    assert log_tail(p) == "b | c | \ufffd\x1b[2J"  # the CLI escapes the ESC
    p.write_bytes(b"x" * 100_000 + b"\nlast\n")
    assert log_tail(p, lines=1) == "last"
    assert len(log_tail(p, lines=2, limit=50)) == 53


def test_stopped_message(tmp_path: Path) -> None:
    qmp = str(tmp_path / "qmp.sock")
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: terminating on signal 15 from pid 1\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    msg = stopped_message(tmp_path, {"pid": dead.pid, "qmp": qmp})
    assert msg == (f"the VM in {tmp_path} is stopped: its QEMU (pid {dead.pid}) has exited "
                   "(qemu-system-x86_64: terminating on signal 15 from pid 1); "
                   f"`vmsight vm launch --dir {tmp_path}` starts a new one")
    # a live process that is not this VM's QEMU (the pid was reused), and a zombie
    assert stopped_message(tmp_path, {"pid": os.getpid(), "qmp": qmp})
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert stopped_message(tmp_path, {"pid": zombie.pid, "qmp": qmp})
    finally:
        zombie.wait()
    # the VM's QEMU: its command line serves the QMP socket
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-qmp",
                              f"unix:{qmp},server=on,wait=off"])
    try:
        deadline = time.monotonic() + 5
        while b"-qmp" not in Path(f"/proc/{alive.pid}/cmdline").read_bytes():  # until it has exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stopped_message(tmp_path, {"pid": alive.pid, "qmp": qmp}) is None
    finally:
        alive.kill()
        alive.wait()
    # nothing to tell from
    for info in ({}, {"pid": "1", "qmp": qmp}, {"pid": True, "qmp": qmp}, {"pid": -1, "qmp": qmp}, {"pid": 1}):
        assert stopped_message(tmp_path, info) is None
