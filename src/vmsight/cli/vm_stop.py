"""``vmsight vm stop --dir DIR``"""

from __future__ import annotations

import argparse

from vmsight.qemu.launch import load

NAME = "vm stop"
HELP = "stop a guest started with `vmsight vm launch`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True)


def run(args: argparse.Namespace) -> int:
    load(args.dir).stop()
    return 0
