"""``vmsight --vm DIR trace syscalls|exec|exit|switch|bp TARGET [--pid P] [--comm C] [--count N]``

strace and friends from outside the guest: each event is one line (JSON lines with ``--json``). The VM
keeps running afterwards; every breakpoint is removed on exit, Ctrl-C, SIGTERM and even SIGKILL (a
watchdog process detaches for a dead tracer)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vmsight.cli.common import (
    escape,
    int0,
    json_line,
    note_if_stopped,
    open_vm,
    positive_duration,
    positive_int0,
    symbol_type,
)
from vmsight.errors import VmsightError
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
from vmsight.memory.paging import is_canonical

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
    p.add_argument("--count", type=positive_int0, help="stop after N events")
    p.add_argument("--duration", type=positive_duration, help="stop after this long (5, 5s, 500ms, 2m)")
    p.add_argument("--regs", action="store_true", help="bp: print the registers at each hit")
    p.add_argument("--no-watchdog", action="store_true",
                   help="do not start the SIGKILL watchdog (a killed tracer would leave the VM stopped)")


def check_code_target(vm: Any, d: Dispatcher, target: int | str) -> None:
    """Refuse a breakpoint that can never fire: a non-canonical gva, one below the guest's mmap_min_addr
    (nothing is mapped there), or a kernel data symbol (kallsyms type not t/T/w/W)."""
    gva, symbol = d.resolve(target)
    if not is_canonical(gva, la57=vm.la57):
        raise VmsightError(f"gva {gva:#x} is not canonical ({57 if vm.la57 else 48}-bit): no code runs there")
    if gva < 1 << 63:  # user half (canonical, either paging mode)
        k = d.kernel
        floor = k.read_symbol_u64("mmap_min_addr") if k.has_symbol("mmap_min_addr") else 0x1000
        if gva < max(floor, 0x1000):
            raise VmsightError(f"gva {gva:#x} is below the guest's mmap_min_addr ({max(floor, 0x1000):#x}): "
                               "nothing can be mapped there")
        return
    hit = d.kernel.lookup(gva) if symbol is None else (symbol.partition("+")[0].strip(), 0)
    if hit is None or hit[0].startswith("["):
        return  # module text or an address kallsyms does not cover: the stub decides
    kind = symbol_type(d.kernel, hit[0])
    if kind not in "tTwW?":
        raise VmsightError(f"{escape(hit[0])} is a data symbol (kallsyms type {kind}), not code: a breakpoint "
                           f"there never fires; watch its accesses with `vmsight watch {escape(hit[0])} 8`")


def _argv(obj: object) -> str:
    """JSON for a terminal: json.dumps escapes C0, non-ASCII and invalid UTF-8 (surrogates), not DEL."""
    return json.dumps(obj).replace("\x7f", "\\u007f")


def _text(ev: Event, regs: dict[str, int] | None) -> str:
    head = f"{ev.time_ns / 1e9:.6f} cpu{ev.vcpu}" if ev.vcpu >= 0 else f"{ev.time_ns / 1e9:.6f} vm"
    if isinstance(ev, Syscall):
        return f"{head} {escape(format_syscall(ev))}"
    if isinstance(ev, ProcessExec):
        return f"{head} exec pid={ev.pid} {escape(ev.old_comm)} -> {escape(ev.filename)} {_argv(ev.argv)}"
    if isinstance(ev, ProcessExit):
        return f"{head} exit pid={ev.pid} tid={ev.tid} {escape(ev.comm)} code={ev.exit_code:#x}"
    if isinstance(ev, ContextSwitch):
        return (f"{head} switch {escape(ev.prev.comm)}[{ev.prev.tid}] -> {escape(ev.next.comm)}[{ev.next.tid}] "
                f"cr3={ev.cr3:#x}")
    if isinstance(ev, Breakpoint):
        line = f"{head} bp {escape(ev.symbol or hex(ev.gva))}"
        if regs:
            line += " " + " ".join(f"{k}={regs[k]:#x}" for k in ("rdi", "rsi", "rdx", "rcx", "r8", "r9", "rsp", "cr3"))
        return line
    if isinstance(ev, VmLifecycle):
        return f"{head} {ev.what.value} {_argv(ev.data)}"
    return f"{head} {ev.kind}"


def run(args: argparse.Namespace) -> int:
    if args.what == "bp" and not args.target:
        raise VmsightError("trace bp: give a kernel symbol or a gva (0x...)")
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

            check_code_target(vm, d, target)
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
                sys.stdout.write(json_line(ev.as_dict()) + "\n")
            else:
                sys.stdout.write(_text(ev, regs_of.pop(ev.seq, None)) + "\n")
            sys.stdout.flush()
            if isinstance(ev, VmLifecycle) and d.stats.events and ev.what.value == "SHUTDOWN":
                break
        stats = d.stats.as_dict()
    print(f"vmsight: {n} events; stops {stats['stops']}, filtered {stats['filtered']}, "
          f"steps {stats['steps']}, skips {stats['skips']}", file=sys.stderr)
    return 0
