"""Host side of the test-guest agent (see ``guest_init.sh``): run a shell command in the guest over its
second serial port and get stdout, stderr and the exit status back. Ground truth for tests and the demo."""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from vmsight.errors import GuestAgentError

log = logging.getLogger(__name__)

NUDGE_S = 1.0  # send an empty line after this long without a reply


def frame_request(rid: str, root: str, timeout_s: int, command: str) -> bytes:
    """One RUN line: ``RUN id root timeout len sha256 payload``, ``len`` the payload's length and ``sha256``
    the hex digest of ``"id root timeout payload"``. The guest runs nothing whose length or digest is off: a
    request cut short (the host killed mid-write, the VM stopped) or glued to another's tail is rejected
    instead of run half-parsed (once seen: ``timeout -s KILL "" /bin/sh ...``). The leading newline ends any
    partial line an earlier, interrupted exchange left in the guest's buffer."""
    payload = base64.b64encode(command.encode()).decode()
    body = f"{rid} {root} {timeout_s} {payload}"
    return f"\nRUN {rid} {root} {timeout_s} {len(payload)} {hashlib.sha256(body.encode()).hexdigest()} {payload}\n".encode()


def frame_ok(line: bytes) -> bool:
    """The guest's check (guest_init.sh), for tests: fields split on single spaces as busybox ``read`` does."""
    f = line.decode(errors="replace").split(" ", 6)
    if len(f) != 7 or f[0] != "RUN":
        return False
    _, rid, root, tmo, n, digest, payload = f
    return str(len(payload)) == n and hashlib.sha256(f"{rid} {root} {tmo} {payload}".encode()).hexdigest() == digest


def request_ids() -> Iterator[str]:
    """Request ids unique across connections (the agent drops a RUN whose id it just ran: a resend)."""
    session = secrets.token_hex(4)
    return (f"{session}.{i}" for i in itertools.count(1))


@dataclass(frozen=True)
class AgentResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self) -> AgentResult:
        if self.rc != 0:
            raise GuestAgentError(f"guest command failed with status {self.rc}: "
                                  f"{self.stderr.decode(errors='replace').strip()[-500:]}")
        return self


class GuestAgent:
    """Connection to the agent's chardev socket (``-chardev socket,path=...,server=on``)."""

    def __init__(self, path: str, connect_timeout: float = 5.0) -> None:
        self.path = path
        self._ids = request_ids()
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(path)
                break
            except PermissionError:
                self._sock.close()
                raise GuestAgentError(f"permission denied on the guest agent socket {path}: run as root or as "
                                      "the user that launched the VM") from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    raise GuestAgentError(f"cannot connect to the guest agent socket {path}: {e}") from e
                time.sleep(0.05)

    def close(self) -> None:
        self._sock.close()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as e:
                raise GuestAgentError(f"guest agent connection failed: {e}") from e
            if not chunk:
                raise GuestAgentError("guest agent closed the connection (did the guest stop?)")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the agent answers within ``timeout`` seconds."""
        n = next(self._ids)
        self._sock.sendall(f"PING {n}\n".encode())
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._readline(deadline) == f"PONG {n}".encode():
                    return True
        except TimeoutError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(min(1.0, max(0.05, deadline - time.monotonic()))):
                return
        raise GuestAgentError(f"the guest agent did not answer within {timeout:.0f} s (see the console log)")

    def run(self, command: str, timeout: float = 60.0, root: str | None = None) -> AgentResult:
        """Run ``command`` with /bin/sh in the guest. ``root="host"`` runs it chrooted into the host's root
        filesystem (guests launched with ``host_root=True``). The guest kills it after ``timeout`` s."""
        n = next(self._ids)
        request = frame_request(n, root or "-", max(1, int(timeout)), command)
        self._sock.sendall(request)
        rejected = 0
        deadline = time.monotonic() + timeout + 10.0
        out: list[bytes] = []
        err: list[bytes] = []
        sink: list[bytes] | None = None
        try:
            while True:
                try:
                    line = self._readline(min(deadline, time.monotonic() + NUDGE_S))
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                    # Silence: nudge the line. Seen under TCG: the tail of a request (< the UART's FIFO
                    # trigger level) sits unread until more bytes arrive; the agent ignores empty lines.
                    self._sock.sendall(b"\n")
                    continue
                if line == b"READY" and sink is None:
                    # the agent (re)started and announces it: a request it was sent meanwhile is lost
                    log.warning("guest agent restarted; sending request %s again", n)
                    self._sock.sendall(request)
                elif line == f"BAD {n}".encode():
                    # it arrived damaged and did not run: sending it again is safe
                    rejected += 1
                    if rejected > 2:
                        raise GuestAgentError(f"the guest agent rejected request {n} {rejected} times as "
                                              "damaged in transit (length or sha256 mismatch); nothing ran")
                    log.warning("guest agent got request %s damaged; sending it again", n)
                    self._sock.sendall(request)
                elif line == f"BEGIN {n}".encode():
                    sink = out
                elif line == f"STDERR {n}".encode():
                    sink = err
                elif line.startswith(f"END {n} ".encode()):
                    rc = int(line.split()[2])
                    return AgentResult(rc, base64.b64decode(b"".join(out)), base64.b64decode(b"".join(err)))
                elif sink is not None:
                    sink.append(line)
                # anything else: stale output of an earlier, timed-out command
        except TimeoutError:
            raise GuestAgentError(f"guest command did not finish within {timeout:.0f} s "
                                  "(is the VM paused, or the command hung?)") from None
