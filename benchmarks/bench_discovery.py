"""P3: Linux awareness on a live 256 MiB Debian 6.1 guest, end to end.

* cold: first sight of a kernel build — ``attach()`` + discovery with an empty kernels-seen cache and
  the in-process decode cache cleared (target <= 1.0 s), with the time split by step;
* cached: a later attach to the same build (``~/.cache/vmsight/kernels-seen/<build id>``) (<= 0.25 s);
* warm task walk: every task's pid and comm with the VM paused and discovery done (<= 3 ms);
* the same three as a separate ``vmsight uname`` process (includes interpreter start-up), for reference;
* P3 as a user sees it: ``vmsight --vm DIR --json ps`` as a whole process, re-attach (<= 0.15 s) and first
  sight of the build (<= 0.4 s).

Times are the best of several runs: the machine is shared (2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmsight.linux import kallsyms as K
from vmsight.linux.kernel import discover
from vmsight.linux.tasks import for_each_task
from vmsight.qemu.launch import LaunchConfig, launch
from vmsight.vm import attach

REPEAT = 5
TARGETS = {"cold_s": 1.0, "cached_s": 0.25, "task_walk_warm_s": 0.003,
           "ps_process_cached_s": 0.15, "ps_process_cold_s": 0.4}     # issue 11: drgn --qemu takes ~0.30 s


def _discover(directory: str, from_cache: bool) -> tuple[float, dict[str, float]]:
    """Seconds to attach and find the kernel, and its step timings; ``from_cache`` is what must happen."""
    K._DECODE_CACHE.clear()
    t = time.perf_counter()
    with attach(directory) as vm:
        with vm.paused():
            k = discover(vm)
        dt = time.perf_counter() - t
    assert k.from_cache == from_cache
    return dt, dict(k.timings)


def _cold(directory: str, cache: str) -> tuple[float, dict[str, float]]:
    os.environ["VMSIGHT_CACHE"] = tempfile.mkdtemp(dir=cache)   # nothing seen yet
    return _discover(directory, from_cache=False)


def _cached(directory: str) -> tuple[float, dict[str, float]]:
    return _discover(directory, from_cache=True)


def run() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmsight-bench-") as d:
        old_cache = os.environ.get("VMSIGHT_CACHE")
        try:
            with launch(LaunchConfig(kernel="debian-6.1", memory="256M", smp=2), Path(d) / "vm") as inst:
                inst.agent.run("for i in 1 2 3 4 5; do sleep 600 & done; true").check()
                colds = [_cold(inst.dir, d) for _ in range(REPEAT)]
                best_cold = min(colds, key=lambda c: c[0])
                out["cold_s"] = best_cold[0]
                for step, secs in best_cold[1].items():
                    out[f"cold_step_{step}_s"] = secs
                out["cold_s_median"] = sorted(c[0] for c in colds)[len(colds) // 2]
                cached = [_cached(inst.dir) for _ in range(REPEAT)]
                best = min(cached, key=lambda c: c[0])
                out["cached_s"] = best[0]
                for step, secs in best[1].items():
                    out[f"cached_step_{step}_s"] = secs
                with attach(inst.dir) as vm:
                    with vm.paused():
                        k = discover(vm)
                        walks = []
                        for _ in range(20):
                            t = time.perf_counter()
                            tasks = [(task.pid, task.comm) for task in for_each_task(k)]
                            walks.append(time.perf_counter() - t)
                out["task_walk_warm_s"] = min(walks)
                out["tasks"] = len(tasks)
                # P3 as a user runs it: `vmsight --vm DIR --json ps` as a whole process, bytecode cached as an
                # installed package has it (PYTHONDONTWRITEBYTECODE would recompile every module each run).
                penv = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
                ps = [sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "--json", "ps"]
                subprocess.run(ps, check=True, capture_output=True, env=penv, timeout=120)   # pyc, cache entry
                runs = []
                for _ in range(REPEAT):
                    t = time.perf_counter()
                    subprocess.run(ps, check=True, capture_output=True, env=penv, timeout=120)
                    runs.append(time.perf_counter() - t)
                out["ps_process_cached_s"] = min(runs)
                runs = []
                for _ in range(3):
                    penv["VMSIGHT_CACHE"] = tempfile.mkdtemp(dir=d)          # first sight of this build
                    t = time.perf_counter()
                    subprocess.run(ps, check=True, capture_output=True, env=penv, timeout=120)
                    runs.append(time.perf_counter() - t)
                out["ps_process_cold_s"] = min(runs)
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True, env=penv, timeout=60)
                out["python_startup_s"] = time.perf_counter() - t
                # A separate CLI process per attach: interpreter and imports included.
                env = dict(os.environ)
                cli = [sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "uname"]
                procs = []
                for _ in range(3):
                    t = time.perf_counter()
                    subprocess.run(cli, check=True, capture_output=True, env=env, timeout=120)
                    procs.append(time.perf_counter() - t)
                out["cli_uname_cached_process_s"] = min(procs)
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import vmsight.cli.main, vmsight.linux"], check=True,
                               env=env, timeout=60)
                out["python_import_only_s"] = time.perf_counter() - t
        finally:
            if old_cache is None:
                os.environ.pop("VMSIGHT_CACHE", None)
            else:
                os.environ["VMSIGHT_CACHE"] = old_cache
    for key, target in TARGETS.items():
        out[f"{key}_target"] = target
        out[f"{key}_met"] = out[key] <= target
    return out


if __name__ == "__main__":
    for key, val in run().items():
        print(f"{key:<40} {val:.4g}" if isinstance(val, float) else f"{key:<40} {val}")
