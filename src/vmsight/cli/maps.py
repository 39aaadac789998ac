"""``vmsight --vm X maps PID``: a guest process's memory map, like /proc/PID/maps."""

from __future__ import annotations

import argparse

from vmsight.cli.common import add_dump_options, emit_json, escape, open_machine
from vmsight.linux import paused_kernel
from vmsight.linux.mm import task_vmas

NAME = "maps"
HELP = "show a guest process's memory mappings (VMAs), like /proc/PID/maps"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dump_options(p)
    p.add_argument("pid", type=int)


def run(args: argparse.Namespace) -> int:
    with open_machine(args) as vm:
        with paused_kernel(vm) as k:
            vmas = task_vmas(k, args.pid)
    if args.json:
        emit_json([v.as_dict() for v in vmas])
        return 0
    for v in vmas:
        print(escape(v.maps_line()))
    return 0
