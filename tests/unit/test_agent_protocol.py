"""GuestAgent's side of the serial protocol against a scripted agent on a unix socket."""

from __future__ import annotations

import base64
import socket
import threading
from pathlib import Path

from vmsight.qemu.agent import GuestAgent, frame_ok, frame_request, request_ids


def _serve(path: str, script: list[str]) -> tuple[threading.Thread, list[str]]:
    """Accept one connection; for each RUN line received, reply with the next script step: "restart" sends
    READY without running it (a restarted agent that lost it), "ok" answers it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    seen: list[str] = []

    def run() -> None:
        conn, _ = srv.accept()
        buf = b""
        steps = iter(script)
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    f = line.decode().split()
                    if not f or f[0] != "RUN":
                        continue
                    seen.append(f[1])
                    if next(steps) == "restart":
                        conn.sendall(b"READY\n")
                    else:
                        out = base64.b64encode(base64.b64decode(f[6])).decode()
                        conn.sendall(f"BEGIN {f[1]}\n{out}\nSTDERR {f[1]}\nEND {f[1]} 0\n".encode())
                        return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, seen


def test_request_is_sent_again_when_the_agent_announces_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    t, seen = _serve(path, ["restart", "ok"])
    agent = GuestAgent(path)
    try:
        r = agent.run("echo hi", timeout=5)
    finally:
        agent.close()
    t.join(5)
    assert r.rc == 0 and r.stdout == b"echo hi"      # the scripted agent echoes the command back
    assert len(seen) == 2 and seen[0] == seen[1]     # the same id twice: the guest runs it once
    a, b = request_ids(), request_ids()
    assert len({next(a), next(a), next(b)}) == 3                 # unique across connections too


def test_frame_rejects_every_cut_and_glued_request() -> None:
    frame = frame_request("ab.7", "-", 60, "touch /tmp/marker; echo 'a b  c'")
    line = frame.strip(b"\n")
    assert frame.startswith(b"\n") and frame.endswith(b"\n") and frame_ok(line)
    assert not any(frame_ok(line[:k]) for k in range(len(line)))          # any cut short
    other = frame_request("ab.8", "host", 5, "true").strip(b"\n")
    assert not frame_ok(line[:40] + other)                                  # a tail glued to the next one
    assert not frame_ok(line.replace(b" 60 ", b" 6 "))                      # a header field changed
    assert frame_ok(frame_request("x.1", "-", 1, "").strip(b"\n"))        # empty command still framed
