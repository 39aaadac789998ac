"""``vmsight --vm X lsmod``: loaded guest kernel modules (name, base, size)."""

from __future__ import annotations

import argparse

from vmsight.cli.common import add_dump_options, emit_json, open_machine, text_table
from vmsight.linux import paused_kernel
from vmsight.linux.modules import lsmod

NAME = "lsmod"
HELP = "list the guest's loaded kernel modules"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dump_options(p)


def run(args: argparse.Namespace) -> int:
    with open_machine(args) as vm:
        with paused_kernel(vm) as k:
            mods = lsmod(k)
    if args.json:
        emit_json(mods)
        return 0
    print(text_table(("Module", "Size", "Base", "State"),
                     [(m["name"], m["size"], f"{m['base']:#018x}", m["state"]) for m in mods], right=("Size",)))
    return 0
