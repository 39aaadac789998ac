"""Local attackers (issue 10 items 1-4, the parts without a guest): private verified runtime directories, no
symlink followed or file truncated in the lock directory, the runtime gdbstub only in a private directory,
`vm stop` believing nothing a forged vm.json says. Tests marked `as_user` run code as second unprivileged
users that the test creates and removes (root only)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vmsight
from tests.conftest import need
from vmsight.idle.lock import TrackerLock, default_lock_dir
from vmsight.runtime import (
    UnsafePath,
    find_runtime_stub,
    forget_runtime_stub,
    listens_on,
    new_runtime_stub_path,
    open_private_dir,
    private_tempdir,
    proc_cmdline,
    proc_uid,
    record_runtime_stub,
    runtime_dir,
)

SRC = str(Path(vmsight.__file__).resolve().parents[1])  # the vmsight under test, for subprocesses


# --- second local users ------------------------------------------------------------------------------------

@contextmanager
def local_user(name: str) -> Iterator[pwd.struct_passwd]:
    """A throwaway unprivileged user (useradd; userdel and its /tmp/vmsight-<uid> removed afterwards)."""
    need(os.geteuid() == 0, "needs root to create a second local user")
    need(all(os.path.exists(p) for p in ("/usr/sbin/useradd", "/usr/bin/setpriv")), "useradd/setpriv missing")
    subprocess.run(["userdel", name], capture_output=True)  # a leftover of a killed run
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    user = pwd.getpwnam(name)
    try:
        yield user
    finally:
        subprocess.run(["rm", "-rf", f"/tmp/vmsight-{user.pw_uid}"], check=False)
        subprocess.run(["userdel", name], check=True, capture_output=True)


def as_user(user: pwd.struct_passwd, code: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (with vmsight importable) as ``user``, no supplementary groups."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": SRC, "HOME": "/nonexistent"}
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                           sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout, cwd="/")


@pytest.fixture
def attacker() -> Iterator[pwd.struct_passwd]:
    with local_user("vmsight-t-atk") as u:
        yield u


@pytest.fixture
def victim() -> Iterator[pwd.struct_passwd]:
    with local_user("vmsight-t-vic") as u:
        yield u


# --- private directories -------------------------------------------------------------------------------------

def test_private_dir_is_made_0700_and_verified(tmp_path: Path) -> None:
    d = tmp_path / "new"
    os.close(open_private_dir(str(d)))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.geteuid()
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    os.close(open_private_dir(str(tmp_path / "open")))  # an own dir only readable by others: tightened
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o777)
    with pytest.raises(UnsafePath, match="writable by others"):
        open_private_dir(str(tmp_path / "shared"))
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(UnsafePath, match="symlink"):
        open_private_dir(str(tmp_path / "link"))


def test_private_dir_of_another_owner_is_refused(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to chown")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        open_private_dir(str(d))


def test_private_tempdir_is_unpredictable_and_private() -> None:
    a, b = private_tempdir("vmsight-t-"), private_tempdir("vmsight-t-")
    try:
        assert a != b and os.path.dirname(a) == runtime_dir()
        assert all(stat.S_IMODE(os.lstat(p).st_mode) == 0o700 for p in (a, b, runtime_dir()))
    finally:
        os.rmdir(a)
        os.rmdir(b)


# --- item 2: the lock directory -------------------------------------------------------------------------------

def test_lock_file_symlink_is_not_followed_or_truncated(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    important = tmp_path / "important.txt"
    important.write_text("keep me\n")
    (locks / "idle-page_idle.lock").symlink_to(important)
    with pytest.raises(UnsafePath, match="idle-page_idle.lock"):
        TrackerLock("page_idle", str(locks))
    assert important.read_text() == "keep me\n"


def test_lock_file_is_0600_and_never_truncated(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    lock = TrackerLock("page_idle", str(locks))
    p = locks / "idle-page_idle.lock"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(locks.stat().st_mode) == 0o700
    assert int(p.read_text().split()[0]) == os.getpid()
    lock.release()
    assert p.read_text().strip() == ""


def test_lock_dir_env_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may plant entries
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", str(shared))
    with pytest.raises(UnsafePath, match="VMSIGHT_LOCK_DIR"):
        TrackerLock("page_idle")
    assert list(shared.iterdir()) == []
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("VMSIGHT_LOCK_DIR", str(tmp_path / "link"))
    with pytest.raises(UnsafePath, match="symlink"):
        default_lock_dir()


def test_root_lock_dir_is_private(monkeypatch: pytest.MonkeyPatch) -> None:
    need(os.geteuid() == 0, "root's lock directory")
    monkeypatch.delenv("VMSIGHT_LOCK_DIR", raising=False)
    if os.path.isdir("/run/vmsight"):
        os.chmod("/run/vmsight", 0o755)  # as older vmsight made it: tightened on use
    d = default_lock_dir()
    st = os.lstat(d)
    assert d == "/run/vmsight" and stat.S_ISDIR(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_planted_lock_dir_cannot_truncate_another_users_file(attacker: pwd.struct_passwd,
                                                              victim: pwd.struct_passwd, tmp_path: Path) -> None:
    """The reported attack: one user plants /tmp/vmsight-<victim uid> with a symlink to the victim's file;
    the victim's vmsight refuses the directory with one line and the file keeps its contents."""
    important = Path(f"/tmp/vmsight-t-important-{victim.pw_uid}")
    important.write_text("keep me\n")
    os.chown(important, victim.pw_uid, victim.pw_gid)
    try:
        r = as_user(attacker, f"""
            import os
            d = "/tmp/vmsight-{victim.pw_uid}"
            os.mkdir(d); os.chmod(d, 0o777)
            os.symlink("{important}", d + "/idle-page_idle.lock")
            print("planted")""")
        assert r.stdout.strip() == "planted", r.stderr
        for xdg in ("", str(tmp_path)):  # no XDG_RUNTIME_DIR, or one that is not the victim's
            r = as_user(victim, """
                from vmsight.idle.lock import TrackerLock
                from vmsight.runtime import UnsafePath
                try:
                    TrackerLock("page_idle")
                    print("LOCKED")
                except UnsafePath as e:
                    print("REFUSED", e)""", env={"XDG_RUNTIME_DIR": xdg} if xdg else None)
            assert r.stdout.startswith("REFUSED /tmp/vmsight-") and "belongs to uid" in r.stdout, r.stdout + r.stderr
            assert len(r.stdout.splitlines()) == 1
        assert important.read_text() == "keep me\n"
    finally:
        important.unlink()


