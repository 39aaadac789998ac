"""``vmsight vm stop --dir DIR``

vm.json is believed only as far as the kernel confirms it: the pid must be a QEMU whose command line names
this directory's console log and QMP socket and that itself holds that QMP socket listening; the pid is
pinned with a pidfd from before that check until it is killed. Only files vmsight created are removed: the
VM's private runtime directory, when it points back at DIR. A forged vm.json gets one line, a non-zero exit,
and nothing is killed or deleted."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import select
import signal
import stat
import sys
from typing import Any

from vmsight.cli.common import escape
from vmsight.errors import PermissionDenied, TargetError
from vmsight.qemu.launch import remove_runtime_dir, runtime_dir_vm
from vmsight.runtime import listens_on, proc_cmdline, proc_uid

log = logging.getLogger(__name__)

NAME = "vm stop"
HELP = "stop a guest started with `vmsight vm launch`"

_VM_JSON_MAX = 1 << 20
_LEGACY_RAM = re.compile(r"/dev/shm/vmsight-[0-9a-f]{8}\.ram")  # older vmsight's RAM file, outside any dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True)


def _read_vm_json(d: str) -> tuple[dict[str, Any], int]:
    """vm.json's fields (types checked) and its owner's uid; never through a symlink."""
    path = os.path.join(d, "vm.json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TargetError(f"{d} holds no vm.json: not a `vmsight vm launch` directory") from None
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: run `vmsight vm stop` as root or as the VM's user") from None
    except OSError as e:
        raise TargetError(f"cannot open {path} ({e.strerror}): a symlink or not a file; not written by "
                          "`vmsight vm launch`") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read(_VM_JSON_MAX + 1) if stat.S_ISREG(st.st_mode) else b""
    try:
        info = json.loads(raw) if len(raw) <= _VM_JSON_MAX else None
    except ValueError:
        info = None
    if not (isinstance(info, dict) and type(info.get("pid")) is int and info["pid"] > 1
            and all(isinstance(info.get(k), str) for k in ("qmp", "console_log"))
            and all(isinstance(info.get(k), str | None) for k in ("ram_file", "runtime_dir"))):
        raise TargetError(f"{path} is not a vm.json written by `vmsight vm launch` (pid, qmp, console_log): "
                          "nothing stopped; stop that QEMU yourself")
    return info, st.st_uid


def _why_not_ours(d: str, info: dict[str, Any], pid: int, argv: list[str] | None) -> str | None:
    """Why ``pid`` is not the QEMU of VM directory ``d`` (None: it is)."""
    if argv is None:
        return "no such process"
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return "not QEMU"
    pairs = set(zip(argv, argv[1:], strict=False))
    console = os.path.join(d, "console.log")
    if info["console_log"] != console or ("-chardev", f"file,id=con,path={console}") not in pairs:
        return f"its command line does not name {console}"
    if ("-qmp", f"unix:{info['qmp']},server=on,wait=off") not in pairs:
        return f"its command line does not name the QMP socket {info['qmp']}"
    return None


def _mem_path(argv: list[str]) -> str | None:
    for a, b in zip(argv, argv[1:], strict=False):
        if a == "-object" and b.startswith("memory-backend-file,"):
            opts = dict(kv.split("=", 1) for kv in b.split(",")[1:] if "=" in kv)
            return opts.get("mem-path")
    return None


def _remove_runtime(d: str, info: dict[str, Any], owner: int) -> None:
    rt = info.get("runtime_dir")
    if rt is None or not os.path.lexists(rt):   # none, or removed already (an earlier stop, the reaper)
        return
    if runtime_dir_vm(rt) != d:  # the back-reference new_runtime_dir wrote: this VM's, not any directory
        log.warning("not removing %s: it does not belong to %s", rt, d)
        return
    remove_runtime_dir(rt, owners=(owner,))


def _remove_sockets(d: str, info: dict[str, Any], owner: int) -> None:
    """The sockets QEMU left in ``d`` that vm.json names: only sockets directly in ``d``, of the VM's owner
    (never through a link: a planted name is left alone)."""
    aux: list[Any] = info["qmp_aux"] if isinstance(info.get("qmp_aux"), list) else []
    for path in [info.get("qmp"), info.get("gdb"), info.get("agent_socket"), *aux]:
        if not isinstance(path, str) or os.path.dirname(path) != d:
            continue
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == owner:
                os.unlink(path)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_gone(pidfd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)  # a pidfd turns readable when its process exits
    return bool(p.poll(int(timeout * 1000)))


def run(args: argparse.Namespace) -> int:
    d = os.path.realpath(args.dir)
    info, owner = _read_vm_json(d)
    pid = info["pid"]
    try:
        pidfd = os.pidfd_open(pid)  # pins this process: the one checked below is the one killed
    except ProcessLookupError:
        pidfd = -1
    try:
        argv = proc_cmdline(pid) if pidfd >= 0 and not _zombie(pid) else None
        if argv is None:  # QEMU already gone: only clean up what verifiably belongs to this directory
            _remove_runtime(d, info, owner)
            _remove_sockets(d, info, owner)
            print(f"vmsight: the VM in {escape(d)} had already stopped (QEMU pid {pid} exited); its runtime "
                  "files are removed", file=sys.stderr)
            return 0
        why = _why_not_ours(d, info, pid, argv)
        if why is None:
            quid = proc_uid(pid)
            if quid != owner:
                why = f"it runs as uid {quid}, vm.json belongs to uid {owner}"
            elif os.geteuid() not in (0, quid):
                raise PermissionDenied(f"the VM in {d} (QEMU pid {pid}) belongs to uid {quid}: run `vmsight vm "
                                       "stop` as root or as that user")
            elif not listens_on(pid, info["qmp"]):
                why = f"it does not hold the QMP socket {info['qmp']}"
        if why is not None:
            raise TargetError(f"{d}/vm.json names pid {pid}, which is not this VM's QEMU ({why}): nothing "
                              "stopped or deleted; if the VM is gone, remove the directory")
        mem_path = _mem_path(argv)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except PermissionError as e:
            raise PermissionDenied(f"cannot stop QEMU pid {pid}: {e.strerror}; run as its owner or root") from None
        if not _wait_gone(pidfd, 5.0):
            raise TargetError(f"QEMU pid {pid} did not exit within 5 s of SIGKILL")
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    _remove_runtime(d, info, owner)
    _remove_sockets(d, info, owner)
    ram = info.get("ram_file")
    if ram and info.get("runtime_dir") is None and ram == mem_path and _LEGACY_RAM.fullmatch(ram):
        with contextlib.suppress(OSError):  # the RAM file of an older vmsight's VM, the one its QEMU used
            st = os.lstat(ram)
            if stat.S_ISREG(st.st_mode) and st.st_uid == owner:
                os.unlink(ram)
    return 0
