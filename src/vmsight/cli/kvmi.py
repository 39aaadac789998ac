"""``vmsight --vm X kvmi ADDRESS [--secret FILE]``: play the VM side of KVMi for an introspector that
listens on ADDRESS (``unix:PATH``, a path, or ``vsock:CID:PORT``), until it hangs up (issue 12). Events come
from the event dispatcher (all-stop); SIGINT/SIGTERM send UNHOOK and give the introspector time to close."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat

from vmsight.cli.common import emit_json, open_vm
from vmsight.errors import VmsightError

NAME = "kvmi"
HELP = "serve a KVMi (v6) introspector that listens on ADDRESS (unix:PATH or vsock:CID:PORT)"
_SECRET_MAX = 64 << 10

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", metavar="ADDRESS", help="unix:PATH (or a path) or vsock:CID:PORT")
    p.add_argument("--secret", metavar="FILE",
                   help="refuse an introspector whose cookie hash is not SHA-1 of this file's bytes (QEMU's key=)")


def read_secret(path: str) -> bytes:
    """The secret file's bytes (a regular file, not a link, at most 64 KiB, not readable by others)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise VmsightError(f"cannot open the secret {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VmsightError(f"the secret {path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise VmsightError(f"the secret {path} is readable by others: `chmod 600 {path}`")
        data = os.read(fd, _SECRET_MAX + 1)
    finally:
        os.close(fd)
    if not data or len(data) > _SECRET_MAX:
        raise VmsightError(f"the secret {path} must hold 1 byte to 64 KiB")
    return data


def run(args: argparse.Namespace) -> int:
    from vmsight.events.dispatcher import Dispatcher
    from vmsight.kvmi.server import Session, VmGuest, vm_hello
    from vmsight.kvmi.transport import parse_address

    address = parse_address(args.address)  # a bad address fails before the VM is touched
    secret = read_secret(args.secret) if args.secret else None
    with open_vm(args) as vm:
        guest = VmGuest(vm)
        hello = vm_hello(vm)
        # our own signal handling: the session sends UNHOOK before the dispatcher detaches
        with Dispatcher(vm, handle_signals=False) as d:
            session = Session(address, guest, hello, secret=secret, dispatcher=d)
            old = {sig: signal.signal(sig, lambda signum, _f: session.request_unhook(signum))
                   for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                session.connect()
                log.info("KVMi session with %s", address)
                reason = session.serve()
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
    if args.json:
        emit_json({"address": str(address), "commands": session.commands, "events": session.events_sent,
                   "ended": reason})
    else:
        print(f"KVMi session with {address} ended: {reason} ({session.commands} commands served, "
              f"{session.events_sent} events sent)")
    return 128 + session.ended_by_signal if session.ended_by_signal else 0
