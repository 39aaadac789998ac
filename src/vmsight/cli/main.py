"""``vmsight`` command line: one module per command, one table of commands.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Commands that look at a VM read the global ``--vm DIR|QMP_SOCKET``; ``--json`` is global too.
Library errors (:class:`vmsight.errors.VmsightError`) become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

from vmsight.errors import VmsightError

# (module, ...) in the order `vmsight --help` lists them. A module's NAME may contain a space
# ("vm launch") to make a sub-command group.
COMMANDS: list[str] = [
    "vmsight.cli.demo",
    "vmsight.cli.vm",
    "vmsight.cli.vm_exec",
    "vmsight.cli.vm_stop",
    "vmsight.cli.regs",
    "vmsight.cli.read_phys",
    "vmsight.cli.read_virt",
    "vmsight.cli.translate",
    "vmsight.cli.ps",
    "vmsight.cli.maps",
    "vmsight.cli.lsmod",
    "vmsight.cli.sym",
    "vmsight.cli.uname",
    "vmsight.cli.trace",
    "vmsight.cli.watch",
    "vmsight.cli.idle",
]

log = logging.getLogger("vmsight")


def _load_commands() -> list[ModuleType]:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside an existing command
                raise
    return mods


def int0(text: str) -> int:
    """argparse type for numbers that may be hex (``0x...``)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal, or hex with 0x)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmsight", description="See inside running Linux VMs and processes.")
    p.add_argument("--vm", metavar="DIR|QMP_SOCKET|tcp:HOST:PORT", default=os.environ.get("VMSIGHT_VM"),
                   help="target VM: a `vmsight vm launch` directory, a QEMU QMP socket, or QMP over TCP for a "
                        "QEMU on another machine (env VMSIGHT_VM)")
    p.add_argument("--gdb", metavar="SOCKET|tcp:HOST:PORT", default=os.environ.get("VMSIGHT_GDB"),
                   help="the VM's gdbstub, when --vm is a bare QMP socket or a remote tcp:HOST:PORT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for mod in _load_commands():
        words = mod.NAME.split()
        if len(words) == 1:
            sp = sub.add_parser(words[0], help=mod.HELP, description=mod.HELP)
        else:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=getattr(mod, "GROUP_HELP", f"{words[0]} commands"))
                groups[words[0]] = gp.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND",
                                                     required=True)
            sp = groups[words[0]].add_parser(words[1], help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except VmsightError as e:
        print(f"vmsight: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def require_vm(args: argparse.Namespace) -> str:
    """The --vm value, or a clear error."""
    if not args.vm:
        raise VmsightError("no target VM: pass --vm DIR (from `vmsight vm launch --dir DIR`) or --vm QMP_SOCKET")
    return str(args.vm)


if __name__ == "__main__":
    sys.exit(main())