def test_root_refuses_a_lock_dir_another_user_owns(attacker: pwd.struct_passwd, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    r = as_user(attacker, """
        import tempfile, os
        d = tempfile.mkdtemp(dir="/tmp"); os.chmod(d, 0o755)
        os.symlink("/etc/vmsight-t-victim", d + "/idle-page_idle.lock")
        print(d)""")
    d = r.stdout.strip()
    assert d, r.stderr
    victim_file = Path("/etc/vmsight-t-victim")
    victim_file.write_text("root's\n")
    try:
        monkeypatch.setenv("VMSIGHT_LOCK_DIR", d)
        with pytest.raises(UnsafePath, match=f"belongs to uid {attacker.pw_uid}"):
            TrackerLock("page_idle")
        assert victim_file.read_text() == "root's\n"
    finally:
        victim_file.unlink()
        subprocess.run(["rm", "-rf", d], check=False)


# --- item 4: runtime gdbstub records ---------------------------------------------------------------------------

@contextmanager
def _listener() -> Iterator[subprocess.Popen[str]]:
    """A stand-in QEMU: binds a listening unix socket at the path written to its stdin."""
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.stdin.readline().strip())\n"
            "s.listen(1)\nprint('ready', flush=True)\nsys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _serve(p: subprocess.Popen[str], path: str) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(path + "\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ready"


