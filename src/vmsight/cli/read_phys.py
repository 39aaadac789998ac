"""``vmsight --vm X read-phys GPA SIZE``"""

from __future__ import annotations

import argparse
import sys

from vmsight.cli.common import emit_json, hexdump, open_vm
from vmsight.cli.main import int0, positive_int0

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


def show(args: argparse.Namespace, data: bytes, base: int, meta: dict[str, object]) -> int:
    if args.raw:
        sys.stdout.buffer.write(data)
    elif args.json:
        emit_json({**meta, "size": len(data), "hex": data.hex()})
    else:
        print(hexdump(data, base))
    return 0
