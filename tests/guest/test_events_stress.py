"""Event dispatcher under load and under attack, on a dedicated 2-vCPU guest with a tiny static program
that makes an exact number of ``getppid`` calls (ground truth for "none lost or duplicated").

* 10,000 breakpoint events from 2 vCPUs (``VMSIGHT_EVENTS_STRESS`` overrides the count).
* SIGKILL of a tracer mid-trace: within 2 s the VM runs and no breakpoint is left (the watchdog).
* SIGTERM / SIGINT of a tracer: clean detach, exit status 143 / 130.
* A guest panic arrives as a lifecycle event."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from vmsight.errors import VmsightError
from vmsight.events import Dispatcher, Lifecycle, VmLifecycle
from vmsight.events.linux import LinuxEvents
from vmsight.qemu.kernels import cached_kernel
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.vm import attach

pytestmark = pytest.mark.guest

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    printf("%d %ld\n", getpid(), n);
    return 0;
}
"""
KERNEL = "debian-6.1"   # boots fastest; the shared fixtures cover both kernels for the rest


@pytest.fixture(scope="module")
def loop_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(shutil.which("gcc") is not None, "gcc not installed (scripts/setup.sh)")
    d = tmp_path_factory.mktemp("loop")
    (d / "loop.c").write_text(LOOP_C)
    r = subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "loop"), str(d / "loop.c")],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"cannot build a static test program: {r.stderr[-300:]}")
    return d / "loop"


def _boot(tmp: Path, smp: int, loop: Path | None) -> Iterator[VmInstance]:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    need(cached_kernel(KERNEL) is not None, f"kernel {KERNEL} not cached (scripts/setup.sh)")
    files = {"/bin/vmsight-syscall-loop": str(loop)} if loop else {}
    with launch(LaunchConfig(kernel=KERNEL, smp=smp, guest_files=files), tmp) as inst:
        yield inst


@pytest.fixture(scope="module")
def loopguest(tmp_path_factory: pytest.TempPathFactory, loop_binary: Path) -> Iterator[VmInstance]:
    yield from _boot(tmp_path_factory.mktemp("vm-events"), 2, loop_binary)


def test_10k_breakpoint_events_two_vcpus_none_lost_or_duplicated(loopguest: VmInstance) -> None:
    total = int(os.environ.get("VMSIGHT_EVENTS_STRESS", "10000"))
    per = total // 2
    with attach(loopguest.dir) as vm, Dispatcher(vm) as d:
        lx = LinuxEvents(d)
        by_pid: Counter[int] = Counter()
        by_pid_vcpu: Counter[tuple[int, int]] = Counter()
        bad_rip = 0

        def count(ev: Any) -> None:
            nonlocal bad_rip
            bad_rip += ev.registers()["rip"] != ev.gva
            t = lx.current(ev)
            by_pid[t.pid] += 1
            by_pid_vcpu[(t.pid, ev.vcpu)] += 1

        d.add_breakpoint("__x64_sys_getppid", count, with_registers=True)
        res: dict[str, Any] = {}
        cmd = f"taskset 1 vmsight-syscall-loop {per} & taskset 2 vmsight-syscall-loop {per}; wait"
        th = threading.Thread(target=lambda: res.setdefault("r", loopguest.agent.run(cmd, timeout=1800)),
                              daemon=True)
        t0 = time.monotonic()
        th.start()
        n = 0
        while th.is_alive() and time.monotonic() - t0 < 1800:
            if d.listen(0.5) is not None:
                n += 1
        n += sum(1 for _ in d.events(timeout=0.5))
        elapsed = time.monotonic() - t0
        stats = d.stats
    out = res["r"].check().text.split()
    pids = [int(out[0]), int(out[2])]
    assert [by_pid[p] for p in pids] == [per, per], (by_pid, stats)
    # taskset 1 -> vCPU 0, taskset 2 -> vCPU 1: each event names the vCPU that raised it
    vcpu_of = {p: {v for (q, v) in by_pid_vcpu if q == p} for p in pids}
    assert sorted(len(v) for v in vcpu_of.values()) == [1, 1] and vcpu_of[pids[0]] != vcpu_of[pids[1]]
    assert bad_rip == 0
    assert n == sum(by_pid.values())
    print(f"\n{n} events in {elapsed:.1f} s ({n / elapsed:.0f}/s); {stats}")


