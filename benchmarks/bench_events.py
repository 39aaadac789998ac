"""P4 of issue 4 on a live 2-vCPU guest.

P4 = breakpoint event round trip through the dispatcher (hit -> stop reply -> decode -> handler -> resume)
     ÷ a raw RSP round trip measured in the same run on the same workload (``vCont;c`` -> stop reply ->
     ``vCont;s`` over the breakpoint), target <= 1.3; plus events per second.

Workload: two ``dd bs=7`` loops in the guest (one per vCPU) write to /dev/null; the breakpoint sits on
``__x64_sys_write``. Raw and dispatcher phases alternate so drift (host load) hits both alike. Under TCG
every debug stop makes QEMU flush its translated code, so a round trip is dominated by the guest
re-translating its loop: both numbers carry that cost."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from vmsight.events import Dispatcher
from vmsight.linux.kernel import discover
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch, load
from vmsight.vm import VM, attach

EVENTS_PER_PHASE = int(os.environ.get("VMSIGHT_BENCH_EVENTS", "200"))
PHASES = 3
# __x64_sys_write starts with endbr64 (passed by moving rip); do_syscall_64 does not (single-stepped).
SYMBOLS = {"": "__x64_sys_write", " [step-over path]": "do_syscall_64"}


def _raw_phase(vm: VM, gva: int, n: int) -> float:
    """Seconds per raw round trip: c -> T05 -> s (QEMU's single step overrides the breakpoint)."""
    stub = vm.gdb
    vm.pause()
    stub.insert_breakpoint(0, gva, 1)
    try:
        stub.cont()
        reply = stub.wait_stop(10)
        t0 = time.perf_counter()
        for _ in range(n):
            stub.step(reply.thread)
            stub.cont()
            reply = stub.wait_stop(10)
        dt = (time.perf_counter() - t0) / n
        stub.step(reply.thread)
    finally:
        stub.remove_breakpoint(0, gva, 1)
        stub.cont()
        time.sleep(0.05)
        vm.resume()
    return dt


def _dispatcher_phase(vm: VM, gva: int, n: int) -> tuple[float, dict[str, int]]:
    seen = {"vcpus": 0}
    vcpus: set[int] = set()

    def handler(ev: Any) -> None:
        vcpus.add(ev.vcpu)

    with Dispatcher(vm, supervise=True, handle_signals=False) as d:
        d.add_breakpoint(gva, handler)
        if d.listen(10) is None:
            raise RuntimeError("no breakpoint event within 10 s")
        t0 = time.perf_counter()
        for _ in range(n):
            if d.listen(10) is None:
                raise RuntimeError("breakpoint events stopped")
        dt = (time.perf_counter() - t0) / n
        stats = d.stats.as_dict()
    seen["vcpus"] = len(vcpus)
    return dt, {**stats, **seen}


def _bench(inst: VmInstance) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The workload starts before any breakpoint exists: the agent's own reply would otherwise hit it.
    inst.agent.run("for c in 1 2; do (timeout 600 taskset $c dd if=/dev/zero of=/dev/null bs=7 "
                   "count=100000000) >/dev/null 2>&1 & done; echo started", timeout=30).check()
    try:
        with attach(inst.dir) as vm:
            kernel = discover(vm)
            for label, symbol in SYMBOLS.items():
                gva = kernel.symbol(symbol)
                raw: list[float] = []
                disp: list[float] = []
                stats: dict[str, int] = {}
                for _ in range(PHASES):
                    raw.append(_raw_phase(vm, gva, EVENTS_PER_PHASE))
                    t, stats = _dispatcher_phase(vm, gva, EVENTS_PER_PHASE)
                    disp.append(t)
                r, dsp = statistics.median(raw), statistics.median(disp)
                out[f"P4 raw RSP round trip ms (baseline){label}"] = r * 1e3
                out[f"P4 dispatcher event round trip ms{label}"] = dsp * 1e3
                out[f"P4 ratio (target <= 1.3){label}"] = dsp / r
                out[f"events per second (dispatcher){label}"] = 1.0 / dsp
                out[f"breakpoint{label}"] = symbol
                out[f"vCPUs that raised events{label}"] = stats.get("vcpus", 0)
                out[f"steps / skips (last phase){label}"] = f"{stats.get('steps', 0)} / {stats.get('skips', 0)}"
            out["phases x events"] = f"{PHASES} x {EVENTS_PER_PHASE}"
    finally:
        inst.agent.run("pkill dd; true", timeout=30)
    return out


def run() -> dict[str, Any]:
    existing = os.environ.get("VMSIGHT_BENCH_VM")
    if existing:
        return _bench(load(existing))
    with tempfile.TemporaryDirectory() as d, launch(LaunchConfig(kernel="debian-6.12", smp=2), d) as inst:
        return _bench(inst)


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:<48} {v:.4g}" if isinstance(v, float) else f"{k:<48} {v}")
