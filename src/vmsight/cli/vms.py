"""``vmsight vms [-c URI]``: the VMs vmsight can reach: the libvirt domains of a connection and the VMs
`vmsight vm launch` started (found through their private runtime directories in /dev/shm), each with its
state, vCPUs, memory and how vmsight would read its RAM."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

from vmsight.cli.common import emit_json, escape, text_table
from vmsight.errors import VmsightError

log = logging.getLogger(__name__)

NAME = "vms"
HELP = "list the VMs vmsight can attach to: libvirt domains (-c URI) and VMs started by `vmsight vm launch`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-libvirt", action="store_true", help="only the VMs `vmsight vm launch` started")


def launched_vms(shm: str = "/dev/shm") -> list[dict[str, Any]]:
    """VMs of this user started by `vmsight vm launch`: each has a private runtime directory naming its VM
    directory, whose vm.json is read as `vmsight vm stop` reads it (nothing is connected to)."""
    from vmsight.qemu.launch import load, runtime_dir_vm, stopped_message

    out = []
    for rt in sorted(Path(shm).glob("vmsight-*")):
        try:
            st = rt.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        d = runtime_dir_vm(str(rt))
        if not d:
            continue
        try:
            inst = load(d)
        except VmsightError as e:
            log.info("%s: %s", d, e)
            continue
        if inst.runtime_dir != str(rt):  # a vm.json that does not point back is not this runtime dir's VM
            continue
        stopped = stopped_message(d, {"pid": inst.pid, "qmp": inst.qmp})
        backend = str(inst.config.get("ram_backend", "file"))
        ram = {"file": "mapped-ram-file (shared file)", "memfd": "mapped-ram-file (shared memfd)"}.get(
            backend, "proc-pid-mem (root)")
        out.append({"target": d, "name": os.path.basename(d), "id": inst.pid, "uuid": None,
                    "state": "shut off" if stopped else "running", "vcpus": int(inst.config.get("smp", 1)),
                    "memory_bytes": inst.ram_size, "ram": ram, "uri": None})
    return out


def run(args: argparse.Namespace) -> int:
    rows = launched_vms()
    if not args.no_libvirt:
        from vmsight.libvirt import list_domains

        try:
            rows += list_domains(args.connect)
        except VmsightError as e:
            if args.connect:  # asked for explicitly: its failure is the answer
                raise
            print(f"vmsight: libvirt: {escape(str(e))}", file=sys.stderr)
    if args.json:
        emit_json(rows)
        return 0
    print(text_table(("TARGET", "STATE", "VCPUS", "MEMORY", "RAM"),
                     [(r["target"], r["state"], r["vcpus"], f"{r['memory_bytes'] >> 20}Mi", r["ram"]) for r in rows],
                     right=("VCPUS", "MEMORY")))
    return 0
