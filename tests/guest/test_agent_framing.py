"""The guest agent never runs a damaged request (issue 9 item 11): half a frame written and the connection
closed (a `vm exec` killed mid-write), then the next connection's requests; checked through the agent itself."""

from __future__ import annotations

import secrets
import socket

import pytest

from vmsight.qemu.agent import GuestAgent, frame_request
from vmsight.qemu.launch import VmInstance


@pytest.mark.guest
@pytest.mark.parametrize("guest", ["debian-6.12"], indirect=True)
def test_truncated_request_never_runs(guest: VmInstance) -> None:
    if guest._agent is not None:  # noqa: SLF001 - QEMU's chardev serves one connection at a time
        guest._agent.close()  # noqa: SLF001
        guest._agent = None  # noqa: SLF001
    marker = f"/tmp/vmsight-marker-{secrets.token_hex(4)}"
    # padded: a cut anywhere in the padding still leaves a runnable `touch` (what a half-parsed request did)
    command = f"touch {marker}; : {'x' * 300}"
    for i, frac in enumerate((0.6, 0.99)):    # most of a frame; all but its last bytes and newline
        frame = frame_request(f"cut.{i}", "-", 30, command)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(guest.agent_socket)
        s.sendall(frame[:int(len(frame) * frac)])
        s.close()
    # a whole frame whose digest does not match: answered BAD, not run
    bad = frame_request("cut.2", "-", 30, command).replace(b" 30 ", b" 31 ")
    agent = GuestAgent(guest.agent_socket)
    try:
        # cut short on a live connection: the next request's leading newline ends the partial line, which
        # the unframed agent then ran (as it did once after killed `vm exec`s)
        agent._sock.sendall(frame_request("cut.3", "-", 30, command)[:200])  # noqa: SLF001
        agent.run("true", timeout=30).check()
        agent._sock.sendall(bad)  # noqa: SLF001
        seen = b""
        while b"BAD cut.2" not in seen:
            seen += agent._sock.recv(4096)  # noqa: SLF001
        r = agent.run(f"test -e {marker}; echo $?", timeout=30)
        assert r.rc == 0 and r.text.strip() == "1", r      # none of the four ran
        r = agent.run(f"touch {marker} && test -e {marker} && echo ok", timeout=30).check()
        assert r.text.strip() == "ok"                      # a good request still runs
        agent.run(f"rm -f {marker}", timeout=30).check()
    finally:
        agent.close()
