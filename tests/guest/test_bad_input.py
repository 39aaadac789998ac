"""Bad input gets a clear error naming the fix, a non-zero exit code, and the VM keeps running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from vmsight.errors import GdbStubError
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.qemu.rsp import GdbStub
from vmsight.runtime import listens_on, runtime_dir
from vmsight.vm import attach

pytestmark = pytest.mark.guest
VMSIGHT = [sys.executable, "-m", "vmsight.cli.main"]


def cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = VMSIGHT + list(args)
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})


def test_dead_socket(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a stale socket file: nobody listens
    r = cli("--vm", str(path), "regs")
    assert r.returncode == 2
    assert "connection refused" in r.stderr and "not running" in r.stderr
    r = cli("--vm", str(tmp_path / "missing.sock"), "regs")
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.fixture()
def silent_server(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts and talks nonsense: not QEMU."""
    path = tmp_path / "other.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            c.sendall(b"HELLO I AM NOT QEMU\r\n")
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    srv.close()


def test_non_qemu_socket(silent_server: Path) -> None:
    r = cli("--vm", str(silent_server), "regs")
    assert r.returncode == 2
    assert "QMP" in r.stderr, r.stderr


def test_second_gdb_client(guest: VmInstance) -> None:
    with attach(guest.dir) as vm:
        with vm.stopped_stub():
            assert guest.gdb
            with pytest.raises(GdbStubError, match="another debugger"):
                GdbStub(guest.gdb, timeout=1.0)
    # The refused client's connection stayed queued: QEMU accepts it once we detach, which stops the VM
    # (CHR_EVENT_OPENED), then sees it closed. Wait for that to happen, then resume, so no later test
    # inherits a paused VM.
    with attach(guest.dir) as vm:
        deadline = time.monotonic() + 5
        while vm.status() == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.status() != "running", "expected QEMU to stop the VM for the queued connection"
        vm.resume()
        assert vm.status() == "running"
    assert guest.agent.run("true", timeout=20).rc == 0


