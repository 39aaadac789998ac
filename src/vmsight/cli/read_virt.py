"""``vmsight --vm X read-virt GVA SIZE [--dtb X | --pid P]``"""

from __future__ import annotations

import argparse

from vmsight.cli.common import int0, open_vm, positive_int0, resolve_dtb, show

NAME = "read-virt"
HELP = "read guest-virtual memory through the guest's page tables"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gva", type=int0)
    p.add_argument("size", type=positive_int0, help="bytes to read (>= 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dtb", type=int0, help="page-table root (CR3 value); default: vCPU 0's CR3")
    g.add_argument("--pid", type=int, help="use this guest process's page tables (user half, PTI aware)")
    p.add_argument("--raw", action="store_true", help="write the bytes to stdout")


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        with vm.paused():
            dtb = resolve_dtb(vm, args)
            data = vm.read_gva(args.gva, args.size, dtb)
    return show(args, data, args.gva, {"gva": args.gva, "dtb": dtb})