def test_runtime_stub_is_private_and_proven() -> None:
    with _listener() as qemu, _listener() as other:
        a, b = new_runtime_stub_path(qemu.pid), new_runtime_stub_path(qemu.pid)
        assert a != b and Path(a).parent.parent == Path(runtime_dir())
        assert stat.S_IMODE(os.lstat(Path(a).parent).st_mode) == 0o700
        forget_runtime_stub(qemu.pid, b)
        assert not Path(b).parent.exists()
        assert find_runtime_stub(qemu.pid) is None
        _serve(qemu, a)
        assert listens_on(qemu.pid, a) and not listens_on(other.pid, a)
        record_runtime_stub(qemu.pid, a)
        assert find_runtime_stub(qemu.pid) == a
        # A record naming a socket the QEMU does not hold (another process's) is not believed, and dropped.
        c = new_runtime_stub_path(other.pid)
        _serve(other, c)
        record_runtime_stub(qemu.pid, c)
        assert find_runtime_stub(qemu.pid) is None
        assert not any(n.startswith(f"gdbstub-{qemu.pid}-") for n in os.listdir(runtime_dir()))
        forget_runtime_stub(other.pid, c)
        record_runtime_stub(qemu.pid, a)
    # QEMU gone: its record and the stub directory are swept by the next look-up.
    assert find_runtime_stub(qemu.pid) is None
    assert not Path(a).parent.exists()
    assert not any(n.startswith(f"gdbstub-{qemu.pid}-") for n in os.listdir(runtime_dir()))