def test_non_root(guest: VmInstance) -> None:
    need(os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop privileges")
    r = cli("--vm", guest.dir, "regs", user="65534")
    assert r.returncode == 2
    assert "permission denied" in r.stderr.lower() and "root" in r.stderr
    assert guest.agent.run("true", timeout=20).rc == 0


def test_gpa_outside_ram_and_unmapped_gva(guest: VmInstance) -> None:
    r = cli("--vm", guest.dir, "read-phys", "0xfec00000", "16")
    assert r.returncode == 2 and "not guest RAM" in r.stderr
    r = cli("--vm", guest.dir, "read-virt", "0x1000", "8")
    assert r.returncode == 2 and "cannot translate gva 0x1000" in r.stderr
    r = cli("--vm", guest.dir, "--json", "translate", "0x1000")
    assert r.returncode == 2 and '"fault"' in r.stdout
    with attach(guest.dir) as vm:
        assert vm.status() == "running"


def test_cli_json_and_hex(guest: VmInstance) -> None:
    import json

    r = cli("--vm", guest.dir, "--json", "regs", "--vcpu", "1")
    assert r.returncode == 0, r.stderr
    regs = json.loads(r.stdout)["1"]
    assert regs["cr3"] and regs["rip"] >= 0xFFFF800000000000
    r = cli("--vm", guest.dir, "--json", "translate", hex(regs["rip"]))
    t = json.loads(r.stdout)
    assert [e["level"] for e in t["entries"]][0] == 4 and t["gpa"] > 0
    r = cli("--vm", guest.dir, "--json", "read-phys", hex(t["gpa"] & ~0xF), "0x10")
    assert len(bytes.fromhex(json.loads(r.stdout)["hex"])) == 16


@pytest.fixture(scope="module")
def plain_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    """A guest started without -gdb and read through /proc/<qemu>/mem instead of the RAM file."""
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    with launch(LaunchConfig(kernel="debian-6.1", gdb=False), tmp_path_factory.mktemp("plain")) as inst:
        yield inst


def test_runtime_gdbserver_and_procmem(plain_guest: VmInstance) -> None:
    with attach(plain_guest.dir, backend="proc-pid-mem") as vm:
        assert vm.backend == "proc-pid-mem"
        regs = vm.registers(0)  # needs a stub: added through HMP gdbserver
        stub = vm._gdb_address or ""  # noqa: SLF001 - in a fresh private directory (issue 10 item 4)
        assert Path(stub).parent.parent == Path(runtime_dir()) and listens_on(vm.pid or 0, stub)
        with vm.paused():
            t = vm.translate(regs["rip"], regs["cr3"])
            assert vm.read_gpa(t.gpa, 16) == vm.read_gva(regs["rip"], 16, regs["cr3"])
    with attach(plain_guest.dir) as vm:
        assert vm.status() == "running"
        assert vm.registers(0)["cr3"]  # reconnects to the runtime stub


@pytest.mark.parametrize("ram_backend,expected", [("memfd", "mapped-ram-file"), ("anonymous", "proc-pid-mem")])
def test_backend_choice_follows_qemu_options(tmp_path: Path, ram_backend: str, expected: str) -> None:
    """With a shared memfd vmsight maps it through /proc/<qemu>/fd; with QEMU's default anonymous RAM it
    falls back to /proc/<qemu>/mem. Both read the same bytes as the gdbstub."""
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    from vmsight.memory.gdbphys import GdbPhysRam

    with launch(LaunchConfig(kernel="debian-6.1", ram_backend=ram_backend), tmp_path) as inst:
        with attach(inst.dir) as vm, vm.paused():
            assert vm.backend == expected
            regs = vm.registers(0)
            t = vm.translate(regs["rip"], regs["cr3"])
            assert vm.read_gpa(t.gpa, 64) == GdbPhysRam(vm.stopped_stub, vm.layout).read_gpa(t.gpa, 64)
            assert any(vm.read_gpa(t.gpa & ~0xFFF, 4096))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_remote_attach_over_tcp(tmp_path: Path) -> None:
    """QEMU "on another machine": QMP and gdbstub over TCP (loopback here), RAM read through the stub."""
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    qport, gport = _free_port(), _free_port()
    extra = ["-qmp", f"tcp:127.0.0.1:{qport},server=on,wait=off", "-gdb", f"tcp:127.0.0.1:{gport}"]
    with launch(LaunchConfig(kernel="debian-6.1", smp=2, gdb=False, extra_args=extra), tmp_path) as inst:
        with attach(f"tcp:127.0.0.1:{qport}", gdb=f"tcp:127.0.0.1:{gport}") as vm, vm.paused():
            assert vm.pid is None and vm.backend == "gdbstub-physical"
            regs = vm.registers(1)
            t = vm.translate(regs["rip"], regs["cr3"])
            with open(inst.ram_file or "", "rb") as f:  # the local truth the remote client cannot see
                f.seek(t.gpa)
                assert vm.read_gpa(t.gpa, 256) == f.read(256)
        r = cli("--vm", f"tcp:127.0.0.1:{qport}", "--gdb", f"tcp:127.0.0.1:{gport}", "--json", "regs", "--vcpu", "0")
        assert r.returncode == 0, r.stderr
        r = cli("--vm", f"tcp:127.0.0.1:{qport}", "regs")
        assert r.returncode == 2 and "--gdb tcp:HOST:PORT" in r.stderr
        assert inst.agent.run("true").rc == 0


def test_busy_qmp_socket_is_one_line(guest: VmInstance) -> None:
    """A second QMP client waits for a greeting that never comes: vmsight's line only, not qemu.qmp's
    `ERROR ... Failed to receive Greeting: CancelledError` lines before it. Given the VM's directory, vmsight
    moves on to a spare monitor; only when every monitor is held (here by clients that are not vmsight) does
    it give up, in one line too."""
    holders = []
    try:
        for path in [guest.qmp, *guest.qmp_aux]:
            holders.append(socket.socket(socket.AF_UNIX))
            holders[-1].connect(path)
            assert b"QMP" in holders[-1].recv(4096)  # the greeting: this client holds the monitor
            r = cli("--vm", guest.qmp, "ps")
            assert r.returncode == 2
            assert r.stderr.count("\n") == 1 and "another QMP client is connected" in r.stderr, r.stderr
            r = cli("--vm", guest.dir, "ps")
            if len(holders) <= len(guest.qmp_aux):
                assert r.returncode == 0, r.stderr      # a spare monitor was free
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "none of the 3 QMP monitors" in r.stderr, r.stderr
        assert "another QMP client" in r.stderr, r.stderr
    finally:
        for h in holders:
            h.close()


def test_breakpoints_and_watches_that_cannot_fire(guest: VmInstance) -> None:
    r = cli("--vm", guest.dir, "trace", "bp", "jiffies", "--count", "1")
    assert r.returncode == 2 and "jiffies is a data symbol" in r.stderr and "not code" in r.stderr, r.stderr
    r = cli("--vm", guest.dir, "trace", "bp", "0x0", "--count", "1")
    assert r.returncode == 2 and "mmap_min_addr" in r.stderr, r.stderr
    r = cli("--vm", guest.dir, "watch", "0x800000000000", "8")
    assert r.returncode == 2 and "not canonical" in r.stderr, r.stderr
    with attach(guest.dir) as vm:
        assert vm.status() == "running"


def test_guest_strings_escaped_and_lossless(guest: VmInstance) -> None:
    """A guest process whose comm and cmdline hold terminal escapes and a byte that is not UTF-8."""
    import json

    name = b"\x1b[2J\x1b]0;t\x07\xffz"  # 12 bytes: fits comm (15)
    octal = "".join(f"\\{b:03o}" for b in name)
    pid = int(guest.agent.run(
        f"n=\"/tmp/$(printf '{octal}')\"; printf '#!/bin/sh\\nsleep 600\\n' > \"$n\"; chmod +x \"$n\"; "
        f"\"$n\" \"$(printf 'arg\\033[31m\\377')\" >/dev/null 2>&1 & echo $!", timeout=30).check().text.split()[0])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = cli("--vm", guest.dir, "--json", "ps")
            assert r.returncode == 0, r.stderr
            procs = {p["pid"]: p for p in json.loads(r.stdout)}
            if pid in procs and procs[pid].get("comm_hex"):
                break
            time.sleep(0.2)  # the shell has not exec'd the script yet
        p = procs[pid]
        assert bytes.fromhex(p["comm_hex"]) == name
        assert bytes.fromhex(p["cmdline_hex"]).endswith(b"/tmp/" + name + b" arg\x1b[31m\xff")
        assert "\\ud" not in r.stdout  # strict JSON: no lone surrogates
        human = subprocess.run(VMSIGHT + ["--vm", guest.dir, "ps"], capture_output=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
        assert human.returncode == 0
        out = human.stdout
        assert not any(b < 0x20 and b != 0x0A or b == 0x7F for b in out)
        text = out.decode("utf-8")  # valid UTF-8, so no raw 0xff
        assert not any(0x80 <= ord(c) <= 0x9F for c in text)
        assert "/tmp/\\x1b[2J\\x1b]0;t\\x07\\xffz arg\\x1b[31m\\xff" in text
    finally:
        guest.agent.run(f"kill {pid}", timeout=20)


def test_trace_exec_strings_escaped_and_lossless(guest: VmInstance) -> None:
    """An exec whose file name holds terminal escapes and a byte that is not UTF-8, traced from outside: JSON
    keeps the exact bytes (filename_hex), the human line escapes them."""
    import json

    name = b"\x1b]0;x\x07\xfeq"
    octal = "".join(f"\\{b:03o}" for b in name)
    guest.agent.run(f"n=\"/tmp/$(printf '{octal}')\"; printf '#!/bin/sh\\ntrue\\n' > \"$n\"; chmod +x \"$n\"",
                    timeout=30).check()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for mode in ("json", "human"):
        p = subprocess.Popen(VMSIGHT + ["--vm", guest.dir, *(["--json"] if mode == "json" else []), "trace", "exec",
                                        "--duration", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert p.stderr is not None
            assert b"tracing" in p.stderr.readline()
            guest.agent.run(f"\"/tmp/$(printf '{octal}')\"; echo done", timeout=30).check()
            time.sleep(1.0)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        assert p.returncode in (0, 130), err
        if mode == "json":
            evs = [json.loads(line) for line in out.splitlines()]
            hits = [e for e in evs if e.get("filename_hex") and bytes.fromhex(e["filename_hex"]) == b"/tmp/" + name]
            assert hits, out[-2000:]
            assert "\\ud" not in out.decode()
        else:
            assert not any(b < 0x20 and b != 0x0A or b == 0x7F for b in out)
            assert "/tmp/\\x1b]0;x\\x07\\xfeq" in out.decode("utf-8"), out[-2000:]
