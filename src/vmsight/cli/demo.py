"""``vmsight demo``: launch a throwaway VM and look inside it from the host."""

from __future__ import annotations

import argparse
import tempfile
import time

from rich.console import Console

from vmsight.cli.common import flags, hexdump, table
from vmsight.qemu.initramfs import build_workload
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.vm import VM, attach

NAME = "demo"
HELP = "boot a throwaway VM and show registers, a translation, memory and processes seen from outside"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="debian-6.12", help="debian-6.1 | debian-6.12 | path to a bzImage")
    p.add_argument("--smp", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    con = Console()
    with tempfile.TemporaryDirectory(prefix="vmsight-demo-") as d:
        t0 = time.monotonic()
        con.print(f"[bold]Booting {args.kernel}[/] (throwaway VM in {d}) ...")
        files = {"/bin/vmsight-workload": str(build_workload())}
        with launch(LaunchConfig(kernel=args.kernel, smp=args.smp, guest_files=files), d) as inst:
            con.print(f"guest up in {time.monotonic() - t0:.1f} s, QEMU pid {inst.pid}, accel {inst.accel}")
            # Something to find from the outside: a process with a recognisable command line, and one whose
            # memory use we control (1024 pages; it touches the ones we name).
            inst.agent.run("sleep 600 & echo started", timeout=10).check()
            wl_pid = int(inst.agent.run("vmsight-workload 1024 nothp /tmp/wl.cmd /tmp/wl.out >/dev/null 2>&1 & "
                                        "echo $!; sleep 0.5", timeout=10).check().text.split()[0])
            with attach(inst.dir) as vm:
                con.print(f"attached: RAM {vm.layout.total_bytes >> 20} MiB in {len(vm.layout)} ranges, "
                          f"memory backend [bold]{vm.backend}[/]")
                with vm.paused():
                    regs = vm.registers(0)
                    names = ["rip", "rsp", "cr3", "cr4", "efer", "gs_base", "rax", "rflags"]
                    vals = [regs.get(n if n != "rflags" else "eflags", 0) for n in names]
                    con.print(table(("register", "value", "register ", "value "),
                                    ([names[i], f"{vals[i]:#018x}", names[i + 1], f"{vals[i + 1]:#018x}"]
                                     for i in range(0, len(names), 2)),
                                    title="vCPU 0 registers (VM paused)",
                                    styles={"register": "cyan", "register ": "cyan"}))
                    tr = vm.translate(regs["rip"], regs["cr3"])
                    con.print(f"[bold]translate rip {tr.gva:#x}[/] with CR3 {regs['cr3']:#x}:")
                    for e in tr.entries:
                        con.print(f"  {e.name:<5} {e.value:#018x}  {' '.join(flags(e))}")
                    con.print(f"  -> gpa {tr.gpa:#x} ({tr.page_size >> 10} KiB page); "
                              f"QEMU says: {vm.qmp.hmp(f'gva2gpa {tr.gva:#x}').strip()}")
                    con.print("[bold]16 bytes at rip[/] (read through vmsight's own page walk):")
                    con.print(hexdump(vm.read_gva(regs["rip"], 16, regs["cr3"]), regs["rip"]), markup=False,
                              soft_wrap=True)
                _show_linux(con, vm)
                _show_idle(con, vm, inst, wl_pid)
        con.print(f"done in {time.monotonic() - t0:.1f} s; VM stopped")
    return 0


def _show_linux(con: Console, vm: VM) -> None:
    try:
        from vmsight.linux import processes  # Linux awareness (kallsyms/BTF found in guest memory)
    except ImportError:
        return
    t = time.monotonic()
    procs = processes(vm)
    con.print(table(("pid", "ppid", "uid", "state", "comm", "cmdline"),
                    ([p["pid"], p["ppid"], p["uid"], p["state"], p["comm"], str(p.get("cmdline", ""))[:60]]
                     for p in procs if p.get("cmdline") or p["pid"] < 3),
                    title=f"guest processes, found with no symbol files in {time.monotonic() - t:.2f} s"))
    con.print(f"({len(procs)} tasks in all; kernel threads without a command line left out)")


def _show_idle(con: Console, vm: VM, inst: VmInstance, pid: int) -> None:
    """Idle pages of a guest process, from its page tables' accessed bits, harvested from the host."""
    from vmsight.idle.guest import GuestIdleTracker
    from vmsight.idle.result import PageState

    addr = int(inst.agent.run("cat /tmp/wl.out").check().text.split()[1], 16)
    touched = list(range(0, 1024, 10))
    with GuestIdleTracker(vm, pid) as tracker:
        tracker.mark_idle()
        inst.agent.run(f"echo 'touch {','.join(map(str, touched))}' > /tmp/wl.cmd; kill -USR1 {pid}; sleep 0.3")
        snap = tracker.read()
    cols = ("VMA", "mapped KiB", "resident KiB", "accessed KiB", "idle KiB")
    con.print(table(cols, ([u.vma.label, u.vma.size >> 10, u.present_bytes >> 10, u.accessed_bytes >> 10,
                            u.idle_bytes >> 10] for u in snap.usage),
                    title=f"idle pages of guest pid {pid} ({snap.comm}) after it touched {len(touched)} of its "
                          "1024 pages — seen from the host", right=cols[1:]))
    first = addr >> 12
    seen = [int(v) - first for v in snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)
            if first <= v < first + 1024]
    con.print(f"accessed pages of the workload's mapping: {len(seen)} (it touched {len(touched)}; "
              f"exact match: {seen == touched})")
