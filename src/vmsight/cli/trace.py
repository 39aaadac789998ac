"""``vmsight --vm DIR trace syscalls|exec|exit|switch|bp TARGET [--pid P] [--comm C] [--count N]``

strace and friends from outside the guest: each event is one line (JSON lines with ``--json``). The VM
keeps running afterwards; every breakpoint is removed on exit, Ctrl-C, SIGTERM and even SIGKILL (a
watchdog process detaches for a dead tracer)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vmsight.cli.common import note_if_stopped, open_vm
from vmsight.cli.main import int0
from vmsight.events import (
    Breakpoint,
    ContextSwitch,
    Dispatcher,
    Event,
    ProcessExec,
    ProcessExit,
    Syscall,
    VmLifecycle,
)
from vmsight.events.linux import LinuxEvents, format_syscall

NAME = "trace"
HELP = "trace guest events from outside: syscalls, exec, exit, context switches, breakpoints"
WHAT = ("syscalls", "exec", "exit", "switch", "bp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="event source")
    p.add_argument("target", nargs="?", help="for bp: kernel symbol (symbol+0xoff) or gva")
    p.add_argument("--pid", type=int, help="only this process (thread-group id) or thread id")
    p.add_argument("--comm", help="only tasks with this command name (exact, as in ps)")
    p.add_argument("--syscall", action="append", dest="syscalls", metavar="NAME",
                   help="syscalls: only these (repeatable)")
    p.add_argument("--count", type=int, help="stop after N events")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--regs", action="store_true", help="bp: print the registers at each hit")
    p.add_argument("--no-watchdog", action="store_true",
                   help="do not start the SIGKILL watchdog (a killed tracer would leave the VM stopped)")


def _text(ev: Event, regs: dict[str, int] | None) -> str:
    head = f"{ev.time_ns / 1e9:.6f} cpu{ev.vcpu}" if ev.vcpu >= 0 else f"{ev.time_ns / 1e9:.6f} vm"
    if isinstance(ev, Syscall):
        return f"{head} {format_syscall(ev)}"
    if isinstance(ev, ProcessExec):
        return f"{head} exec pid={ev.pid} {ev.old_comm} -> {ev.filename} {json.dumps(list(ev.argv))}"
    if isinstance(ev, ProcessExit):
        return f"{head} exit pid={ev.pid} tid={ev.tid} {ev.comm} code={ev.exit_code:#x}"
    if isinstance(ev, ContextSwitch):
        return (f"{head} switch {ev.prev.comm}[{ev.prev.tid}] -> {ev.next.comm}[{ev.next.tid}] "
                f"cr3={ev.cr3:#x}")
    if isinstance(ev, Breakpoint):
        line = f"{head} bp {ev.symbol or hex(ev.gva)}"
        if regs:
            line += " " + " ".join(f"{k}={regs[k]:#x}" for k in ("rdi", "rsi", "rdx", "rcx", "r8", "r9", "rsp", "cr3"))
        return line
    if isinstance(ev, VmLifecycle):
        return f"{head} {ev.what.value} {json.dumps(ev.data)}"
    return f"{head} {ev.kind}"


def run(args: argparse.Namespace) -> int:
    if args.what == "bp" and not args.target:
        raise SystemExit("vmsight trace bp: give a kernel symbol or a gva (0x...)")
    regs_of: dict[int, dict[str, int]] = {}
    n = 0
    with open_vm(args) as vm, Dispatcher(vm, supervise=not args.no_watchdog) as d:
        if args.what == "bp":
            target: Any = args.target
            try:
                target = int0(args.target)
            except argparse.ArgumentTypeError:
                pass

            def keep_regs(ev: Event) -> None:
                if args.regs:
                    regs_of[ev.seq] = ev.registers()

            d.add_breakpoint(target, keep_regs)
        else:
            lx = LinuxEvents(d)
            if args.what == "syscalls":
                lx.syscalls(pid=args.pid, comm=args.comm, names=args.syscalls)
            elif args.what == "exec":
                lx.execs(pid=args.pid, comm=args.comm)
            elif args.what == "exit":
                lx.exits(pid=args.pid, comm=args.comm)
            else:
                lx.context_switches(pid=args.pid, comm=args.comm)
        print(f"vmsight: tracing {args.what} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        note_if_stopped(vm)
        for ev in d.events(count=args.count, duration=args.duration):
            n += 1
            if args.json:
                sys.stdout.write(json.dumps(ev.as_dict()) + "\n")
            else:
                sys.stdout.write(_text(ev, regs_of.pop(ev.seq, None)) + "\n")
            sys.stdout.flush()
            if isinstance(ev, VmLifecycle) and d.stats.events and ev.what.value == "SHUTDOWN":
                break
        stats = d.stats.as_dict()
    print(f"vmsight: {n} events; stops {stats['stops']}, filtered {stats['filtered']}, "
          f"steps {stats['steps']}, skips {stats['skips']}", file=sys.stderr)
    return 0
