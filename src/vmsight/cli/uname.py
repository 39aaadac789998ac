"""``vmsight --vm X uname [--set-hostname NAME]``: the guest's utsname (init_uts_ns) and kernel facts."""

from __future__ import annotations

import argparse
import os

from vmsight.cli.common import add_dump_options, emit_json, escape, open_machine
from vmsight.linux import paused_kernel, set_hostname, uname

NAME = "uname"
_HOST_NAME_MAX = 64  # __NEW_UTS_LEN: init_uts_ns.name.nodename is 65 bytes with the NUL
HELP = "show the guest kernel's uname (read from init_uts_ns), KASLR slide and bases"


def hostname_arg(text: str) -> str:
    """argparse type for --set-hostname: what the guest's `hostname` would accept and print sanely: 1-64
    bytes of printable UTF-8 (argv bytes that are not UTF-8 arrive as surrogates: refused, not a traceback)."""
    raw = os.fsencode(text)
    if not 0 < len(raw) <= _HOST_NAME_MAX:
        raise argparse.ArgumentTypeError(f"a hostname is 1-{_HOST_NAME_MAX} bytes, not {len(raw)}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError(f"not UTF-8: {escape(text)}") from None
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"control or non-printable characters in {escape(text)}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dump_options(p)
    p.add_argument("--set-hostname", metavar="NAME", type=hostname_arg,
                   help="write NAME into init_uts_ns.name.nodename (what the guest's `hostname` prints)")
    p.add_argument("-a", "--all", action="store_true", help="also show discovery facts (bases, slide, ...)")


def run(args: argparse.Namespace) -> int:
    with open_machine(args) as vm:
        with paused_kernel(vm) as k:
            if args.set_hostname is not None:
                set_hostname(k, args.set_hostname)
            u = uname(k)
            facts = k.facts()
            facts["cmdline"] = k.saved_command_line()
    if args.json:
        emit_json({**u, "kernel": facts} if args.all else u)
        return 0
    print(escape(" ".join(u[f] for f in ("sysname", "nodename", "release", "version", "machine"))))
    if args.all:
        for key, val in facts.items():
            print(f"  {key:<18} {val:#x}" if isinstance(val, int) and not isinstance(val, bool) and val > 9
                  else f"  {key:<18} {escape(str(val))}")
    return 0
