"""``vmsight --vm X read-phys GPA SIZE``"""

from __future__ import annotations

import argparse

from vmsight.cli.common import int0, open_vm, positive_int0, show

NAME = "read-phys"
HELP = "read guest-physical memory (RAM only; MMIO is refused)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gpa", type=int0)
    p.add_argument("size", type=positive_int0, help="bytes to read (>= 1)")
    p.add_argument("--raw", action="store_true", help="write the bytes to stdout")


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        data = vm.read_gpa(args.gpa, args.size)
        backend = vm.backend
    return show(args, data, args.gpa, {"gpa": args.gpa, "backend": backend})
