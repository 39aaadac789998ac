"""The launcher and `vmsight vm` commands: QEMU never outlives its owner unless detached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import need
from vmsight.qemu.kernels import cached_kernel
from vmsight.qemu.launch import reap_stale_ram_files

pytestmark = pytest.mark.guest
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False


def test_qemu_dies_with_a_killed_parent(tmp_path: Path) -> None:
    need(cached_kernel("debian-6.1") is not None, "debian-6.1 kernel not cached")
    code = ("import sys, time; from vmsight.qemu.launch import LaunchConfig, launch; "
            f"vm = launch(LaunchConfig(kernel='debian-6.1'), {str(tmp_path)!r}); "
            "print(vm.pid, vm.ram_file, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    assert parent.stdout is not None
    qemu_pid, ram_file = parent.stdout.readline().split()
    assert _alive(int(qemu_pid))
    parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only PR_SET_PDEATHSIG can save us
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(int(qemu_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(qemu_pid)), "QEMU outlived its killed parent"
    # The parent could not remove its RAM file; the next launch reaps files nobody maps any more.
    os.utime(ram_file, (time.time() - 60, time.time() - 60))
    assert ram_file in reap_stale_ram_files()
    assert not Path(ram_file).exists()


def test_cli_launch_exec_stop(tmp_path: Path) -> None:
    need(cached_kernel("debian-6.12") is not None, "debian-6.12 kernel not cached")
    env = {**os.environ, "PYTHONPATH": SRC}
    vmsight = [sys.executable, "-m", "vmsight.cli.main"]
    d = tmp_path / "vm"
    r = subprocess.run(vmsight + ["vm", "launch", "--kernel", "debian-6.12", "--smp", "2", "--dir", str(d),
                                  "--detach"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    info = json.loads((d / "vm.json").read_text())
    try:
        assert info["format_version"] == 1 and _alive(info["pid"])
        assert {"qmp", "gdb", "ram_file", "agent_socket", "kernel", "accel"} <= info.keys()
        r = subprocess.run(vmsight + ["vm", "exec", "--dir", str(d), "--", "sh", "-c", "grep -c processor /proc/cpuinfo; exit 3"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode, r.stdout.strip()) == (3, "2")
        r = subprocess.run(vmsight + ["--vm", str(d), "vm", "launch", "--dir", str(d), "--detach"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "already holds a running VM" in r.stderr
    finally:
        r = subprocess.run(vmsight + ["vm", "stop", "--dir", str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    time.sleep(0.2)
    assert not _alive(info["pid"]) and not Path(info["ram_file"]).exists()
