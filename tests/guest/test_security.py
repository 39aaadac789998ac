"""Local attackers against root's vmsight and a running test VM (issue 10 items 1-4), as second unprivileged
users created and removed by the tests (tests/unit/test_security_paths.py): no read of guest RAM, no use of
a planted gdbstub socket or directory, nothing killed or deleted through a forged vm.json."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.unit.test_security_paths import SRC, as_user, local_user
from vmsight.errors import TargetError
from vmsight.qemu import launch as launch_mod
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
    d = tempfile.mkdtemp(prefix="vmsight-t-sec-")
    os.chmod(d, 0o755)  # like `vm launch --dir /tmp/vm1`: other users may look in
    try:
        with launch(LaunchConfig(kernel="debian-6.1", gdb=False), d) as inst:
            yield inst
    finally:
        shutil.rmtree(d, ignore_errors=True)


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


# --- item 1: guest RAM ----------------------------------------------------------------------------------------

VMSIGHT = [sys.executable, "-m", "vmsight.cli.main"]


def _runtime_dirs_of(vm_dir: Path) -> list[Path]:
    """The /dev/shm/vmsight-* runtime dirs whose back-reference names ``vm_dir``."""
    out = []
    for p in Path("/dev/shm").glob("vmsight-*"):
        with contextlib.suppress(OSError):
            if (p / "vm-dir").read_text() == str(vm_dir):
                out.append(p)
    return out


def _assert_private_ram(ram_file: str, attacker: pwd.struct_passwd) -> None:
    st, dst = os.lstat(ram_file), os.lstat(os.path.dirname(ram_file))
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700
    r = as_user(attacker, f"""
        import os
        for p in ({ram_file!r}, {os.path.dirname(ram_file)!r}):
            try:
                os.open(p, os.O_RDONLY); print("READ", p)
            except OSError as e:
                print("DENIED", e.errno)""")
    assert r.stdout.split() == ["DENIED", "13", "DENIED", "13"], r.stdout + r.stderr


def test_guest_ram_is_private(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    """Another user cannot read the guest's RAM file (it was 0644 in /dev/shm); root's vmsight still maps
    it, through vm.json and through QMP alone, and reads what the gdbstub reads."""
    assert plain_vm.ram_file and plain_vm.runtime_dir == os.path.dirname(plain_vm.ram_file)
    _assert_private_ram(plain_vm.ram_file, attacker)
    for target in (plain_vm.dir, plain_vm.qmp):
        with attach(target) as vm, vm.paused():
            assert vm.backend == "mapped-ram-file"
            regs = vm.registers(0)
            gva = regs["rip"] & ~63  # 64 bytes within one page
            assert vm.read_gpa(vm.translate(gva, regs["cr3"]).gpa, 64) == vm.gdb.read_memory(gva, 64)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_vm_launch_killed_leaves_no_ram(tmp_path: Path, attacker: pwd.struct_passwd, sig: signal.Signals) -> None:
    """A non-detached `vm launch` ended by a signal stops QEMU and removes the RAM file and its directory."""
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached")
    d = tmp_path / "vm"
    p = subprocess.Popen(VMSIGHT + ["vm", "launch", "--kernel", "debian-6.1", "--dir", str(d)],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert p.stderr is not None
        lines = [p.stderr.readline() for _ in range(2)]
        assert "press Ctrl-C" in lines[-1], "".join(lines) + p.stderr.read()
        info = json.loads((d / "vm.json").read_text())
        assert [str(x) for x in _runtime_dirs_of(d)] == [info["runtime_dir"]]
        _assert_private_ram(info["ram_file"], attacker)
        p.send_signal(sig)
        p.wait(timeout=30)
        assert not _alive(info["pid"]) and not os.path.lexists(info["runtime_dir"])
        assert _runtime_dirs_of(d) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_demo_killed_leaves_no_ram(attacker: pwd.struct_passwd) -> None:
    """`vmsight demo` SIGTERMed while its VM runs: QEMU, the RAM file and the throwaway directory go."""
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached")
    p = subprocess.Popen(VMSIGHT + ["demo", "--kernel", "debian-6.1", "--smp", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert p.stdout is not None
        while "guest up" not in (line := p.stdout.readline()):
            assert line, p.stderr.read() if p.stderr else ""
        qemu = _qemu_child(p.pid)
        ram_file = _mem_path(qemu)
        vm_dir = Path(ram_file).parent.joinpath("vm-dir").read_text()
        _assert_private_ram(ram_file, attacker)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM
        assert not _alive(qemu) and not os.path.lexists(os.path.dirname(ram_file)) and not os.path.exists(vm_dir)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_failed_launch_leaves_no_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU refusing to start, or failing to be started: the runtime directory goes with the exception."""
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached")
    with pytest.raises(TargetError, match="QEMU exited"):
        launch(LaunchConfig(kernel="debian-6.1", extra_args=["-no-such-option"]), tmp_path / "a")
    assert _runtime_dirs_of(tmp_path / "a") == []

    modes = []

    def no_exec(cmd: list[str], **kw: object) -> None:
        # QEMU is handed a RAM file that already exists, 0600 in a 0700 directory (it would make one 0644)
        mem = next(a for a in cmd if a.startswith("memory-backend-file,"))
        path = dict(kv.split("=", 1) for kv in mem.split(",")[1:])["mem-path"]
        modes.append((stat.S_IMODE(os.lstat(path).st_mode), stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode)))
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(launch_mod.subprocess, "Popen", no_exec)
    with pytest.raises(OSError, match="Exec format"):
        launch(LaunchConfig(kernel="debian-6.1"), tmp_path / "b")
    assert modes == [(0o600, 0o700)]
    assert _runtime_dirs_of(tmp_path / "b") == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _qemu_child(parent: int) -> int:
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and "qemu" in Path(stat_file.parent, "comm").read_text():
                return int(stat_file.parent.name)
    raise AssertionError(f"no QEMU child of {parent}")


