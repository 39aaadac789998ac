"""``vmsight --vm DIR watch GVA|SYMBOL LEN [--access r|w|rw] [--gpa] [--count N]``

Report accesses to guest memory (TCG watchpoints, by guest-virtual address; traps come after the
access). ``--gpa`` watches a guest-physical range through its kernel aliases (direct map, kernel image);
user-space mappings of the same page are not covered. The VM keeps running afterwards."""

from __future__ import annotations

import argparse
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
)
from vmsight.errors import VmsightError
from vmsight.events import Dispatcher, Event, PageAccess
from vmsight.memory.paging import is_canonical, is_kernel_half

NAME = "watch"
HELP = "report reads/writes of a guest memory range (watchpoints)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("where", help="gva (0x...), kernel symbol (symbol+0xoff), or gpa with --gpa")
    p.add_argument("length", type=int0, help="bytes to watch")
    p.add_argument("--access", choices=("r", "w", "rw"), default="w", help="access kind (default: w)")
    p.add_argument("--gpa", action="store_true", help="WHERE is a guest-physical address")
    p.add_argument("--count", type=positive_int0, help="stop after N accesses")
    p.add_argument("--duration", type=positive_duration, help="stop after this long (5, 5s, 500ms, 2m)")
    p.add_argument("--no-watchdog", action="store_true", help="do not start the SIGKILL watchdog")


def run(args: argparse.Namespace) -> int:
    values: dict[int, bytes] = {}
    symbols: dict[int, str] = {}
    n = 0
    with open_vm(args) as vm, Dispatcher(vm, supervise=not args.no_watchdog) as d:

        def grab(ev: Event) -> None:
            assert isinstance(ev, PageAccess)
            try:
                values[ev.seq] = ev.read(ev.gva, min(ev.length, 64))
            except Exception:  # noqa: BLE001 - the value is a courtesy; the access is what counts
                values[ev.seq] = b""
            if is_kernel_half(ev.rip, la57=vm.la57):
                try:
                    symbols[ev.seq] = d.kernel.symbolize(ev.rip)
                except Exception:  # noqa: BLE001 - same
                    pass

        if args.gpa:
            handles = d.watch_gpa(int0(args.where), args.length, args.access, grab)
        else:
            where: Any = args.where
            try:
                where = int0(args.where)
            except argparse.ArgumentTypeError:
                pass
            gva, _ = d.resolve(where)
            if not is_canonical(gva, la57=vm.la57) or not is_canonical(gva + args.length - 1, la57=vm.la57):
                raise VmsightError(f"gva {gva:#x}+{args.length:#x} is not canonical "
                                   f"({57 if vm.la57 else 48}-bit): nothing can be accessed there")
            handles = [d.add_watchpoint(gva, args.length, args.access, grab)]
        for h in handles:
            print(f"vmsight: watching {h.gva:#x}+{h.length:#x} for {h.access.value}"
                  + (f" (alias of gpa {h.alias_of_gpa:#x})" if h.alias_of_gpa is not None else ""),
                  file=sys.stderr, flush=True)
        note_if_stopped(vm)
        for ev in d.events(duration=args.duration):
            if not isinstance(ev, PageAccess):
                continue
            n += 1
            val = values.pop(ev.seq, b"")
            sym = symbols.pop(ev.seq, None)
            if args.json:
                rec = ev.as_dict()
                rec["value_hex"] = val.hex()
                rec["rip_symbol"] = sym
                sys.stdout.write(json_line(rec) + "\n")
            else:
                sys.stdout.write(f"{ev.time_ns / 1e9:.6f} cpu{ev.vcpu} {ev.access.value} {ev.gva:#x}+{ev.length:#x} "
                                 f"rip={escape(sym or hex(ev.rip))} value={val.hex()}\n")
            sys.stdout.flush()
            if args.count is not None and n >= args.count:
                break
    return 0
