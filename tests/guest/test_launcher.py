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
from vmsight.qemu.launch import reap_stale_ram_files, runtime_dir_vm

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


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("vmsight: error: "), r.stderr
    assert needle in r.stderr, r.stderr


def test_qemu_exit_during_launch_shows_qemus_error(tmp_path: Path) -> None:
    """Issue 9 item 10: QEMU's own reason (qemu.log), not 'agent connection reset'; nothing left behind."""
    env = {**os.environ, "PYTHONPATH": SRC}
    d = tmp_path / "vm"
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "vm", "launch", "--kernel", "/etc/passwd",
                        "--dir", str(d), "--detach"], capture_output=True, text=True, env=env, timeout=120)
    _one_line_error(r, "linux kernel too old to load a ram disk")
    assert "connection" not in r.stderr
    assert not d.exists()
    for rt in Path("/dev/shm").glob("vmsight-*"):
        assert runtime_dir_vm(str(rt)) != str(d)
    assert subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True).stdout == ""


def test_stopped_vm_is_reported_as_stopped(tmp_path: Path) -> None:
    need(cached_kernel("debian-6.1") is not None, "debian-6.1 kernel not cached")
    env = {**os.environ, "PYTHONPATH": SRC}
    vmsight = [sys.executable, "-m", "vmsight.cli.main"]
    d = tmp_path / "vm"
    r = subprocess.run(vmsight + ["vm", "launch", "--kernel", "debian-6.1", "--dir", str(d), "--detach"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    pid = json.loads((d / "vm.json").read_text())["pid"]
    try:
        os.kill(pid, signal.SIGKILL)  # QEMU dies behind vmsight's back (the OOM killer, a crash, a kill)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        for argv in (["--vm", str(d), "ps"], ["regs", "--vm", str(d)], ["--vm", str(d), "read-phys", "0x1000", "8"],
                     ["vm", "exec", "--dir", str(d), "--", "true"], ["--vm", str(d), "vm", "resume"]):
            r = subprocess.run(vmsight + argv, capture_output=True, text=True, env=env, timeout=60)
            _one_line_error(r, f"the VM in {d} is stopped: its QEMU (pid {pid}) has exited")
    finally:
        r = subprocess.run(vmsight + ["vm", "stop", "--dir", str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
