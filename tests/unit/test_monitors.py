"""vmsight.qemu.monitors: monitor claims and run control between real processes (flock), planted files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsight.errors import TargetError
from vmsight.qemu.monitors import RUN_CONTROL, connect_monitor, run_control_owner, take_run_control

HOLD = """
import sys, time
from vmsight.qemu.monitors import connect_monitor, take_run_control
d, what = sys.argv[1], sys.argv[2]
if what == "run":
    rc = take_run_control(d, "vmsight trace (test)")
else:
    got = connect_monitor(d, [d + "/qmp.sock"], "vmsight ps (test)", lambda p: p)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(what: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), what], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_held_monitor_is_skipped_without_waiting(tmp_path: Path, holder) -> None:  # type: ignore[no-untyped-def]
    mons = [str(tmp_path / "qmp.sock"), str(tmp_path / "qmp-1.sock")]
    got, claim = connect_monitor(str(tmp_path), mons, "me", lambda p: p)
    assert got == mons[0]                  # free: the first
    claim.release()
    p = holder("monitor")
    got, claim = connect_monitor(str(tmp_path), mons, "me", lambda p: p)
    assert got == mons[1]
    # every monitor held: the error names the holder
    with pytest.raises(TargetError, match=r"in use \(vmsight ps \(test\) \(pid \d+\)"):
        connect_monitor(str(tmp_path), mons, "me", lambda p: p)
    claim.release()
    p.kill()
    p.wait()                                # a killed holder frees its monitor (the lock dies with it)
    got, claim = connect_monitor(str(tmp_path), mons, "me", lambda p: p)
    assert got == mons[0]
    claim.release()
    assert all((tmp_path / f"{Path(m).name}.lock").stat().st_mode & 0o777 == 0o600 for m in mons)


def test_a_failing_connection_moves_on(tmp_path: Path) -> None:
    mons = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]

    def connect(path: str) -> str:
        if path.endswith("a.sock"):
            raise TargetError("busy")       # a client that is not vmsight holds it
        return path

    got, claim = connect_monitor(str(tmp_path), mons, "me", connect)
    assert got == mons[1]
    claim.release()
    with pytest.raises(TargetError, match="^busy$"):
        connect_monitor(str(tmp_path), mons[:1], "me", connect)
    with pytest.raises(TargetError, match="none of the 2 QMP monitors .* answered; the last: busy"):
        connect_monitor(str(tmp_path), [mons[0], mons[0]], "me", connect)


def test_run_control_between_processes(tmp_path: Path, holder) -> None:  # type: ignore[no-untyped-def]
    assert run_control_owner(str(tmp_path)) is None
    p = holder("run")
    owner = run_control_owner(str(tmp_path))
    assert owner is not None and owner.startswith("vmsight trace (test) (pid ")
    with pytest.raises(TargetError, match="controls the run state"):
        take_run_control(str(tmp_path), "idle")
    p.kill()
    p.wait()
    assert run_control_owner(str(tmp_path)) is None
    rc = take_run_control(str(tmp_path), "idle")
    assert rc is not None
    rc.release()


def test_planted_lock_files_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / RUN_CONTROL).symlink_to(victim)
    with pytest.raises(TargetError, match="symlink"):
        take_run_control(str(tmp_path), "idle")
    with pytest.raises(TargetError, match="symlink"):
        run_control_owner(str(tmp_path))
    assert victim.read_text() == "precious\n"
    (tmp_path / "qmp.sock.lock").write_text("x")
    os.chmod(tmp_path / "qmp.sock.lock", 0o666)   # writable by anyone: not ours to trust
    with pytest.raises(TargetError, match="not a private file"):
        connect_monitor(str(tmp_path), [str(tmp_path / "qmp.sock")], "me", lambda p: p)


def test_holder_text_is_escaped(tmp_path: Path) -> None:
    fd = os.open(tmp_path / RUN_CONTROL, os.O_RDWR | os.O_CREAT, 0o600)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"\x1b]0;owned\x07 evil")
    try:
        # another open file description conflicts with our own flock, as another process's would
        owner = run_control_owner(str(tmp_path))
        assert owner is not None and "\x1b" not in owner and "\x07" not in owner and "evil" in owner
    finally:
        os.close(fd)
