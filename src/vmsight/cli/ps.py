"""``vmsight --vm X ps [--threads]``: guest processes read from guest memory (no guest agent)."""

from __future__ import annotations

import argparse

from vmsight.cli.common import add_dump_options, emit_json, escape, open_machine
from vmsight.linux import processes

NAME = "ps"
HELP = "list guest processes (from the guest kernel's task list)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dump_options(p)
    p.add_argument("--threads", action="store_true", help="list every thread, not only processes")


def run(args: argparse.Namespace) -> int:
    with open_machine(args) as vm:
        procs = processes(vm, threads=args.threads)
    if args.json:
        emit_json([{key: p[key] for key in ("pid", "tgid", "ppid", "uid", "gid", "state", "comm", "task_comm", "cmdline")}
                   for p in procs])
        return 0
    print(f"{'PID':>7} {'PPID':>7} {'UID':>5} S COMMAND")
    for p in procs:
        print(f"{p['pid']:>7} {p['ppid']:>7} {p['uid']:>5} {p['state']} {escape(p['cmdline'] or '[' + p['comm'] + ']')}")
    return 0
