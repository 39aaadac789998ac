"""Processes, memory maps and process memory seen from the host, against the guest's /proc (agent).

Workload started in the guest for the comparison (all long-lived, so a /proc snapshot taken a moment
before the host-side read still holds): plain sleeps, one run from a copy of
busybox on another mount (/dev/shm: the path crosses a mount point), one from a copy that was then
deleted ("(deleted)"), one as user nobody."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.guest.workload import norm_maps
from vmsight.linux import Guest, find_task, for_each_process, for_each_task, kernel_of, processes
from vmsight.linux.mm import task_vmas
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM

pytestmark = pytest.mark.guest

WORKLOAD = (
    "sleep 1001 >/dev/null 2>&1 & "
    # another uid: the initramfs root is 0700, open it so 'nobody' can run busybox
    "chmod 755 / && su -s /bin/sh -c 'sleep 1002 >/dev/null 2>&1 &' nobody; "
    # busybox picks the applet from argv[0]: keep the copies named busybox
    "mkdir -p /dev/shm/m /tmp/gone && cp /bin/busybox /dev/shm/m/busybox && cp /bin/busybox /tmp/gone/busybox; "
    "/dev/shm/m/busybox sleep 1003 >/dev/null 2>&1 & "
    "/tmp/gone/busybox sleep 1004 >/dev/null 2>&1 & "
    "sleep 0.3; rm -f /tmp/gone/busybox; echo ok"
)
# One line per process: pid|ppid|uid|comm|cmdline (NULs as spaces, like ps).
PROC_SNAPSHOT = (
    "for d in /proc/[0-9]*; do p=${d#/proc/}; "
    "pp=$(sed -n 's/^PPid:[[:space:]]*//p' $d/status 2>/dev/null); "
    "u=$(sed -n 's/^Uid:[[:space:]]*\\([0-9]*\\).*/\\1/p' $d/status 2>/dev/null); "
    "c=$(cat $d/comm 2>/dev/null); a=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); "
    "echo \"$p|$pp|$u|$c|${a% }\"; done"
)


@pytest.fixture(scope="module")
def workload(guest: VmInstance) -> Iterator[dict[str, int]]:
    """Start the workload once per guest; pids of the sleeps by their argument."""
    guest.agent.run("pkill -f 'sleep 100[1-4]'; true")  # a re-run in the same guest
    guest.agent.run(WORKLOAD, timeout=30).check()
    out = guest.agent.run("ps -o pid,args").check().text
    pids = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[-2] == "sleep" and parts[-1].startswith("100"):
            pids[parts[-1]] = int(parts[0])
    assert set(pids) == {"1001", "1002", "1003", "1004"}, out + guest.agent.run("true").stderr.decode()
    yield pids
    guest.agent.run("kill " + " ".join(map(str, pids.values())) + "; rm -rf /dev/shm/m")


def snapshot(guest: VmInstance) -> dict[int, dict[str, object]]:
    out = guest.agent.run(PROC_SNAPSHOT, timeout=60).check().text
    procs: dict[int, dict[str, object]] = {}
    for line in out.splitlines():
        parts = line.split("|", 4)
        if len(parts) != 5 or not parts[1] or not parts[2]:
            continue   # exited while being read (status gone between the two sed runs)
        pid, ppid, uid, comm, cmdline = parts
        procs[int(pid)] = {"ppid": int(ppid), "uid": int(uid), "comm": comm, "cmdline": cmdline}
    return procs


def test_ps_matches_proc(guest: VmInstance, vm: VM, workload: dict[str, int]) -> None:
    truth = snapshot(guest)
    ours = {p["pid"]: p for p in processes(vm)}
    # A process /proc showed that we did not see must have exited meanwhile (the agent's shell and the
    # sed/cat/tr children of the snapshot itself; how many depends on timing): none may still be there.
    transient = {pid for pid, t in truth.items() if pid not in ours}
    alive = {int(x) for x in guest.agent.run("cd /proc && echo [0-9]*").check().text.split()}
    assert not transient & alive, transient & alive
    assert workload["1001"] in ours and workload["1004"] in ours
    common = set(truth) & set(ours)
    assert len(common) >= 40
    kworker_changed = 0
    for pid in common:
        t, o = truth[pid], ours[pid]
        if o["cmdline"] and "/tmp/.cmd" in str(o["cmdline"]):
            continue                                   # the agent's own command, exiting as we read
        assert (o["ppid"], o["uid"], o["cmdline"]) == (t["ppid"], t["uid"], t["cmdline"]), pid
        if str(o["task_comm"]).startswith("kworker/") and o["comm"] != t["comm"]:
            # A workqueue worker's "+desc"/"-desc" names the work it runs: it can change between the
            # snapshot and our read. The worker itself must be the same.
            assert str(t["comm"]).startswith(str(o["task_comm"])), pid
            kworker_changed += 1
        else:
            assert o["comm"] == t["comm"], pid
    assert kworker_changed <= 5
    assert any("-" in str(p["comm"]) or "+" in str(p["comm"]) for p in ours.values() if p["kthread"])
    assert ours[workload["1002"]]["uid"] == 65534 and ours[workload["1002"]]["gid"] == 65534
    assert ours[workload["1001"]]["state"] == "S"
    assert all(p["state"] in "RSDTtXZPI" for p in ours.values())


def test_threads_include_every_process(vm: VM, workload: dict[str, int]) -> None:
    k = kernel_of(vm)
    with vm.paused():
        leaders = {t.pid for t in for_each_process(k)}
        tasks = [t for t in for_each_task(k)]
    assert leaders <= {t.pid for t in tasks}
    assert len({t.gva for t in tasks}) == len(tasks)


# A libc-free static program: three raw clone(CLONE_THREAD) threads, all pausing forever (the busybox
# guest has nothing multi-threaded of its own).
THREADS_C = r"""
#define FLAGS 0x50f00L /* CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM */
static char stacks[3][4096] __attribute__((aligned(16)));
static void spawn(char *top) {
    register long r10 __asm__("r10") = 0;
    register long r8 __asm__("r8") = 0;
    long ret;
    __asm__ volatile("syscall\n\ttest %%rax, %%rax\n\tjnz 1f\n"
                     "2:\n\tmov $34, %%eax\n\tsyscall\n\tjmp 2b\n1:\n"
                     : "=a"(ret) : "a"(56L), "D"(FLAGS), "S"(top), "d"(0L), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
}
void _start(void) {
    for (int i = 0; i < 3; i++) spawn(stacks[i] + sizeof stacks[i]);
    for (;;) __asm__ volatile("syscall" : : "a"(34L) : "rcx", "r11", "memory");
}
"""


def test_threads_match_proc_task(guest: VmInstance, vm: VM, tmp_path: Path) -> None:
    need(shutil.which("gcc") is not None, "gcc is needed to build the threaded test program")
    (tmp_path / "t.c").write_text(THREADS_C)
    subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-fno-stack-protector", "-o", str(tmp_path / "t"),
                    str(tmp_path / "t.c")], check=True, timeout=120)
    b64 = base64.b64encode((tmp_path / "t").read_bytes()).decode()
    guest.agent.run("rm -f /tmp/thr.b64").check()
    for i in range(0, len(b64), 3000):
        guest.agent.run(f"printf %s '{b64[i:i + 3000]}' >> /tmp/thr.b64").check()
    out = guest.agent.run("base64 -d /tmp/thr.b64 > /tmp/thr && chmod +x /tmp/thr && "
                          "(/tmp/thr >/dev/null 2>&1 & echo $!) && sleep 0.3").check().text
    pid = int(out.split()[0])
    try:
        tids = sorted(int(t) for t in guest.agent.run(f"ls /proc/{pid}/task").check().text.split())
        assert len(tids) == 4
        k = kernel_of(vm)
        with vm.paused():
            leader = find_task(k, pid)
            threads = list(leader.threads())
            assert sorted(t.pid for t in threads) == tids
            assert {t.tgid for t in threads} == {pid}
            assert {t.pid for t in for_each_task(k)} >= set(tids)
            assert find_task(k, tids[-1]).tgid == pid          # a thread is found by its own id
            assert [t.pid for t in for_each_process(k) if t.tgid == pid] == [pid]
    finally:
        guest.agent.run(f"kill {pid}")


def test_maps_match_proc(guest: VmInstance, vm: VM, workload: dict[str, int]) -> None:
    pids = [1, workload["1001"], workload["1003"], workload["1004"]]
    truth = {pid: norm_maps(guest.agent.run(f"cat /proc/{pid}/maps").check().text) for pid in pids}
    k = kernel_of(vm)
    with vm.paused():
        k.invalidate()
        ours = {pid: [(v.start, v.end, v.perms, v.offset, v.path) for v in task_vmas(k, pid)] for pid in pids}
    for pid in pids:
        assert ours[pid] == truth[pid], pid
    paths = {v[4] for v in ours[workload["1003"]]}
    assert "/dev/shm/m/busybox" in paths                   # crossed the /dev/shm mount
    assert "/tmp/gone/busybox (deleted)" in {v[4] for v in ours[workload["1004"]]}
    assert {"[heap]", "[stack]", "[vdso]", "[vvar]"} <= {v[4] for v in ours[1]}


def test_process_read_and_cmdline(guest: VmInstance, vm: VM, workload: dict[str, int]) -> None:
    pid = workload["1001"]
    maps = norm_maps(guest.agent.run(f"cat /proc/{pid}/maps").check().text)
    text = next(m for m in maps if m[2] == "r-xp")
    gva = text[0] + 0x40
    truth = guest.agent.run(f"dd if=/proc/{pid}/mem bs=64 skip={gva // 64} count=1 2>/dev/null | od -An -tx1 -v"
                            ).check().text.split()
    g = Guest(vm)
    with vm.paused():
        p = g.process(pid)
        data = p.read(gva, 64)
        assert p.read(text[0] - 0x1000, 4) == b"\x7fELF"
        assert find_task(g.kernel, pid).cmdline() == ["sleep", "1001"]
    assert data.hex() == "".join(truth)


def test_start_time_matches_proc_stat(guest: VmInstance, vm: VM, workload: dict[str, int]) -> None:
    pid = workload["1001"]
    # /proc/PID/stat field 22: start_boottime in USER_HZ (100) ticks (nsec_to_clock_t)
    stat = guest.agent.run(f"cat /proc/{pid}/stat").check().text
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    k = kernel_of(vm)
    with vm.paused():
        t = find_task(k, pid)
        assert t.start_boottime_ns // 10_000_000 == ticks
        assert 0 < t.start_time_ns <= t.start_boottime_ns


def test_cli_read_virt_by_pid(guest: VmInstance, workload: dict[str, int]) -> None:
    pid = workload["1003"]
    maps = norm_maps(guest.agent.run(f"cat /proc/{pid}/maps").check().text)
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "read-virt", hex(maps[0][0]),
                        "16", "--pid", str(pid), "--raw"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout[:4] == b"\x7fELF"


def test_cli_ps_and_maps_json(guest: VmInstance, workload: dict[str, int]) -> None:
    def cli(*args: str) -> object:
        r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "--json", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    ps = cli("ps")
    assert isinstance(ps, list)
    assert {"pid", "ppid", "uid", "state", "comm", "cmdline"} <= set(ps[0])
    by_pid = {p["pid"]: p for p in ps}
    assert by_pid[workload["1001"]]["cmdline"] == "sleep 1001"
    maps = cli("maps", str(workload["1003"]))
    assert isinstance(maps, list)
    assert set(maps[0]) == {"start", "end", "perms", "offset", "path"}
    truth = norm_maps(guest.agent.run(f"cat /proc/{workload['1003']}/maps").check().text)
    assert [(m["start"], m["end"], m["perms"], m["offset"], m["path"]) for m in maps] == truth
