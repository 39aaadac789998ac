"""``vmsight vm resume --vm DIR|QMP_SOCKET``: resume a VM that something left paused.

A command killed mid-pause, a debugger that died attached, or anyone's QMP ``stop`` can leave a VM
stopped. Breakpoints a dead debugger left behind would stop it again at their first hit, so when the VM
has a gdbstub and it is free, vmsight first connects and detaches (``D;1``: QEMU drops every gdb
breakpoint and watchpoint and resumes); then QMP ``cont`` if it is still not running."""

from __future__ import annotations

import argparse
import os
import sys

from vmsight.cli.common import require_vm
from vmsight.errors import TargetError
from vmsight.events.watchdog import cleanup
from vmsight.qemu.qmp import Qmp

NAME = "vm resume"
HELP = "resume a VM left paused (dropping breakpoints a dead debugger left)"
_CANNOT_RESUME = ("shutdown", "internal-error", "guest-panicked")


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # --vm and --gdb are the global options (accepted after the command too)


def _sockets(target: str, gdb: str | None) -> tuple[str, str | None]:
    if os.path.isdir(target):
        from vmsight.qemu.launch import load, stopped_message

        inst = load(target)
        if stopped := stopped_message(target, inst.to_json()):
            raise TargetError(stopped)
        return inst.qmp, gdb or inst.gdb
    return target, gdb


def run(args: argparse.Namespace) -> int:
    qmp_path, gdb = _sockets(require_vm(args), getattr(args, "gdb", None))
    # QMP first: a live vmsight command (or any QMP client) holds it, and then its gdbstub too; touching
    # that stub would queue a connection that stops the VM when the holder leaves.
    with Qmp(qmp_path) as q:
        before = q.status()
        if before == "running":
            print("vmsight: the VM is already running", file=sys.stderr)
            return 0
        if before in _CANNOT_RESUME:
            raise TargetError(f"the VM is {before}: it cannot resume; reset it (HMP system_reset) or stop it")
        if gdb and not cleanup(gdb, set(), deadline_s=2.0):
            print(f"vmsight: the gdbstub at {gdb} does not answer (another debugger attached?): "
                  "resuming over QMP only; breakpoints it holds stay", file=sys.stderr)
        if q.status() != "running":
            q.execute("cont")
        after = q.status()
    print(f"vmsight: VM was {before}, now {after}", file=sys.stderr)
    return 0 if after == "running" else 1