def test_runtime_stub_for_another_users_qemu_is_theirs_and_roots(victim: pwd.struct_passwd) -> None:
    sleeper = subprocess.Popen(["setpriv", f"--reuid={victim.pw_uid}", f"--regid={victim.pw_gid}",
                                "--clear-groups", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while proc_uid(sleeper.pid) != victim.pw_uid and time.monotonic() < deadline:
            time.sleep(0.01)
        path = new_runtime_stub_path(sleeper.pid)
        st = os.lstat(Path(path).parent)
        assert st.st_uid == victim.pw_uid and stat.S_IMODE(st.st_mode) == 0o700
        assert Path(path).parent.parent == Path("/tmp")
        forget_runtime_stub(sleeper.pid, path)
        assert not Path(path).parent.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- item 3: `vm stop` and a forged vm.json ---------------------------------------------------------------------

VMSIGHT = [sys.executable, "-m", "vmsight.cli.main"]


def _vm_stop(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(VMSIGHT + ["vm", "stop", "--dir", str(d)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})


def _forged(d: Path, pid: int, **kw: object) -> None:
    """A vm.json as `vm launch` writes it, naming whatever we like."""
    info = {"dir": str(d), "pid": pid, "qmp": str(d / "qmp.sock"), "gdb": None, "agent_socket": str(d / "agent.sock"),
            "ram_file": None, "ram_size": 1 << 28, "console_log": str(d / "console.log"), "kernel": "k",
            "accel": "tcg", "config": {}, "format_version": 1, **kw}
    d.mkdir(exist_ok=True)
    (d / "vm.json").write_text(json.dumps(info))


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A harmless process that looks like QEMU by name (comm 'qemu-system-x8'): sleep under another name."""
    exe = tmp_path / "bin" / "qemu-system-x86_64"
    exe.parent.mkdir()
    exe.write_bytes(Path("/bin/sleep").read_bytes())
    exe.chmod(0o755)
    p = subprocess.Popen([str(exe), "300"], start_new_session=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _alive(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is None


def test_forged_vm_json_kills_and_deletes_nothing(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    victim_dir = Path(private_tempdir("vmsight-t-victim-"))  # a private dir of ours, as a VM's would be
    (victim_dir / "ram").write_text("someone's guest RAM")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        for pid, extra in ((fake_qemu.pid, {}), (sleeper.pid, {}), (fake_qemu.pid, {"runtime_dir": str(victim_dir)})):
            d = tmp_path / f"forged-{pid}-{len(extra)}"
            _forged(d, pid, ram_file=str(victim), **extra)
            r = _vm_stop(d)
            assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
            assert f"names pid {pid}, which is not this VM's QEMU" in r.stderr and "nothing stopped" in r.stderr
            assert _alive(fake_qemu) and _alive(sleeper)  # type: ignore[arg-type]
            assert victim.read_text() == "keep me" and (victim_dir / "ram").exists()
        # QEMU gone (a dead pid): a runtime dir that does not point back at this directory is left alone
        d = tmp_path / "dead"
        dead = subprocess.Popen(["true"])
        dead.wait()
        _forged(d, dead.pid, runtime_dir=str(victim_dir))
        (victim_dir / "vm-dir").write_text("/somewhere/else")
        r = _vm_stop(d)
        assert r.returncode == 0 and (victim_dir / "ram").exists(), r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["rm", "-rf", str(victim_dir)], check=False)


def test_vm_json_that_lies_about_its_qemu(tmp_path: Path) -> None:
    """A process whose command line is right for the directory but which does not hold the QMP socket
    (someone else's listener does) is not taken for the VM's QEMU."""
    d = tmp_path / "vm"
    d.mkdir()
    qmp = str(d / "qmp.sock")
    args = ["-chardev", f"file,id=con,path={d}/console.log", "-qmp", f"unix:{qmp},server=on,wait=off"]
    with _listener() as holder:
        _serve(holder, qmp)
        # bash named qemu-system-x86_64 with QEMU's arguments (its child sleep keeps it waiting)
        impostor = subprocess.Popen(["bash", "-c", 'exec -a qemu-system-x86_64 bash -c "sleep 300; :" "$@"', "x",
                                     *args], start_new_session=True)
        try:
            deadline = time.monotonic() + 5
            while (proc_cmdline(impostor.pid) or [""])[0] != "qemu-system-x86_64" and time.monotonic() < deadline:
                time.sleep(0.01)
            _forged(d, impostor.pid)
            r = _vm_stop(d)
            assert r.returncode == 2 and "does not hold the QMP socket" in r.stderr, r.stderr
            assert _alive(impostor) and _alive(holder)  # type: ignore[arg-type]
        finally:
            os.killpg(impostor.pid, signal.SIGKILL)
            impostor.wait()


def test_vm_json_symlink_or_garbage_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / "vm"
    d.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"pid": 1, "qmp": "/x", "console_log": "/y"}))
    (d / "vm.json").symlink_to(elsewhere)
    r = _vm_stop(d)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "symlink" in r.stderr, r.stderr
    (d / "vm.json").unlink()
    (d / "vm.json").write_text(json.dumps({"pid": "1; rm -rf /", "qmp": 3}))
    r = _vm_stop(d)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not a vm.json" in r.stderr, r.stderr


def test_ram_file_must_be_mapped_shared_by_qemu(tmp_path: Path) -> None:
    """vm.json and QMP name the RAM file; it is mapped (read-write, as root) only if the QEMU process itself
    maps that very file shared (here this process plays QEMU)."""
    import mmap

    from vmsight.errors import TargetError
    from vmsight.vm import _mapped_shared_by

    shared, private, other = (tmp_path / n for n in ("shared", "private", "other"))
    for f in (shared, private, other):
        f.write_bytes(b"\0" * 8192)
    with shared.open("r+b") as a, private.open("r+b") as b:
        ma = mmap.mmap(a.fileno(), 8192, mmap.MAP_SHARED)
        mb = mmap.mmap(b.fileno(), 8192, mmap.MAP_PRIVATE)
        try:
            _mapped_shared_by(os.getpid(), os.stat(shared), str(shared))
            for f in (private, other):
                with pytest.raises(TargetError, match="not guest RAM of QEMU"):
                    _mapped_shared_by(os.getpid(), os.stat(f), str(f))
        finally:
            ma.close()
            mb.close()


def test_vm_directory_must_be_our_own(tmp_path: Path) -> None:
    """`vm launch --dir D`: QEMU, run as root, writes its logs in D; in a directory another user can write, a
    planted symlink would aim them. D is created 0700, or refused unless it is ours and nobody else writes it."""
    from vmsight.errors import VmsightError
    from vmsight.qemu.launch import _own_dir, _private_log

    new = tmp_path / "a" / "vm"
    _own_dir(new)
    assert new.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(VmsightError, match="others may write"):
        _own_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(new)
    with pytest.raises(VmsightError, match="not a directory"):
        _own_dir(link)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(VmsightError, match="uid 65534"):
        _own_dir(theirs)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (new / "console.log").symlink_to(victim)
    with pytest.raises(OSError):
        _private_log(new / "console.log")
    assert victim.read_text() == "precious"
    os.close(_private_log(new / "qemu.log"))
    assert (new / "qemu.log").stat().st_mode & 0o777 == 0o600
