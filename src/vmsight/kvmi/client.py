"""A KVMi introspector in Python (:class:`Introspector`), written from the v6 wire facts: it listens, accepts
the VM side's connection, checks its handshake, and sends commands whose replies it matches on (id, seq)
while queueing the events that arrive meanwhile, as libkvmi does.

    with Introspector("unix:/run/me/kvmi.sock") as intro:
        intro.accept()
        page = intro.read_physical(0x1000, 4096)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from vmsight import runtime
from vmsight.errors import VmsightError
from vmsight.kvmi import wire
from vmsight.kvmi.transport import Address, FrameReader, TransportError, parse_address, recv_exact

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 16384  # libkvmi's bound: a VM side flooding events cannot grow the queue forever


class CommandError(VmsightError):
    """The VM side answered a command with a negative KVM error code."""

    def __init__(self, command: str, err: int) -> None:
        name = wire.KVM_ERRORS.get(-err, str(err))
        super().__init__(f"KVMi {command} failed: -KVM_{name} ({err})")
        self.command = command
        self.err = err          # negative, as on the wire
        self.errno_name = name


class Introspector:
    """The introspector end of one KVMi connection. ``address`` is ``unix:PATH`` (or a bare path) or
    ``vsock:CID:PORT``; None makes a unix socket in a new private directory (:attr:`address` names it).

    ``secret``: the cookie hash sent in the handshake reply is :func:`vmsight.kvmi.wire.cookie_hash` of it
    (zeros without one, as libkvmi's hookguest)."""

    def __init__(self, address: str | None = None, *, secret: bytes | None = None,
                 dialect: wire.Dialect = wire.V6, timeout: float = 15.0) -> None:
        self.dialect = dialect
        self.secret = secret
        self.timeout = timeout
        self._private_dir: str | None = None
        if address is None:
            self._private_dir = runtime.private_tempdir("vmsight-kvmi-")
            address = f"unix:{os.path.join(self._private_dir, 'kvmi.sock')}"
        self.address: Address = parse_address(address)
        self.hello: wire.GuestHello | None = None
        self.sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self.events: collections.deque[wire.Event] = collections.deque()
        self._seq = 0
        self._bound = False  # only a socket file this object made is ever removed
        self._listener = socket.socket(self.address.family, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.address.sockaddr)
            self._bound = True
            if self.address.family == socket.AF_UNIX:
                os.chmod(self.address.unix_path, 0o600)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            self._remove_socket()
            raise TransportError(f"cannot listen on {self.address}: {e.strerror or e}") from None

    # --- connection

    def accept(self, timeout: float | None = None) -> wire.GuestHello:
        """Wait for the VM side, read its handshake, answer with the cookie hash."""
        self._listener.settimeout(self.timeout if timeout is None else timeout)
        try:
            sock, _ = self._listener.accept()
        except TimeoutError:
            raise TransportError(f"no VM connected to {self.address} in time") from None
        sock.settimeout(self.timeout)
        try:
            first = recv_exact(sock, 4)
            size = wire.hello_size(self.dialect, first)
            hello = wire.decode_hello(self.dialect, first + recv_exact(sock, size - 4))
            sock.sendall(wire.encode_intro_reply(wire.cookie_hash(self.secret) if self.secret is not None else b""))
        except (OSError, TransportError, wire.ProtocolError):
            sock.close()
            raise
        self.sock, self.hello = sock, hello
        self._reader = FrameReader(sock)
        return hello

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self._reader = None
        self._listener.close()
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self.address.family == socket.AF_UNIX:
            if self._private_dir is not None:
                runtime.remove_private_dir(self._private_dir, ("kvmi.sock",))
            elif self._bound:
                self._bound = False
                with contextlib.suppress(OSError):
                    os.unlink(self.address.unix_path)

    def __enter__(self) -> Introspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- messages

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF_FFFF
        return self._seq

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise TransportError("no VM is connected: call accept() first")
        return self.sock

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (one write: a batch of framed commands, or a deliberately bad message)."""
        self._sock().sendall(data)

    def frame(self, name: str, *, vcpu: int | None = None, fields: Mapping[str, Any] | None = None,
              items: Sequence[Any] | bytes = ()) -> tuple[wire.Header, bytes]:
        """A framed command (header + payload) with a new seq, not sent."""
        spec = self.dialect.command(name)
        payload = wire.encode_request(spec, vcpu=vcpu, fields=fields, items=items)
        seq = self.next_seq()
        return wire.Header(spec.id, len(payload), seq), wire.encode_message(self.dialect, spec.id, seq, payload)

    def _read_message(self, timeout: float | None) -> tuple[wire.Header, bytes]:
        sock = self._sock()
        assert self._reader is not None
        if timeout is not None:
            sock.settimeout(timeout)  # a system call: only for a timeout other than the default
        try:
            header = wire.decode_header(self.dialect, self._reader.read(wire.MSG_HDR.size))
            return header, self._reader.read(header.size) if header.size else b""
        except TimeoutError:
            raise TransportError("the VM side did not answer in time") from None
        finally:
            if timeout is not None:
                sock.settimeout(self.timeout)

    def _queue_event(self, header: wire.Header, payload: bytes) -> None:
        if len(self.events) >= MAX_QUEUED_EVENTS:
            raise wire.ProtocolError(f"over {MAX_QUEUED_EVENTS} events queued while waiting for a reply",
                                     what="kvmi_event", seq=header.seq)
        self.events.append(wire.decode_event(self.dialect, payload, header.seq))

    def wait_reply(self, header: wire.Header, timeout: float | None = None) -> bytes:
        """The reply data to command ``header`` (after its error code), queueing events that come first.
        Raises :class:`CommandError` on a negative code, :class:`wire.ProtocolError` on any other message."""
        name = self.dialect.commands[header.id].name if header.id in self.dialect.commands else str(header.id)
        while True:  # each message within the timeout, as libkvmi waits per read
            h, payload = self._read_message(timeout)
            if h.id == self.dialect.event_id:
                self._queue_event(h, payload)
                continue
            if (h.id, h.seq) != (header.id, header.seq):
                raise wire.ProtocolError(f"got message {h.id} seq {h.seq} while waiting for {name} seq "
                                         f"{header.seq}", what="kvmi_msg_hdr", msg_id=h.id, seq=h.seq)
            err = wire.decode_error(payload)
            if err:
                if len(payload) != wire.ERROR_CODE.size:
                    raise wire.MalformedMessage(f"{name} error reply carries data", what=name, value=len(payload))
                raise CommandError(name, err)
            return payload[wire.ERROR_CODE.size:]

    def call(self, name: str, *, vcpu: int | None = None, fields: Mapping[str, Any] | None = None,
             items: Sequence[Any] | bytes = (), timeout: float | None = None) -> bytes:
        """Send command ``name`` and return its reply data (raw bytes after the error code)."""
        header, msg = self.frame(name, vcpu=vcpu, fields=fields, items=items)
        self.send_raw(msg)
        return self.wait_reply(header, timeout)

    def _fixed(self, name: str, data: bytes) -> dict[str, Any]:
        spec = self.dialect.command(name)
        assert spec.reply is not None
        return spec.reply.unpack_exact(data)

    # --- commands

    def get_version(self) -> int:
        return int(self._fixed("GET_VERSION", self.call("GET_VERSION"))["version"])

    def check_command(self, command_id: int) -> bool:
        """Whether the VM side serves command ``command_id`` (False on its 'not supported' error)."""
        try:
            self.call("CHECK_COMMAND", fields={"id": command_id})
        except CommandError as e:
            if e.err in (-wire.KVM_EOPNOTSUPP, -wire.KVM_EPERM, -wire.KVM_EINVAL):
                return False
            raise
        return True

    def check_event(self, event_id: int) -> bool:
        try:
            self.call("CHECK_EVENT", fields={"id": event_id})
        except CommandError as e:
            if e.err in (-wire.KVM_EOPNOTSUPP, -wire.KVM_EPERM, -wire.KVM_EINVAL):
                return False
            raise
        return True

    def get_guest_info(self) -> int:
        """The vCPU count."""
        return int(self._fixed("GET_GUEST_INFO", self.call("GET_GUEST_INFO"))["vcpu_count"])

    def get_vcpu_info(self, vcpu: int) -> int:
        """The vCPU's TSC frequency in Hz."""
        return int(self._fixed("GET_VCPU_INFO", self.call("GET_VCPU_INFO", vcpu=vcpu))["tsc_speed"])

    def get_max_gfn(self) -> int:
        return int(self._fixed("GET_MAX_GFN", self.call("GET_MAX_GFN"))["gfn"])

    def read_physical(self, gpa: int, size: int) -> bytes:
        data = self.call("READ_PHYSICAL", fields={"gpa": gpa, "size": size})
        if len(data) != size:
            raise wire.MalformedMessage(f"READ_PHYSICAL of {size} bytes returned {len(data)}",
                                        what="READ_PHYSICAL", value=len(data))
        return data

    def write_physical(self, gpa: int, data: bytes) -> None:
        self.call("WRITE_PHYSICAL", fields={"gpa": gpa}, items=data)

    def get_registers(self, vcpu: int, msrs: Sequence[int] = ()) -> wire.Registers:
        data = self.call("GET_REGISTERS", vcpu=vcpu, items=list(msrs))
        return wire.decode_registers_reply(data, len(msrs))

    def get_cpuid(self, vcpu: int, function: int, index: int = 0) -> dict[str, int]:
        data = self.call("GET_CPUID", vcpu=vcpu, fields={"function": function, "index": index})
        return self._fixed("GET_CPUID", data)

    def get_mtrr_type(self, vcpu: int, gpa: int) -> int:
        return int(self._fixed("GET_MTRR_TYPE", self.call("GET_MTRR_TYPE", vcpu=vcpu, fields={"gpa": gpa}))["type"])

    def control_cmd_response(self, enable: bool, now: bool = True) -> None:
        self.call("CONTROL_CMD_RESPONSE", fields={"enable": int(enable), "now": int(now)})

    # --- events

    def wait_event(self, timeout: float | None = None) -> wire.Event:
        """The next event (queued ones first)."""
        if self.events:
            return self.events.popleft()
        h, payload = self._read_message(timeout)
        if h.id != self.dialect.event_id:
            raise wire.ProtocolError(f"got message {h.id} seq {h.seq} while waiting for an event",
                                     what="kvmi_msg_hdr", msg_id=h.id, seq=h.seq)
        return wire.decode_event(self.dialect, payload, h.seq)

    def reply_event(self, event: wire.Event, action: int = wire.ACTION_CONTINUE,
                    data: Mapping[str, Any] | None = None) -> None:
        """Answer ``event`` (same seq); ``data`` fills the event's own reply struct."""
        if not event.spec.needs_reply:
            raise wire.InvalidField(f"{event.spec.name} takes no reply", what="kvmi_event_reply",
                                    value=event.spec.name)
        payload = wire.encode_event_reply(self.dialect, wire.EventReply(event.vcpu, action, event.spec.id,
                                                                        dict(data or {})))
        self.send_raw(wire.encode_message(self.dialect, self.dialect.event_reply_id, event.seq, payload))


__all__ = ["CommandError", "Introspector", "MAX_QUEUED_EVENTS"]
