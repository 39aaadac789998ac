"""SIGKILL insurance for the dispatcher.

QEMU leaves the VM stopped when a gdb client dies without detaching, and a breakpoint left inserted stops
the VM for good at its next hit (nobody answers). So every :class:`~vmsight.events.dispatcher.Dispatcher`
starts this small watchdog process (``python -m vmsight.events.watchdog GDB_ADDRESS``) in its own session
(terminal signals do not reach it). The parent streams each breakpoint/watchpoint it inserts or removes
over the watchdog's stdin (``+ KIND GVA LEN`` / ``- KIND GVA LEN``) and writes ``bye`` when it closed
cleanly. End of input without ``bye`` means the parent died: the watchdog connects to the gdb socket (free
once the dead client's socket is closed), removes the recorded points and detaches with ``D;1`` (which also
drops any point QEMU still holds for that client), leaving the VM running."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from typing import IO

log = logging.getLogger(__name__)

CONNECT_DEADLINE_S = 5.0
_KEEP_UNTIL_EXIT: list[WatchdogClient] = []


class WatchdogClient:
    """The parent's end: a pipe to the watchdog process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._pipe: IO[bytes] | None = proc.stdin

    @classmethod
    def start(cls, gdb_address: str) -> WatchdogClient:
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        logfile = os.environ.get("VMSIGHT_WATCHDOG_LOG")
        err = open(logfile, "ab") if logfile else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen([sys.executable, "-m", "vmsight.events.watchdog", gdb_address],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    close_fds=True, start_new_session=True, env=env)
        finally:
            if logfile and not isinstance(err, int):
                err.close()
        log.debug("watchdog pid %d for %s", proc.pid, gdb_address)
        return cls(proc)

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, OSError) as e:
            log.warning("the dispatcher's watchdog is gone (%s): a SIGKILL would leave breakpoints behind", e)
            self._pipe = None

    def record(self, added: bool, kind: int, gva: int, length: int) -> None:
        self._send(f"{'+' if added else '-'} {kind} {gva:x} {length:x}")

    def stop(self, clean: bool) -> None:
        """``clean``: every point was removed and the VM runs: the watchdog just exits. Otherwise the pipe
        stays open and the watchdog cleans up once this process is gone (and the gdb socket free)."""
        if not clean:
            _KEEP_UNTIL_EXIT.append(self)  # a collected pipe would close: EOF while we still hold the stub
            return
        self._send("bye")
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the watchdog process ------------------------------------------------------------------------------

def read_until_eof(stream: IO[bytes]) -> tuple[bool, set[tuple[int, int, int]]]:
    """(parent said bye, points still inserted) from the parent's stream."""
    points: set[tuple[int, int, int]] = set()
    for raw in stream:
        parts = raw.decode(errors="replace").split()
        if not parts:
            continue
        if parts[0] == "bye":
            return True, points
        if parts[0] in "+-" and len(parts) == 4:
            try:
                p = (int(parts[1]), int(parts[2], 16), int(parts[3], 16))
            except ValueError:
                continue
            if parts[0] == "+":
                points.add(p)
            else:
                points.discard(p)
    return False, points


class _RawStub:
    """The few packets cleanup needs, without GdbStub's start-up (target description, a wait for the
    pushed stop): after the parent's death every round trip counts."""

    def __init__(self, path: str, timeout: float) -> None:
        from vmsight.qemu.qmp import connect_unix

        self.sock = connect_unix(path, timeout) if not path.startswith("tcp:") else self._tcp(path, timeout)
        self.timeout = timeout
        self.buf = b""

    @staticmethod
    def _tcp(path: str, timeout: float) -> socket.socket:
        host, _, port = path[4:].rpartition(":")
        return socket.create_connection((host or "127.0.0.1", int(port)), timeout)

    def request(self, payload: str) -> str:
        """Send a packet, return its reply (stop replies pushed by the connect itself are skipped)."""
        from vmsight.qemu.rsp import checksum

        body = payload.encode()
        self.sock.sendall(b"$" + body + b"#" + f"{checksum(body):02x}".encode())
        deadline = time.monotonic() + self.timeout
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                text = self.buf[start + 1:end].decode("latin-1")
                self.buf = self.buf[end + 3:]
                self.sock.sendall(b"+")
                if text[:1] in ("T", "S") and not payload.startswith("?"):
                    continue  # the T02 that connecting pushes
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {payload!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the gdbstub closed the connection")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def cleanup(gdb_address: str, points: set[tuple[int, int, int]], deadline_s: float = CONNECT_DEADLINE_S) -> bool:
    """Connect, remove ``points``, detach (``D;1``: QEMU also drops whatever points it still holds for the
    client). True when the VM was left detached and running."""
    from vmsight.errors import VmsightError

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            stub = _RawStub(gdb_address, timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            features = stub.request("qSupported:multiprocess+")
            break
        except (VmsightError, OSError, TimeoutError) as e:
            if time.monotonic() > deadline:
                log.error("watchdog: cannot reach the gdbstub at %s: %s", gdb_address, e)
                return False
            time.sleep(0.05)
    try:
        for kind, gva, length in sorted(points):
            reply = stub.request(f"z{kind},{gva:x},{length:x}")
            if reply != "OK":
                log.warning("watchdog: removing Z%d at %#x: %r", kind, gva, reply)
        reply = stub.request("D;1" if "multiprocess+" in features else "D")
        if reply != "OK":
            log.error("watchdog: detach answered %r", reply)
            return False
    except (OSError, TimeoutError) as e:
        log.error("watchdog: cleanup failed: %s", e)
        return False
    finally:
        stub.close()
    log.info("watchdog: removed %d points and detached", len(points))
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmsight-watchdog")
    p.add_argument("gdb_address")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vmsight-watchdog: %(message)s")
    # Preload what cleanup needs while the parent is alive: after its death every millisecond counts.
    import vmsight.errors  # noqa: F401
    import vmsight.qemu.qmp  # noqa: F401
    import vmsight.qemu.rsp  # noqa: F401

    bye, points = read_until_eof(sys.stdin.buffer)
    if bye:
        return 0
    log.info("parent died with %d points inserted: cleaning up", len(points))
    return 0 if cleanup(args.gdb_address, points) else 1


if __name__ == "__main__":
    sys.exit(main())
