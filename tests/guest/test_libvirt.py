"""libvirt domains (issue 13), against a real libvirtd: ``--vm libvirt:DOMAIN`` reads a TCG domain without its
monitor, its ps, maps, lsmod and uname equal the guest's own view (the guest agent on the domain's second
serial port), and libvirt does not mark the domain tainted.

The libvirtd is private to this module: it runs in its own mount and pid namespace (``unshare``), where its
configuration, run, state, log and cache directories are bind mounts of a private temporary directory, so it
never sees or touches a system libvirtd, and everything it starts (virtlogd, every QEMU) dies with the
namespace at teardown, or with pytest itself (PR_SET_PDEATHSIG on unshare, whose --kill-child takes the
namespace down). Its qemu.conf: no cgroups, no security driver, QEMU as root (libvirt records that as the
"high-privileges" taint at start: the tests check that vmsight adds none)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.guest.workload import norm_maps
from vmsight.libvirt import SHARED_RAM_XML, find_qemu_pid
from vmsight.qemu.agent import GuestAgent
from vmsight.qemu.initramfs import build_initramfs
from vmsight.qemu.kernels import cached_kernel, kernel_path

pytestmark = pytest.mark.guest

SETUP = "scripts/setup.sh --test"
DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
        "cache": "/var/cache/libvirt"}
QEMU_CONF = 'cgroup_controllers = [ ]\nsecurity_driver = "none"\nuser = "root"\ngroup = "root"\n' \
            'dynamic_ownership = 0\nremember_owner = 0\n'
LIBVIRTD_CONF = 'unix_sock_group = "root"\nunix_sock_ro_perms = "0700"\nunix_sock_rw_perms = "0700"\n' \
                'auth_unix_ro = "none"\nauth_unix_rw = "none"\n'
CPU = "".join(f"<feature policy='require' name='{f}'/>" for f in ("ssse3", "sse4.1", "sse4.2", "popcnt", "cx16"))


@dataclass
class Libvirtd:
    dir: Path
    uri: str
    proc: subprocess.Popen[bytes]
    log: Path

    def conn(self) -> Any:
        import libvirt
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        return libvirt.open(self.uri)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _script(d: Path) -> str:
    lines = ["set -e"]
    for sub, target in DIRS.items():
        # the mount points (empty directories, as libvirt's own packages create them)
        lines += [f"mkdir -p {target}", f"mount --bind {d / sub} {target}"]
    for name in ("passwd", "group"):
        if (d / name).exists():
            lines.append(f"mount --bind {d / name} /etc/{name}")
    # pid 1 of the namespace must reap orphans (libvirt double-forks QEMU): libvirtd itself does not
    lines.append(f"exec {sys.executable} -c '{_INIT}'")
    return "\n".join(lines)


# The namespace's init: starts virtlogd and libvirtd, reaps every child, ends (taking the namespace down) when
# libvirtd does.
_INIT = ("import os, subprocess\n"
         "subprocess.Popen([\"virtlogd\"])\n"
         "main = subprocess.Popen([\"libvirtd\"]).pid\n"
         "while os.wait()[0] != main: pass\n")


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    need(shutil.which("libvirtd") is not None and shutil.which("virtlogd") is not None,
         f"libvirt-daemon is not installed ({SETUP})")
    need(importlib.util.find_spec("libvirt") is not None, f"the libvirt Python binding is not installed ({SETUP})")
    need(os.geteuid() == 0 and shutil.which("unshare") is not None,
         "a private libvirtd needs root and unshare (its own mount and pid namespace)")
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed (scripts/setup.sh)")
    d = tmp_path_factory.mktemp("libvirt")
    d.chmod(0o700)
    for sub in DIRS:
        (d / sub).mkdir(mode=0o700)
    (d / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (d / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
    try:  # libvirtd refuses to start without its compiled-in QEMU user, even with user = "root"
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        (d / "passwd").write_text(Path("/etc/passwd").read_text()
                                  + "libvirt-qemu:x:64055:64055:libvirt test:/var/lib/libvirt:/usr/sbin/nologin\n")
        (d / "group").write_text(Path("/etc/group").read_text() + "libvirt-qemu:x:64055:\n")
    log = d / "libvirtd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                                 "--kill-child", "--mount-proc", "--", "sh", "-c", _script(d)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    daemon = Libvirtd(d, f"qemu+unix:///system?socket={d / 'run' / 'libvirt-sock'}", proc, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                daemon.conn().close()
                break
            except Exception:  # noqa: BLE001 - libvirtError until the socket listens
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"private libvirtd did not start: {log.read_text()[-800:]}")
                time.sleep(0.1)
        yield daemon
    finally:
        with contextlib.suppress(Exception):
            c = daemon.conn()
            for dom in c.listAllDomains(0):
                with contextlib.suppress(Exception):
                    if dom.isActive():
                        dom.destroy()
            c.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # unshare: --kill-child takes the whole namespace down
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def domain_xml(name: str, d: Path, kernel: str, *, memfd: bool, persistent_only: bool = False) -> str:
    backing = SHARED_RAM_XML if memfd else ""  # what `vmsight vm libvirt-xml` prints: the memfd domain proves it
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  {backing}
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel_path(kernel)}</kernel><initrd>{build_initramfs()}</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>{CPU}
    <topology sockets='2' cores='1' threads='1'/></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    <serial type='file'><source path='{d / (name + '.console')}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{d / (name + '.agent')}'/><target port='1'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass
class Domain:
    name: str
    agent: GuestAgent
    log: Path


def start_domain(libvirtd: Libvirtd, name: str, kernel: str, memfd: bool,
           edit: Callable[[str], str] | None = None) -> Iterator[Domain]:
    """A transient TCG domain booted and its agent ready; ``edit`` may change its XML first."""
    need(cached_kernel(kernel) is not None, f"kernel {kernel} not cached (scripts/setup.sh fetches it)")
    xml = domain_xml(name, libvirtd.dir, kernel, memfd=memfd)
    conn = libvirtd.conn()
    dom = conn.createXML(edit(xml) if edit else xml, 0)  # transient: gone when destroyed
    try:
        agent_path = str(libvirtd.dir / f"{name}.agent")
        deadline = time.monotonic() + 10
        while not os.path.exists(agent_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        agent = GuestAgent(agent_path)
        agent.wait_ready(120)
        yield Domain(name, agent, libvirtd.dir / "log" / "qemu" / f"{name}.log")
        agent.close()
    finally:
        with contextlib.suppress(Exception):
            dom.destroy()
        conn.close()
        del dom, conn  # the binding's __del__ fails at interpreter exit


@pytest.fixture(scope="module", params=[("anon", "debian-6.1", False), ("memfd", "debian-6.12", True)],
                ids=["anonymous-6.1", "memfd-6.12"])
def domain(request: pytest.FixtureRequest, libvirtd: Libvirtd) -> Iterator[Domain]:
    kind, kernel, memfd = request.param
    yield from start_domain(libvirtd, f"vmsight-{kind}", kernel, memfd)


def vmsight(libvirtd: Libvirtd, *args: str, uri: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsight.cli.main", "-c", uri or libvirtd.uri, *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def taints(libvirtd: Libvirtd, name: str) -> list[str]:
    import libvirt
    conn = libvirtd.conn()
    try:
        return sorted(conn.lookupByName(name).messages(libvirt.VIR_DOMAIN_MESSAGE_TAINTING))
    finally:
        conn.close()


def state(libvirtd: Libvirtd, name: str) -> int:
    conn = libvirtd.conn()
    try:
        return int(conn.lookupByName(name).state()[0])
    finally:
        conn.close()


def test_reads_equal_guest_view_without_taint(libvirtd: Libvirtd, domain: Domain) -> None:
    before = taints(libvirtd, domain.name)
    assert not any("custom-monitor" in t for t in before), before
    target = f"libvirt:{domain.name}"
    domain.agent.run("sleep 1001 >/dev/null 2>&1 & echo ok", timeout=10).check()

    # uname, the target given as VMSIGHT_VM
    r = vmsight(libvirtd, "--json", "uname", env={"VMSIGHT_VM": target})
    assert r.returncode == 0, r.stderr
    u = json.loads(r.stdout)
    truth = domain.agent.run("uname -n; uname -r; uname -v").check().text.splitlines()
    assert [u["nodename"], u["release"], u["version"]] == truth

    # ps: every process alive before and after the host-side read is listed with its parent, uid and comm
    snap = "for d in /proc/[0-9]*; do p=${d#/proc/}; echo \"$p|$(cat $d/comm 2>/dev/null)\"; done"
    first = dict(line.split("|", 1) for line in domain.agent.run(snap).check().text.splitlines())
    r = vmsight(libvirtd, "--vm", target, "--json", "ps")
    assert r.returncode == 0, r.stderr
    ps = {p["pid"]: p for p in json.loads(r.stdout)}
    second = dict(line.split("|", 1) for line in domain.agent.run(snap).check().text.splitlines())
    # a kworker's comm carries the workqueue it last ran ("kworker/0:0-events"): compare up to the "-"
    stable = {int(p): c.split("-")[0] if c.startswith("kworker/") else c
              for p, c in first.items() if second.get(p) == c}
    assert len(stable) > 20
    assert set(stable) <= set(ps), sorted(set(stable) - set(ps))
    assert {p: ps[p]["comm"].split("-")[0] if ps[p]["comm"].startswith("kworker/") else ps[p]["comm"]
            for p in stable} == stable
    sleeper = [p for p in ps.values() if p["cmdline"] == "sleep 1001"]
    assert len(sleeper) == 1 and sleeper[0]["uid"] == 0

    # maps 1
    r = vmsight(libvirtd, "--vm", target, "--json", "maps", "1")
    assert r.returncode == 0, r.stderr
    got = [(m["start"], m["end"], m["perms"], m["offset"], m["path"]) for m in json.loads(r.stdout)]
    assert got == norm_maps(domain.agent.run("cat /proc/1/maps").check().text)

    # lsmod: the same modules as the guest's /proc/modules
    r = vmsight(libvirtd, "--vm", target, "--json", "lsmod")
    assert r.returncode == 0, r.stderr
    mods = sorted(m["name"] for m in json.loads(r.stdout))
    assert mods == sorted(line.split()[0] for line in domain.agent.run("cat /proc/modules").check().text.splitlines())

    # sym: the guest's own /proc/kallsyms (the agent runs as root)
    r = vmsight(libvirtd, "--vm", target, "--json", "sym", "init_task", "_text")
    assert r.returncode == 0, r.stderr
    got_syms = {e["name"]: e["address"] for e in json.loads(r.stdout)}
    kallsyms = domain.agent.run("grep -E ' (init_task|_text)$' /proc/kallsyms").check().text.split()
    assert got_syms == {kallsyms[i + 2]: int(kallsyms[i], 16) for i in range(0, len(kallsyms), 3)}

    # nothing left behind: running, no new taint, no custom-monitor in libvirt's domain log
    assert state(libvirtd, domain.name) == 1  # VIR_DOMAIN_RUNNING
    assert taints(libvirtd, domain.name) == before
    assert "custom-monitor" not in domain.log.read_text()
    domain.agent.run("kill %1 2>/dev/null; pkill -f 'sleep 1001'; true")


def test_python_attach_backend(libvirtd: Libvirtd, domain: Domain) -> None:
    from vmsight.linux import kernel_of, uname
    from vmsight.vm import attach

    with attach(f"libvirt:{domain.name}", uri=libvirtd.uri) as vm:
        assert vm.backend == ("mapped-ram-file" if "memfd" in domain.name else "proc-pid-mem")
        assert vm.status() == "running"
        with vm.paused():
            assert state(libvirtd, domain.name) == 3  # VIR_DOMAIN_PAUSED, through libvirt's own API
            release = uname(kernel_of(vm))["release"]
        assert vm.status() == "running"
    assert release == domain.agent.run("uname -r").check().text.strip()
    # a domain the user paused is read as it is and left paused
    conn = libvirtd.conn()
    d = conn.lookupByName(domain.name)
    d.suspend()
    try:
        r = vmsight(libvirtd, "--vm", f"libvirt:{domain.name}", "--json", "uname")
        assert r.returncode == 0 and json.loads(r.stdout)["release"] == release, r.stderr
        assert state(libvirtd, domain.name) == 3
    finally:
        d.resume()
        conn.close()
        del d, conn
    assert "custom-monitor" not in domain.log.read_text()


def test_vms_lists_domain(libvirtd: Libvirtd, domain: Domain) -> None:
    r = vmsight(libvirtd, "--json", "vms")
    assert r.returncode == 0, r.stderr
    row = next(v for v in json.loads(r.stdout) if v["target"] == f"libvirt:{domain.name}")
    assert (row["state"], row["vcpus"], row["memory_bytes"]) == ("running", 2, 256 << 20)
    assert row["ram"].startswith("mapped-ram-file" if "memfd" in domain.name else "proc-pid-mem")


def test_libvirt_xml_prints_the_tested_fragment() -> None:
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "vm", "libvirt-xml"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and SHARED_RAM_XML in r.stdout and "qemu:commandline" not in r.stdout


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsight: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input(libvirtd: Libvirtd, domain: Domain) -> None:
    conn = libvirtd.conn()
    off = conn.defineXML(domain_xml("vmsight-off", libvirtd.dir, "debian-6.1", memfd=False))
    try:
        before = sorted((d.name(), d.state()[0]) for d in conn.listAllDomains(0))
        _one_line_error(vmsight(libvirtd, "--vm", "libvirt:no-such-domain", "ps"), "no libvirt domain", "list --all")
        _one_line_error(vmsight(libvirtd, "--vm", "libvirt:vmsight-off", "ps"), "shut off", "start vmsight-off")
        gone = f"qemu+unix:///system?socket={libvirtd.dir / 'nowhere' / 'libvirt-sock'}"
        _one_line_error(vmsight(libvirtd, "--vm", f"libvirt:{domain.name}", "ps", uri=gone), "libvirtd is not running")
        # run control needs the monitor: refused before anything is sent, naming the XML alternative
        _one_line_error(vmsight(libvirtd, "--vm", f"libvirt:{domain.name}", "regs"), "--allow-taint", "libvirt-xml")
        assert sorted((d.name(), d.state()[0]) for d in conn.listAllDomains(0)) == before
        assert "custom-monitor" not in domain.log.read_text()
    finally:
        off.undefine()
        conn.close()
        del off, conn


def qemu_sockets(pid: int) -> set[str]:
    """Paths of the unix sockets QEMU ``pid`` holds (its fds matched against the namespace's socket table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[6] in inodes:
            out.add(f[7])
    return out


def test_no_permission_as_normal_user(libvirtd: Libvirtd, domain: Domain) -> None:
    """A user who may not use the daemon's sockets (0700 root here, as qemu:///system's rw socket) gets one
    PermissionDenied line naming the fix. In a forked child that drops to nobody: the venv's interpreter and
    its standard library sit under /root, so a fresh `vmsight` process cannot run as nobody here; the child
    uses only what is already imported (the CLI turns the error into its one line, as for every error)."""
    from vmsight.errors import PermissionDenied
    from vmsight.libvirt import connect

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        out = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            connect(libvirtd.uri)
        except PermissionDenied as e:
            out = f"PermissionDenied {e.exit_code} {e}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"{type(e).__name__} {e}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    assert got.startswith("PermissionDenied 2 no permission on ") and "\n" not in got, got
    assert "qemu:///session" in got and "libvirt group" in got, got
    assert state(libvirtd, domain.name) == 1


def test_allow_taint_trace(libvirtd: Libvirtd) -> None:
    """--allow-taint: registers and `trace syscalls` of a known guest command work through libvirt's monitor
    passthrough, stderr says once that libvirt now reports the domain tainted, and after detach no gdbstub
    remains and the guest runs. A domain of its own: the taint lasts as long as the domain."""
    for dom in start_domain(libvirtd, "vmsight-taint", "debian-6.1", memfd=False):
        target = f"libvirt:{dom.name}"
        conn = libvirtd.conn()
        qemu = find_qemu_pid(conn.lookupByName(dom.name).UUIDString().lower(), [])
        conn.close()
        sockets_before = qemu_sockets(qemu)
        r = vmsight(libvirtd, "--allow-taint", "--vm", target, "--json", "regs")
        assert r.returncode == 0, r.stderr
        assert "tainted (custom-monitor)" in r.stderr and r.stderr.count("tainted") == 1, r.stderr
        regs = json.loads(r.stdout)
        assert sorted(regs) == ["0", "1"] and dom.agent.run("nproc").check().text.strip() == "2"
        assert all(v["cr3"] and v["cr0"] >> 31 & 1 and v["efer"] >> 10 & 1 for v in regs.values()), json.dumps(regs)
        assert any("custom monitor" in t or "custom-monitor" in t for t in taints(libvirtd, dom.name)), taints(libvirtd, dom.name)

        env = {"PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "-c", libvirtd.uri, "--allow-taint",
                              "--vm", target, "--json", "trace", "syscalls", "--comm", "uname", "--duration", "40"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}, text=True)
        try:
            assert p.stderr is not None
            line = p.stderr.readline()
            while "tracing" not in line and line:
                line = p.stderr.readline()
            assert "tracing" in line, line
            for _ in range(3):
                dom.agent.run("uname -a >/dev/null", timeout=30).check()
            time.sleep(1.0)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
            p.wait()
        assert p.returncode in (0, 130), err
        events = [json.loads(x) for x in out.splitlines()]
        assert events and all(e.get("comm") == "uname" for e in events), out[-1500:]
        assert any("uname" in str(e.get("syscall", e.get("name", ""))) for e in events), out[-1500:]

        assert qemu_sockets(qemu) == sockets_before, "a gdbstub socket remains"  # gdbserver none on detach
        assert state(libvirtd, dom.name) == 1
        assert dom.agent.run("echo alive", timeout=10).check().text.strip() == "alive"
