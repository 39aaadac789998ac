"""KVMi on stock QEMU: the v6 wire protocol as a table (:mod:`.wire`), a Python introspector
(:class:`Introspector`), and the VM side's command layer (:mod:`.server`, imported on its own: it needs
the VM core)."""

from vmsight.kvmi.client import CommandError, Introspector
from vmsight.kvmi.wire import V6, InvalidField, MalformedMessage, ProtocolError

__all__ = ["V6", "CommandError", "InvalidField", "Introspector", "MalformedMessage", "ProtocolError"]
