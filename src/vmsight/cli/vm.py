"""``vmsight vm launch|exec|stop``: throwaway test/demo guests."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vmsight.errors import VmsightError
from vmsight.qemu.launch import LaunchConfig, launch

NAME = "vm launch"
HELP = "start a guest and return when its agent answers"
GROUP_HELP = "launch, run commands in, and stop test guests"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="debian-6.12", help="debian-6.1 | debian-6.12 | path to a bzImage")
    p.add_argument("--initrd", help="initramfs (default: vmsight's busybox agent initramfs)")
    p.add_argument("--memory", default="256M")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--host-root", action="store_true", help="share the host's / read-only over 9p")
    p.add_argument("--dir", required=True, help="directory for vm.json, sockets and logs")
    p.add_argument("--detach", action="store_true", help="leave the VM running after this command returns")


def _check_dir(text: str) -> None:
    """--dir must be (or be creatable as) a directory we may write: refused before anything is created."""
    p = Path(text).absolute()
    if p.exists() and not p.is_dir():
        raise VmsightError(f"--dir {text} exists and is not a directory: give a new or existing directory "
                           "for the VM's files")
    first = next(a for a in (p, *p.parents) if a.exists())
    if not first.is_dir():
        raise VmsightError(f"--dir {text}: {first} is not a directory: give a directory path for the VM's files")
    if not os.access(first, os.W_OK | os.X_OK):
        raise VmsightError(f"--dir {text}: {first} is not writable by this user: run as its owner or root, or "
                           "pick another directory")


def run(args: argparse.Namespace) -> int:
    _check_dir(args.dir)
    cfg = LaunchConfig(kernel=args.kernel, initrd=args.initrd, memory=args.memory, smp=args.smp,
                       append=args.append, accel=args.accel, host_root=args.host_root)
    vm = launch(cfg, args.dir, detach=args.detach)
    print(f"VM running: pid {vm.pid}, {vm.accel}, kernel {vm.kernel}; --vm {vm.dir}", file=sys.stderr)
    if args.detach:
        return 0
    try:
        print("press Ctrl-C to stop it", file=sys.stderr)
        vm._proc.wait() if vm._proc else None  # noqa: SLF001
    except KeyboardInterrupt:
        pass
    finally:
        vm.stop()
    return 0
