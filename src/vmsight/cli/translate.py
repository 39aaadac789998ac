"""``vmsight --vm X translate GVA [--dtb X | --pid P]``: every level's entry and flags."""

from __future__ import annotations

import argparse

from vmsight.cli.common import emit_json, flags, int0, open_vm, resolve_dtb
from vmsight.errors import TranslationFault

NAME = "translate"
HELP = "translate a guest-virtual address, showing each paging level's entry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gva", type=int0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dtb", type=int0, help="page-table root (CR3 value); default: vCPU 0's CR3")
    g.add_argument("--pid", type=int, help="use this guest process's page tables")


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        with vm.paused():
            dtb = resolve_dtb(vm, args)
            try:
                t = vm.translate(args.gva, dtb)
            except TranslationFault as fault:
                if args.json:
                    emit_json({"gva": args.gva, "dtb": dtb, "fault": {"level": fault.level, "entry": fault.entry,
                                                                      "reason": fault.reason}})
                raise
    if args.json:
        emit_json({"gva": t.gva, "dtb": dtb, "gpa": t.gpa, "page_size": t.page_size,
                   "entries": [{"level": e.level, "name": e.name, "entry_gpa": e.entry_gpa, "value": e.value,
                                "flags": flags(e)} for e in t.entries]})
        return 0
    print(f"gva {t.gva:#018x}  dtb {dtb:#x}")
    for e in t.entries:
        print(f"  {e.name:<5} @gpa {e.entry_gpa:#012x} = {e.value:#018x}  {' '.join(flags(e))}")
    print(f"-> gpa {t.gpa:#x} ({t.page_size >> 10} KiB page)")
    return 0
