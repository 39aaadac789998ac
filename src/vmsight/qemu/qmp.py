"""Synchronous QMP connection over ``qemu.qmp``'s asyncio client, with errors that name the fix."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

from vmsight.errors import PermissionDenied, QmpError, TargetError

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# qemu.qmp logs every failure it then raises (a busy socket: ERROR "Failed to receive Greeting:
# CancelledError", twice; a lost connection: the reader task's error), and Qmp turns those into one
# exception naming the fix. Its records are for debugging vmsight's QMP use: they pass only when vmsight
# logs at DEBUG (-vv), unless an application set qemu.qmp's level itself.
_QEMU_QMP_LOG = logging.getLogger("qemu.qmp")
_QUIET = logging.CRITICAL + 1


class Qmp:
    """One QMP session. QEMU serves one client per QMP socket at a time; a second one waits for the
    greeting forever, which is reported as 'busy'."""

    def __init__(self, path: str, timeout: float = 3.0) -> None:
        """``path``: a unix socket path, or ``tcp:HOST:PORT`` for a QEMU on another machine."""
        self.path = path
        self.timeout = timeout
        self.remote = path.startswith("tcp:")
        address: str | tuple[str, int] = path
        if self.remote:
            address = tcp_address(path)
        else:
            _check_socket(path, "QMP", "-qmp unix:PATH,server=on,wait=off")
        _quiet_qemu_qmp_logs()
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("vmsight")
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        try:
            self._run(self._client.connect(address), timeout)
        except TimeoutError:
            self._close_quietly()
            raise TargetError(f"{path}: no QMP greeting within {timeout:.0f} s: another QMP client is connected "
                              "(QEMU serves one per socket) or this is not a QMP socket") from None
        except ConnectError as e:
            self._close_quietly()
            cause = e.exc if hasattr(e, "exc") else e
            if isinstance(cause, ConnectionRefusedError):
                raise TargetError(f"{path}: connection refused: QEMU is not running (stale socket)") from None
            if isinstance(cause, PermissionError):
                raise PermissionDenied(f"{path}: permission denied: run as root or QEMU's user") from None
            if isinstance(cause, OSError) and cause.errno in (errno.EAGAIN, errno.EINVAL) and not self.remote:
                # QEMU queues clients of a busy monitor (listen backlog 1); once that queue is full, a
                # connect fails at once (EAGAIN, which asyncio reports as EINVAL)
                raise TargetError(f"{path}: another QMP client is connected (QEMU serves one per socket) and "
                                  "others wait in its queue: close them or use another monitor") from None
            raise TargetError(f"{path}: not a QMP socket or the handshake failed ({cause})") from None

    def _run(self, aw: Awaitable[_T], timeout: float | None = None) -> _T:
        coro = asyncio.wait_for(aw, timeout)
        try:
            return self._loop.run_until_complete(coro)
        finally:
            # a loop that refused to start it (closed, or already failing) leaves it never awaited
            coro.close()
            if asyncio.iscoroutine(aw):
                aw.close()

    def _close_quietly(self) -> None:
        try:
            self._run(self._client.disconnect(), 1.0)
        except Exception:  # noqa: BLE001 - already failing
            pass
        self._loop.close()

    def execute(self, name: str, **arguments: Any) -> Any:
        """Run a QMP command; its ``return`` value."""
        try:
            return self._run(self._client.execute(name, arguments or None), self.timeout)
        except ExecuteError as e:
            raise QmpError(f"QMP {name} failed: {e}") from None
        except TimeoutError:
            raise QmpError(f"QMP {name} did not answer within {self.timeout:.0f} s") from None
        except Exception as e:  # disconnects surface as various qemu.qmp errors
            if not self._client.runstate.name == "RUNNING":
                raise TargetError(f"QMP connection to {self.path} lost: QEMU exited?") from e
            raise

    def hmp(self, command_line: str) -> str:
        """Run an HMP command through ``human-monitor-command``."""
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    def status(self) -> str:
        """'running', 'paused', 'debug', 'shutdown', ..."""
        return str(self.execute("query-status")["status"])

    def pull_event(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        """The next QMP event (``{"event": ..., "data": ..., "timestamp": ...}``), or None after ``timeout``."""
        try:
            if timeout == 0.0:
                self._run(asyncio.sleep(0))
                if self._listener.empty():
                    return None
            msg = self._run(self._listener.get(), timeout)
        except TimeoutError:
            return None
        return dict(msg)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._close_quietly()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_qemu_qmp_logs() -> None:
    """Silence qemu.qmp's loggers unless vmsight is logging at DEBUG (see _QEMU_QMP_LOG)."""
    if _QEMU_QMP_LOG.level not in (logging.NOTSET, _QUIET):
        return  # configured by the application: its choice
    _QEMU_QMP_LOG.setLevel(logging.NOTSET if log.isEnabledFor(logging.DEBUG) else _QUIET)


def _check_socket(path: str, what: str, option: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TargetError(f"{path} does not exist: start QEMU with {option}") from None
    except PermissionError:
        raise PermissionDenied(f"cannot access {path}: run as root or QEMU's user") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TargetError(f"{path} is not a socket: expected QEMU's {what} socket ({option})")


def tcp_address(text: str) -> tuple[str, int]:
    """(host, port) of ``tcp:HOST:PORT`` (``tcp::PORT`` is localhost, ``tcp:[::1]:PORT`` IPv6), or an
    error naming the form: QMP and the gdbstub are reached the same way."""
    host, colon, port = text.removeprefix("tcp:").rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or "]" in port:
        raise TargetError(f"{text}: expected tcp:HOST:PORT (a port 1-65535), e.g. tcp:192.0.2.7:4444")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    return host or "127.0.0.1", int(port)


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A connected unix stream socket, with errors naming the fix (used for the gdbstub too)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        s.close()
        raise TargetError(f"{path}: connection refused: QEMU is not running (stale socket)") from None
    except PermissionError:
        s.close()
        raise PermissionDenied(f"{path}: permission denied: run as root or QEMU's user") from None
    except FileNotFoundError:
        s.close()
        raise TargetError(f"{path} does not exist") from None
    return s