def _mem_path(qemu: int) -> str:
    for arg in Path(f"/proc/{qemu}/cmdline").read_bytes().decode().split("\0"):
        if arg.startswith("memory-backend-file,"):
            return dict(kv.split("=", 1) for kv in arg.split(",")[1:])["mem-path"]
    raise AssertionError("no memory-backend-file")


# --- item 3: `vm stop` ------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(VMSIGHT + list(args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC})


def test_forged_vm_json_cannot_stop_roots_vm(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    """The attacker's directory holds a copy of root's vm.json (pid, sockets, RAM file, runtime dir): root's
    `vm stop --dir` on it refuses in one line; root's QEMU runs on, its RAM file stays."""
    info = json.loads(Path(plain_vm.dir, "vm.json").read_text())
    r = as_user(attacker, f"""
        import json, os, tempfile
        d = tempfile.mkdtemp(dir="/tmp"); os.chmod(d, 0o755)
        info = json.loads({json.dumps(json.dumps(info))})
        for name, kw in (("copy", {{}}), ("own", {{"dir": d + "/own", "console_log": d + "/own/console.log"}})):
            os.mkdir(d + "/" + name, 0o755)
            with open(d + "/" + name + "/vm.json", "w") as f:
                json.dump({{**info, **kw}}, f)
        print(d)""")
    forged = Path(r.stdout.strip())
    assert r.returncode == 0 and forged.is_dir(), r.stderr
    try:
        for name in ("copy", "own"):
            r = _cli("vm", "stop", "--dir", str(forged / name))
            assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
            assert "which is not this VM's QEMU" in r.stderr and "nothing stopped" in r.stderr
            assert plain_vm.alive() and plain_vm.ram_file and os.path.exists(plain_vm.ram_file)
        assert plain_vm.agent.run("true", timeout=20).rc == 0
    finally:
        shutil.rmtree(forged, ignore_errors=True)


def test_non_root_vm_stop_on_roots_vm_is_one_line(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    r = as_user(attacker, f"""
        import sys
        from vmsight.cli.main import main
        sys.exit(main(["vm", "stop", "--dir", {plain_vm.dir!r}]))""")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "belongs to uid 0" in r.stderr and "as root" in r.stderr
    assert plain_vm.alive() and plain_vm.agent.run("true", timeout=20).rc == 0


def test_vm_stop_of_a_detached_vm_removes_its_runtime_dir(tmp_path: Path, attacker: pwd.struct_passwd) -> None:
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached")
    d = tmp_path / "vm"
    r = _cli("vm", "launch", "--kernel", "debian-6.1", "--dir", str(d), "--detach")
    assert r.returncode == 0, r.stderr
    info = json.loads((d / "vm.json").read_text())
    try:
        _assert_private_ram(info["ram_file"], attacker)
        r = _cli("vm", "stop", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        assert not _alive(info["pid"]) and not os.path.lexists(info["runtime_dir"])
        socks = [info["qmp"], info["gdb"], info["agent_socket"], *info["qmp_aux"]]
        assert not any(os.path.lexists(s) for s in socks)
        r = _cli("vm", "stop", "--dir", str(d))  # again: the QEMU is gone; said so, in one line, exit 0
        assert r.returncode == 0 and r.stderr.count("\n") == 1 and "had already stopped" in r.stderr, r.stderr
    finally:
        if _alive(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)


def test_long_path_vm_keeps_its_sockets_private(tmp_path: Path) -> None:
    """A VM directory too long for sun_path gets its sockets in the VM's private runtime dir (they were in a
    /tmp/vmsight-<tag> made with exist_ok and never removed)."""
    need(cached_kernel("debian-6.1") is not None, "kernel debian-6.1 not cached")
    d = tmp_path / ("x" * 100)
    with launch(LaunchConfig(kernel="debian-6.1"), d) as inst:
        rt = inst.runtime_dir or ""
        assert Path(inst.qmp).parent == Path(rt) and stat.S_IMODE(os.lstat(rt).st_mode) == 0o700
        with attach(inst.dir) as vm:
            assert vm.registers(0)["cr3"]
    assert not os.path.lexists(rt)


def test_forged_ram_file_is_never_mapped(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    """An attacker's VM directory names root's real QMP socket but, as the RAM file, a file of the attacker's
    choosing: root's attach does not map it (QEMU does not), falls back to /proc/PID/mem, and a write through
    vmsight reaches the guest's RAM only."""
    info = json.loads(Path(plain_vm.dir, "vm.json").read_text())
    r = as_user(attacker, """
        import os, tempfile
        d = tempfile.mkdtemp(dir="/tmp"); os.chmod(d, 0o755)
        with open(d + "/decoy", "wb") as f:
            f.write(b"precious" * (1 << 17))
        os.chmod(d + "/decoy", 0o666)
        print(d)""")
    assert r.returncode == 0, r.stderr
    forged = Path(r.stdout.strip())
    decoy = forged / "decoy"
    before = decoy.read_bytes()
    try:
        info.update(ram_file=str(decoy), qmp_aux=[])
        (forged / "vm.json").write_text(json.dumps(info))
        with attach(str(forged)) as vm:
            assert vm.backend != "mapped-ram-file"
            assert vm.read_gpa(0x100000, 8) != b"precious"
        assert decoy.read_bytes() == before
    finally:
        shutil.rmtree(forged, ignore_errors=True)


def test_vm_logs_are_private(plain_vm: VmInstance, attacker: pwd.struct_passwd) -> None:
    """The guest's console (anything a guest process prints) and QEMU's log are 0600, even in a 0755 --dir."""
    for name in ("console.log", "qemu.log"):
        p = Path(plain_vm.dir, name)
        assert p.stat().st_mode & 0o777 == 0o600 and p.stat().st_uid == os.geteuid(), name
        r = as_user(attacker, f"print(len(open({str(p)!r}, 'rb').read()))")
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout
