"""Helpers shared by CLI commands: target attach, JSON output, hexdump."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vmsight.cli.main import require_vm
from vmsight.events.watchdog import supervise
from vmsight.vm import VM, attach


def open_vm(args: argparse.Namespace) -> VM:
    """Attach to --vm, with a watchdog that resumes it if this command dies while it is paused
    (unless --no-watchdog)."""
    vm = attach(require_vm(args), gdb=getattr(args, "gdb", None))
    if not getattr(args, "no_watchdog", False):
        try:
            supervise(vm)
        except BaseException:
            vm.close()
            raise
    return vm


def note_if_stopped(vm: VM) -> None:
    """Event commands leave a stopped VM stopped: say so, or they would seem to hang."""
    status = vm.status()
    if status != "running":
        print(f"vmsight: the VM is {status} and stays so: events come once it runs "
              "(`vmsight vm resume` or QMP cont)", file=sys.stderr, flush=True)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None if isinstance(obj, dict) and len(obj) < 4 else 2)
    sys.stdout.write("\n")


def hexdump(data: bytes, base: int) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + i:016x}  {hx:<47}  |{asc}|")
    return "\n".join(lines)
