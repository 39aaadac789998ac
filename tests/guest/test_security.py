"""Local attackers against root's vmsight and a running test VM (issue 10 items 1-4), as second unprivileged
users created and removed by the tests (tests/unit/test_security_paths.py): no read of guest RAM, no use of
a planted gdbstub socket or directory, nothing killed or deleted through a forged vm.json."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.unit.test_security_paths import SRC, as_user, local_user
from vmsight.qemu.kernels import cached_kernel
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.runtime import listens_on, runtime_dir
from vmsight.vm import attach

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def attacker() -> Iterator[pwd.struct_passwd]:
    with local_user("vmsight-t-atk") as u:
        yield u


@pytest.fixture(scope="module")
def plain_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    """Root's VM without -gdb (a stub is added at runtime when needed), RAM in a shared file."""
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed (scripts/setup.sh)")
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached (scripts/setup.sh fetches it)")
    with launch(LaunchConfig(kernel="debian-6.1", gdb=False), tmp_path_factory.mktemp("sec")) as inst:
        yield inst


def _attacker_process(user: pwd.struct_passwd, code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                          sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                         env={"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", line + (p.stderr.read() if p.stderr else "")
    return p


def _finish(p: subprocess.Popen[str]) -> str:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out.strip()


# --- item 4: the runtime gdbstub ----------------------------------------------------------------------------

def test_planted_gdbstub_dir_is_not_used(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    """The attacker pre-creates the directory and socket where older vmsight put the runtime stub
    (/tmp/vmsight-<qemu pid>/gdb-runtime.sock). Root's vmsight neither talks to that socket nor puts QEMU's
    stub there; the real stub is in a private directory the attacker cannot enter."""
    planted = Path(f"/tmp/vmsight-{plain_vm.pid}")
    listener = _attacker_process(attacker, f"""
        import os, select, socket, sys
        d = "{planted}"
        os.mkdir(d); os.chmod(d, 0o777)
        s = socket.socket(socket.AF_UNIX); s.bind(d + "/gdb-runtime.sock"); os.chmod(d + "/gdb-runtime.sock", 0o777)
        s.listen(4); s.setblocking(False)
        print("ready", flush=True)
        sys.stdin.read()
        print("CONNECTED" if select.select([s], [], [], 0)[0] else "untouched")""")
    try:
        with attach(plain_vm.qmp) as vm, vm.paused():  # a QMP socket: no VM directory to put the stub in
            assert vm.directory is None
            regs = vm.registers(0)  # needs a stub: added through HMP gdbserver
            hmp = vm.hmp_registers(0)
            assert (regs["cr3"], regs["rip"]) == (hmp["cr3"], hmp["rip"])  # the real stub, not the attacker's
            stub = vm._gdb_address or ""  # noqa: SLF001
            assert listens_on(plain_vm.pid, stub) and not stub.startswith(str(planted))
            assert Path(stub).parent.parent == Path(runtime_dir())
            st = os.lstat(Path(stub).parent)
            assert st.st_uid == 0 and st.st_mode & 0o077 == 0
            probe = as_user(attacker, f"""
                import socket
                try:
                    socket.socket(socket.AF_UNIX).connect("{stub}"); print("REACHED")
                except OSError as e:
                    print("REFUSED", e.errno)""")
            assert probe.stdout.startswith("REFUSED"), probe.stdout + probe.stderr
        assert _finish(listener) == "untouched"
        assert sorted(os.listdir(planted)) == ["gdb-runtime.sock"]  # nothing of QEMU's went in there
        with attach(plain_vm.qmp) as vm:  # a later attach finds the stub QEMU already has, proven QEMU's
            assert vm.registers(0)["cr3"] and vm._gdb_address == stub  # noqa: SLF001
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
        shutil.rmtree(planted, ignore_errors=True)
