"""Where KVMi peers meet: ``unix:PATH`` (or a bare path) and ``vsock:CID:PORT``, and exact reads on a
stream socket. The introspector listens, the VM side connects (as in KVMi)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from vmsight.errors import VmsightError

VMADDR_CID_ANY = 0xFFFF_FFFF


class TransportError(VmsightError):
    """The address is malformed, or the peer hung up or stalled."""


@dataclass(frozen=True)
class Address:
    family: int
    unix_path: str = ""
    cid: int = 0
    port: int = 0

    @property
    def sockaddr(self) -> str | tuple[int, int]:
        return self.unix_path if self.family == socket.AF_UNIX else (self.cid, self.port)

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.family == socket.AF_UNIX else f"vsock:{self.cid}:{self.port}"


def parse_address(text: str) -> Address:
    """``unix:PATH``, a bare path, or ``vsock:CID:PORT`` (CID ``any`` or -1 for listening on every CID)."""
    if text.startswith("vsock:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise TransportError(f"{text}: expected vsock:CID:PORT, e.g. vsock:3:1234")
        cid_text = parts[1]
        if cid_text in ("any", "-1"):
            cid = VMADDR_CID_ANY
        elif cid_text.isdigit():
            cid = int(cid_text)
        else:
            raise TransportError(f"{text}: the CID must be a number or 'any'")
        port = int(parts[2])
        if not 0 <= cid <= VMADDR_CID_ANY or not 0 < port < 1 << 32:
            raise TransportError(f"{text}: CID or port out of range")
        if not hasattr(socket, "AF_VSOCK"):
            raise TransportError(f"{text}: this Python has no AF_VSOCK support")
        return Address(socket.AF_VSOCK, cid=cid, port=port)
    path = text.removeprefix("unix:")
    if not path:
        raise TransportError(f"{text!r}: expected unix:PATH, a path, or vsock:CID:PORT")
    if len(path.encode()) > 107:
        raise TransportError(f"{path}: a unix socket path is at most 107 bytes; use a shorter one")
    return Address(socket.AF_UNIX, unix_path=path)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, or TransportError when the peer hangs up first (a short message)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise TransportError(f"the peer hung up after {got} of {size} bytes")
        got += n
    return bytes(buf)


class PeerClosed(TransportError):
    """The peer hung up; ``got`` bytes of the ``wanted`` had come (0 at a message boundary: a clean end)."""

    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"the peer hung up after {got} of {wanted} bytes")
        self.got = got
        self.wanted = wanted


class FrameReader:
    """Buffered exact reads on a stream socket: a header and its payload (and often the next message) come in
    one recv, not one system call each."""

    CHUNK = 8 << 10  # one whole v6 message and then some

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes; :class:`PeerClosed` when the peer hangs up first."""
        buf = self._buf
        while len(buf) < size:
            chunk = self.sock.recv(max(self.CHUNK, size - len(buf)))
            if not chunk:
                raise PeerClosed(len(buf), size)
            buf += chunk
        out = bytes(buf[:size])
        del buf[:size]
        return out


__all__ = ["Address", "FrameReader", "PeerClosed", "TransportError", "parse_address", "recv_exact"]
