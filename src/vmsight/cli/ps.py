"""``vmsight --vm X ps [--threads]``: guest processes read from guest memory (no guest agent)."""

from __future__ import annotations

import argparse

from vmsight.cli.common import add_dump_options, emit_json, open_machine, text_table
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
    print(text_table(("PID", "PPID", "UID", "S", "COMMAND"),
                     [(p["pid"], p["ppid"], p["uid"], p["state"], p["cmdline"] or f"[{p['comm']}]") for p in procs],
                     right=("PID", "PPID", "UID")))
    return 0
