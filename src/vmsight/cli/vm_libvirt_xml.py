"""``vmsight vm libvirt-xml [--monitor DIR]``: the domain XML fragments that make a libvirt domain fully
introspectable: shared memfd RAM (fast, coherent, no taint), optionally vmsight's own QMP socket and gdbstub
for run control (libvirt then reports the domain tainted from its start)."""

from __future__ import annotations

import argparse

from vmsight.libvirt import introspection_xml

NAME = "vm libvirt-xml"
HELP = "print the libvirt domain XML that makes a domain fully introspectable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor", metavar="DIR",
                   help="also a QMP socket and gdbstub in DIR for run control (trace, watch, regs); taints the domain")


def run(args: argparse.Namespace) -> int:
    print(introspection_xml(monitor_dir=args.monitor), end="")
    return 0
