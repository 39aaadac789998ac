"""Two commands on one VM (issue 10 item 8): while a `trace` holds the VM's first QMP monitor, its gdbstub and its
run state, `ps`, `regs` and `maps` work on a spare monitor and read the VM live, without pausing it; what needs
the run state (`idle --vm`, a second `trace`) is refused naming the holder; the trace goes on seeing events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.guest.workload import norm_maps
from vmsight.qemu.launch import VmInstance
from vmsight.qemu.qmp import Qmp
from vmsight.vm import parse_info_registers

pytestmark = pytest.mark.guest


def _cli(inst: VmInstance, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, *argv],
                          capture_output=True, text=True, timeout=timeout)


class Tracer:
    """`vmsight --json trace exec` in the background; its stdout lines collected by a thread."""

    def __init__(self, inst: VmInstance) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "--json", "trace",
                                   "exec"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        self.events: list[dict[str, object]] = []
        self.err: list[str] = []
        assert self.p.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.p.stderr.readline()
            self.err.append(line)
            if "tracing" in line or not line:
                break
        assert "tracing" in self.err[-1], "".join(self.err)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.events.append(json.loads(line))

    def execs_of(self, name: str) -> int:
        return sum(1 for e in list(self.events) if name in json.dumps(e))

    def stop(self) -> int:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
        return self.p.wait(60)


def test_read_only_commands_beside_a_trace(guest: VmInstance) -> None:
    assert len(guest.qmp_aux) == 2
    tracer = Tracer(guest)
    try:
        guest.agent.run("/bin/true; /bin/true").check()
        deadline = time.monotonic() + 30
        while tracer.execs_of("true") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracer.execs_of("true") >= 2, tracer.events

        # ps, regs and maps beside it: each on a spare monitor, reading live (and saying so)
        r = _cli(guest, "--json", "ps")
        assert r.returncode == 0, r.stderr
        assert "not pausing the VM" in r.stderr and "trace" in r.stderr
        procs = {p["pid"]: p for p in json.loads(r.stdout)}
        assert procs[1]["comm"] == "init" and len(procs) >= 40
        r = _cli(guest, "--json", "regs")
        assert r.returncode == 0, r.stderr
        regs = json.loads(r.stdout)
        assert set(regs) == {"0", "1"}
        assert all({"rip", "rsp", "cr0", "cr3", "cr4", "efer", "gs_base"} <= set(regs[c]) for c in regs)
        with Qmp(guest.qmp_aux[1], timeout=10) as q:   # the control registers, as QEMU tells them
            hmp = q.hmp("info registers -a")
        for c in regs:
            truth = parse_info_registers(hmp, int(c))
            assert {k: regs[c][k] for k in ("cr0", "cr4", "efer")} == {k: truth[k] for k in ("cr0", "cr4", "efer")}
        r = _cli(guest, "--json", "maps", "1")
        assert r.returncode == 0, r.stderr
        truth = norm_maps(guest.agent.run("cat /proc/1/maps").check().text)
        assert [(v["start"], v["end"], v["perms"], v["path"]) for v in json.loads(r.stdout)] == \
            [(s, e, p, path) for s, e, p, _, path in truth]
        # two read-only commands at once also fit (two spare monitors)
        both = [subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "ps"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in both:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err

        # what needs the run state is refused, naming the holder, and changes nothing
        r = _cli(guest, "trace", "exec", "--duration", "1")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "trace/watch" in r.stderr and "controls the run state" in r.stderr
        pid = int(guest.agent.run("sleep 300 >/dev/null 2>&1 & echo $!").check().text.split()[0])
        r = _cli(guest, "idle", "--vm", guest.dir, str(pid), "--duration", "1s")
        assert r.returncode != 0 and "controls the run state" in r.stderr, r.stderr
        guest.agent.run(f"kill {pid}")

        # the trace was not disturbed: it still sees execs, and the VM runs
        before = tracer.execs_of("true")
        guest.agent.run("/bin/true").check()
        deadline = time.monotonic() + 30
        while tracer.execs_of("true") <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracer.execs_of("true") > before
    finally:
        rc = tracer.stop()
    assert rc in (0, 130), "".join(tracer.err)
    with Qmp(guest.qmp, timeout=10) as q:
        assert q.status() == "running"
    # the locks went with the tracer: the first monitor is free again, and run control with it
    r = _cli(guest, "trace", "exec", "--duration", "1")
    assert r.returncode == 0, r.stderr


def test_a_bare_qmp_socket_in_use_says_why(guest: VmInstance) -> None:
    with Qmp(guest.qmp, timeout=10):
        r = _cli(guest, "ps")                # the directory: a spare monitor
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.qmp, "ps"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "another QMP client is connected" in r.stderr, r.stderr


def test_lock_files_are_private(guest: VmInstance) -> None:
    r = _cli(guest, "ps")
    assert r.returncode == 0, r.stderr
    locks = list(Path(guest.dir).glob("*.lock"))
    assert locks and all((p.stat().st_mode & 0o777) == 0o600 for p in locks)
