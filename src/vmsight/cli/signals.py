"""SIGTERM, SIGHUP and SIGINT end a command cleanly: an exception unwinds every context manager, so the
VM is resumed (``vm.paused()``), breakpoints are removed and accessed bits given back on the way out. The
exit status is 128 + the signal (SIGINT: KeyboardInterrupt, 130).

The exception is never raised in the middle of a QMP or gdb exchange (Python would raise it wherever the
main thread is, e.g. inside qemu.qmp's reader, which leaves the QMP session unusable and the clean-up
with it): a signal that lands there is re-sent to the main thread every few ms until it is outside.
A second signal during the clean-up is ignored rather than cutting it short. SIGKILL needs none of
this: the VM's watchdog (:mod:`vmsight.events.watchdog`) cleans up then."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from vmsight.qemu.rsp import in_exchange

RETRY_S = 0.005
_first: int | None = None


def _deliver(signum: int) -> None:
    ident = threading.main_thread().ident
    if ident is not None:
        signal.pthread_kill(ident, signum)


def _terminate(signum: int, frame: FrameType | None) -> None:
    global _first
    if _first is not None and _first != -signum:
        return  # already unwinding: let the clean-up finish
    if in_exchange(frame):
        _first = -signum  # deferred: only this signal's re-sends get through
        t = threading.Timer(RETRY_S, _deliver, (signum,))
        t.daemon = True
        t.start()
        return
    _first = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install() -> None:
    """Install the handlers (main thread only; call once, before attaching)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _terminate)
