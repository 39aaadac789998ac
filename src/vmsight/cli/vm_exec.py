"""``vmsight vm exec --dir DIR -- CMD...``"""

from __future__ import annotations

import argparse
import shlex
import sys

from vmsight.errors import TargetError
from vmsight.qemu.launch import load, stopped_message

NAME = "vm exec"
HELP = "run a command in the guest (through its agent); prints its output, exits with its status"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--host-root", action="store_true", help="run chrooted into the host's root (host_root guests)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command (after --)")


def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("vmsight: error: no command given (vmsight vm exec --dir DIR -- CMD...)", file=sys.stderr)
        return 2
    vm = load(args.dir)
    if stopped := stopped_message(args.dir, vm.to_json()):
        raise TargetError(stopped)
    text = cmd[0] if len(cmd) == 1 else shlex.join(cmd)
    r = vm.agent.run(text, timeout=args.timeout, root="host" if args.host_root else None)
    sys.stdout.buffer.write(r.stdout)
    sys.stderr.buffer.write(r.stderr)
    return r.rc
