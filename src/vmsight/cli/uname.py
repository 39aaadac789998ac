"""``vmsight --vm X uname [--set-hostname NAME]``: the guest's utsname (init_uts_ns) and kernel facts."""

from __future__ import annotations

import argparse

from vmsight.cli.common import emit_json, open_vm
from vmsight.linux import kernel_of, set_hostname, uname

NAME = "uname"
HELP = "show the guest kernel's uname (read from init_uts_ns), KASLR slide and bases"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set-hostname", metavar="NAME",
                   help="write NAME into init_uts_ns.name.nodename (what the guest's `hostname` prints)")
    p.add_argument("-a", "--all", action="store_true", help="also show discovery facts (bases, slide, ...)")


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        k = kernel_of(vm)
        with vm.paused():
            if args.set_hostname is not None:
                set_hostname(k, args.set_hostname)
            u = uname(k)
            facts = k.facts()
            facts["cmdline"] = k.saved_command_line()
    if args.json:
        emit_json({**u, "kernel": facts} if args.all else u)
        return 0
    print(" ".join(u[f] for f in ("sysname", "nodename", "release", "version", "machine")))
    if args.all:
        for key, val in facts.items():
            print(f"  {key:<18} {val:#x}" if isinstance(val, int) and not isinstance(val, bool) and val > 9
                  else f"  {key:<18} {val}")
    return 0
