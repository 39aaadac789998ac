"""``vmsight --vm X read-virt GVA SIZE [--dtb X | --pid P]``"""

from __future__ import annotations

import argparse

from vmsight.cli.common import open_vm
from vmsight.cli.main import int0, positive_int0
from vmsight.cli.read_phys import show
from vmsight.vm import VM

NAME = "read-virt"
HELP = "read guest-virtual memory through the guest's page tables"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gva", type=int0)
    p.add_argument("size", type=positive_int0, help="bytes to read (>= 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dtb", type=int0, help="page-table root (CR3 value); default: vCPU 0's CR3")
    g.add_argument("--pid", type=int, help="use this guest process's page tables (user half, PTI aware)")
    p.add_argument("--raw", action="store_true", help="write the bytes to stdout")


def resolve_dtb(vm: VM, args: argparse.Namespace) -> int:
    if getattr(args, "pid", None) is not None:
        from vmsight.linux import process_dtb  # the Linux layer: pid -> the task's user page tables

        return int(process_dtb(vm, args.pid))
    return int(args.dtb) if args.dtb is not None else vm.current_dtb()


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        with vm.paused():
            dtb = resolve_dtb(vm, args)
            data = vm.read_gva(args.gva, args.size, dtb)
    return show(args, data, args.gva, {"gva": args.gva, "dtb": dtb})