def _start_tracer(inst: VmInstance, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "trace", "syscalls",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_lines(proc: subprocess.Popen[bytes], n: int, timeout: float = 60) -> list[bytes]:
    lines: list[bytes] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    assert len(lines) == n, (lines, proc.stderr.read() if proc.stderr else b"")
    return lines


def _busy(inst: VmInstance) -> None:
    # A syscall storm that runs for the whole test: any breakpoint left behind stops the VM at once.
    inst.agent.run("vmsight-syscall-loop 100000000 >/dev/null 2>&1 & echo $! > /tmp/storm.pid", timeout=30).check()


def _quiet(inst: VmInstance) -> None:
    inst.agent.run("kill $(cat /tmp/storm.pid); true", timeout=60)  # not killall: the agent runs under timeout


def test_sigkill_mid_trace_leaves_vm_running_without_breakpoints(loopguest: VmInstance) -> None:
    _busy(loopguest)
    try:
        proc = _start_tracer(loopguest)
        _wait_lines(proc, 5)
        proc.kill()
        t_kill = time.monotonic()
        proc.wait(10)
        with attach(loopguest.dir) as vm:  # QMP only: the gdb socket is the watchdog's now
            running_at = None
            while time.monotonic() - t_kill < 5:
                if vm.status() == "running":
                    running_at = time.monotonic() - t_kill
                    time.sleep(0.3)  # with a breakpoint left, the storm would stop the VM within ms
                    if vm.status() == "running":
                        break
                time.sleep(0.02)
            assert running_at is not None and running_at <= 2.0, running_at
            assert vm.status() == "running"
            time.sleep(1.0)
            assert vm.status() == "running"
            # the gdbstub is free again (the watchdog detached) and a full attach/detach works
            assert vm.registers(0)["cr3"]
        assert loopguest.agent.run("echo alive", timeout=30).check().text.strip() == "alive"
        print(f"\nVM running again {running_at:.2f} s after SIGKILL")
    finally:
        _quiet(loopguest)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_sigint_detach_cleanly(loopguest: VmInstance, sig: int, code: int) -> None:
    _busy(loopguest)
    try:
        proc = _start_tracer(loopguest, "--no-watchdog")  # the tracer itself must clean up
        _wait_lines(proc, 3)
        proc.send_signal(sig)
        assert proc.wait(10) == code
        with attach(loopguest.dir) as vm:
            assert vm.status() == "running"
            time.sleep(0.5)
            assert vm.status() == "running"
        assert loopguest.agent.run("echo alive", timeout=30).check().text.strip() == "alive"
    finally:
        _quiet(loopguest)


def test_guest_panic_is_a_lifecycle_event(tmp_path: Path) -> None:
    for inst in _boot(tmp_path, 1, None):
        vm = attach(inst.dir)
        try:
            d = Dispatcher(vm)
            LinuxEvents(d).panics()  # QMP's GUEST_PANICKED needs the (modular) pvpanic driver loaded

            def crash(inst: VmInstance = inst) -> None:
                try:
                    inst.agent.run("echo c > /proc/sysrq-trigger", timeout=20)
                except Exception:  # noqa: BLE001 - the guest dies: no answer is the expected outcome
                    pass

            threading.Thread(target=crash, daemon=True).start()
            seen: list[Lifecycle] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and Lifecycle.PANIC not in seen:
                try:
                    ev = d.listen(1.0)
                except Exception:  # noqa: BLE001 - closed after SHUTDOWN
                    break
                if isinstance(ev, VmLifecycle):
                    seen.append(ev.what)
                    if ev.what is Lifecycle.PANIC:
                        assert "sysrq triggered crash" in ev.data.get("message", ""), ev.data
            d.close()
            assert Lifecycle.PANIC in seen, seen
        finally:
            try:
                vm.close()
            except VmsightError:
                pass  # QEMU exited after the panic (panic=-1 with -no-reboot)
