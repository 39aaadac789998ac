"""`vmsight vm launch --dir` and `vm exec` on bad input (issue 9 item 9): one line naming the fix, nothing
changed. The non-root case runs the CLI as nobody (setpriv)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsight.qemu.launch import VmInstance

SRC = str(Path(__file__).resolve().parents[2] / "src")


def vmsight(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "vmsight.cli.main", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": SRC})


def one_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("vmsight: error:"), r.stderr
    assert all(n in lines[0] for n in needles), r.stderr


@pytest.mark.parametrize("d,needle", [("/etc/passwd", "exists and is not a directory"),
                                      ("/etc/passwd/vm", "/etc/passwd is not a directory")])
def test_launch_dir_that_is_a_file(d: str, needle: str) -> None:
    before = Path("/etc/passwd").stat()
    one_line(vmsight("vm", "launch", "--dir", d, "--kernel", "/nonexistent"), needle)
    after = Path("/etc/passwd").stat()
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)


@pytest.fixture
def public_vm_dir() -> Iterator[Path]:
    """A vm.json nobody may read, whose agent socket only root may connect to (a root-launched VM)."""
    d = Path(tempfile.mkdtemp(prefix="vmsight-nonroot-"))
    d.chmod(0o755)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(d / "agent.sock"))
    srv.listen(1)
    (d / "agent.sock").chmod(0o600)
    # stands in for its QEMU: a live process whose command line names the VM's QMP socket
    qemu = subprocess.Popen(["sh", "-c", "sleep 300", f"unix:{d / 'qmp.sock'},server=on"])
    vm = VmInstance(dir=str(d), pid=qemu.pid, qmp=str(d / "qmp.sock"), gdb=None, agent_socket=str(d / "agent.sock"),
                    ram_file=None, ram_size=1 << 28, console_log=str(d / "console.log"), kernel="k", accel="tcg",
                    config={})
    (d / "vm.json").write_text(json.dumps(vm.to_json()))
    (d / "vm.json").chmod(0o644)
    yield d
    qemu.kill()
    qemu.wait()
    srv.close()
    shutil.rmtree(d)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_vm_exec_as_an_unprivileged_user(public_vm_dir: Path) -> None:
    r = vmsight("vm", "exec", "--dir", str(public_vm_dir), "--", "true", prefix=NOBODY)
    one_line(r, "permission denied on the guest agent socket", "run as root or as the user that launched the VM")
    (public_vm_dir / "vm.json").chmod(0o600)
    r = vmsight("vm", "exec", "--dir", str(public_vm_dir), "--", "true", prefix=NOBODY)
    one_line(r, "cannot read", "run as root or as the user that launched the VM")
