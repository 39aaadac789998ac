"""``vmsight`` command line: one module per command, one table of commands.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
The global options (``--vm DIR|QMP_SOCKET``, ``--gdb``, ``--json``, ``-v``) go before or after the command.
Library errors (:class:`vmsight.errors.VmsightError`) become one line on stderr and a non-zero exit; any other
exception is a bug, reported as one line too (the traceback with ``-vv``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from types import ModuleType

# vmsight does no linear algebra: without this, importing numpy starts OpenBLAS's thread pool, which took
# ~80 ms of a 0.4 s first sight here (measured: `import numpy` 0.18 s -> 0.09 s on this 2-core machine).
# A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vmsight.cli import signals
from vmsight.cli.common import escape
from vmsight.errors import VmsightError

# Command name -> module, in the order `vmsight --help` lists them. A name with a space ("vm launch") is a
# sub-command of a group. Only the module of the command being run is imported (`vmsight ps` pays for
# nothing else); every module's NAME equals its key here (tests/unit/test_cli_options.py).
COMMANDS: dict[str, str] = {
    "demo": "vmsight.cli.demo",
    "vm launch": "vmsight.cli.vm",
    "vm exec": "vmsight.cli.vm_exec",
    "vm stop": "vmsight.cli.vm_stop",
    "vm resume": "vmsight.cli.vm_resume",
    "vm libvirt-xml": "vmsight.cli.vm_libvirt_xml",
    "vms": "vmsight.cli.vms",
    "regs": "vmsight.cli.regs",
    "read-phys": "vmsight.cli.read_phys",
    "read-virt": "vmsight.cli.read_virt",
    "translate": "vmsight.cli.translate",
    "ps": "vmsight.cli.ps",
    "maps": "vmsight.cli.maps",
    "lsmod": "vmsight.cli.lsmod",
    "sym": "vmsight.cli.sym",
    "uname": "vmsight.cli.uname",
    "trace": "vmsight.cli.trace",
    "watch": "vmsight.cli.watch",
    "idle": "vmsight.cli.idle",
    "kvmi": "vmsight.cli.kvmi",
}
_VALUED = ("--vm", "--gdb")   # global options that take a value


log = logging.getLogger("vmsight")


def _command_at(argv: list[str]) -> tuple[str | None, int]:
    """The command ``argv`` names ("ps", "vm launch") and the index just past its words, found without
    importing anything; (None, -1) for help, a group without its sub-command, a typo (then every command is
    loaded, for argparse's own messages)."""
    words: list[str] = []
    skip = False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
        elif tok == "--":
            break
        elif tok.startswith("-"):
            skip = tok in _VALUED
        else:
            words.append(tok)
            if len(words) == 2 or words[0] in COMMANDS:
                key = " ".join(words)
                return (key, i + 1) if key in COMMANDS else (None, -1)
    return None, -1


def _selected(argv: list[str]) -> str | None:
    return _command_at(argv)[0]


def _with_default_subcommand(argv: list[str]) -> list[str]:
    """A command that is a group of its own (``idle live|record|...``) may take its words without one
    (``vmsight idle PID`` = ``vmsight idle live PID``): its module's ``with_default_subcommand`` says."""
    key, end = _command_at(argv)
    if key is None:
        return argv
    fix = getattr(importlib.import_module(COMMANDS[key]), "with_default_subcommand", None)
    return argv if fix is None else [*argv[:end], *fix(argv[end:])]


def _load_commands(only: str | None = None) -> list[ModuleType]:
    mods = []
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mods.append(importlib.import_module(module))
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside an existing command
                raise
    return mods


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("vmsight")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_global_options(p: argparse.ArgumentParser, level: str = "") -> None:
    """The options every command takes, before or after its name (drgn and virsh users type them in either
    place). ``level`` is "" for the top parser; for a command or group parser ("command", "group") every
    default is SUPPRESS, so a value given before the command is not overwritten by a subparser default, and
    ``-v`` counts into its own dest (summed in :func:`main`) because each parser level has its own namespace.
    An option a command declares itself (e.g. its own ``--json`` help) is kept."""
    top = level == ""

    def add(*flags: str, default: object, **kw: object) -> None:
        if any(f in p._option_string_actions for f in flags):  # noqa: SLF001 - argparse has no public query
            return
        p.add_argument(*flags, default=default if top else argparse.SUPPRESS, **kw)  # type: ignore[arg-type]

    add("--vm", metavar="DIR|QMP_SOCKET|tcp:HOST:PORT|libvirt:DOMAIN", default=os.environ.get("VMSIGHT_VM"),
        help="target VM: a `vmsight vm launch` directory, a QEMU QMP socket, QMP over TCP for a QEMU on "
             "another machine, or a libvirt domain (name, UUID or id; read-only, never tainted) (env VMSIGHT_VM)")
    add("-c", "--connect", metavar="URI", default=None,
        help="libvirt URI for --vm libvirt:DOMAIN, as virsh -c (default $LIBVIRT_DEFAULT_URI, else qemu:///system "
             "as root, qemu:///session otherwise)")
    add("--allow-taint", action="store_true", default=False,
        help="with --vm libvirt:DOMAIN: allow run control (regs, trace, watch) through libvirt's monitor "
             "passthrough; libvirt then reports the domain tainted (custom-monitor)")
    add("--gdb", metavar="SOCKET|tcp:HOST:PORT", default=os.environ.get("VMSIGHT_GDB"),
        help="the VM's gdbstub, when --vm is a bare QMP socket or a remote tcp:HOST:PORT (env VMSIGHT_GDB)")
    add("--json", action="store_true", default=False, help="machine-readable output (JSON lines for streams)")
    add("-v", "--verbose", action="count", default=0, dest="verbose" if top else f"verbose_{level}",
        help="log more (-vv for debug and tracebacks)")


class _Version(argparse.Action):
    """--version, reading the package metadata only when asked (importlib.metadata costs ~20 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"vmsight {_version()}")
        parser.exit()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names is loaded (with its arguments and help)."""
    p = argparse.ArgumentParser(prog="vmsight", description="See inside running Linux VMs and processes.")
    add_global_options(p)
    p.add_argument("--version", action=_Version, nargs=0, help="show vmsight's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for mod in _load_commands(None if argv is None else _selected(argv)):
        words = mod.NAME.split()
        if len(words) == 1:
            sp = sub.add_parser(words[0], help=mod.HELP, description=mod.HELP)
        else:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=getattr(mod, "GROUP_HELP", f"{words[0]} commands"))
                add_global_options(gp, "group")
                groups[words[0]] = gp.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND",
                                                     required=True)
            sp = groups[words[0]].add_parser(words[1], help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        add_global_options(sp, "command")
        for inner in _inner_parsers(sp):   # a command module's own sub-commands (idle live, idle record...)
            add_global_options(inner, "subcommand")
        sp.set_defaults(_run=mod.run, command_name=mod.NAME)
    return p


def _inner_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [c for a in p._actions if isinstance(a, argparse._SubParsersAction)  # noqa: SLF001
            for c in a.choices.values()]


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the command line; ``verbose`` counts every ``-v``, wherever it was given."""
    argv = _with_default_subcommand(list(sys.argv[1:] if argv is None else argv))
    args = (parser or build_parser()).parse_args(argv)
    args.verbose += sum(getattr(args, f"verbose_{level}", 0) for level in ("group", "command", "subcommand"))
    return args


def main(argv: list[str] | None = None) -> int:
    signals.install()  # SIGTERM/SIGHUP/SIGINT unwind cleanly: the VM is left as found
    # Guest bytes that are not UTF-8 arrive as surrogates (surrogateescape): a print path that forgot
    # cli.common.escape must show them as \x.. rather than die with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, parser)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except VmsightError as e:
        print(f"vmsight: error: {escape(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: still one line, the traceback on request
        if args.verbose >= 2:
            traceback.print_exc()
        print(f"vmsight: internal error: {type(e).__name__}: {escape(str(e))}"
              + ("" if args.verbose >= 2 else " (run with -vv for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
