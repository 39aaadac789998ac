"""The Session's event machinery without a VM: a fake dispatcher and dispatcher event, the real Session and
Introspector over a unix socket. Commands are served while an event is outstanding, replies are matched
by seq / vCPU / event, SET_REGISTERS lands on the vCPU when its event is answered, PAUSE_VCPU asked
meanwhile follows, and CRASH or a mismatched reply end the session."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.unit.test_kvmi_wire import FakeGuest
from vmsight.kvmi import CommandError, Introspector, wire
from vmsight.kvmi.server import Session, SessionEnded

HELLO = wire.GuestHello(bytes(16), 1_700_000_000_000, "fake")


@dataclass
class _Vcpu:
    index: int


class FakeDispatcher:
    def __init__(self) -> None:
        self.vm = self
        self.pauses = 0

    def vcpus(self) -> list[_Vcpu]:
        return [_Vcpu(4), _Vcpu(5)]   # QEMU cpu-index 4, 5 = KVMi vCPUs 0, 1

    def on(self, *_: Any) -> None:
        pass

    def pause_vcpus(self) -> None:
        self.pauses += 1

    def stop(self) -> None:
        pass


@dataclass
class FakeEvent:
    vcpu: int
    written: dict[str, int] = field(default_factory=dict)

    def registers(self) -> dict[str, int]:
        return {"k_gs_base": 0x1234}

    def set_register(self, name: str, value: int) -> None:
        self.written[name] = value


@pytest.fixture()
def session() -> Iterator[tuple[Introspector, Session, FakeDispatcher]]:
    d = FakeDispatcher()
    with Introspector() as intro:
        s = Session(str(intro.address), FakeGuest(), HELLO, dispatcher=d)
        t = threading.Thread(target=s.connect)
        t.start()
        intro.accept(5.0)
        t.join()
        yield intro, s, d
        s.close()


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_event_round_trip_serves_commands_and_applies_registers(session: Any) -> None:
    intro, s, d = session
    ev = FakeEvent(vcpu=5)
    t, out = _in_thread(lambda: s.send_event(ev, "PAUSE_VCPU"))
    e1 = intro.wait_event(5.0)
    assert (e1.spec.name, e1.vcpu, e1.arch.sregs.cr3, e1.arch.msrs["shadow_gs"]) == ("PAUSE_VCPU", 1, 0x2000, 0x1234)
    assert intro.get_version() == 1                      # served while the event is outstanding
    with pytest.raises(CommandError):                    # vCPU 0 has no event: SET_REGISTERS refused
        intro.call("SET_REGISTERS", vcpu=0, fields=dict(e1.arch.regs))
    intro.call("SET_REGISTERS", vcpu=1, fields=dict(e1.arch.regs, rflags=0x202, rax=7))
    intro.call("PAUSE_VCPU", vcpu=1, fields={"wait": 0})
    assert ev.written == {} and d.pauses == 0            # nothing applied before the reply
    intro.reply_event(e1)
    e2 = intro.wait_event(5.0)                           # the PAUSE asked meanwhile, in the same stop
    assert (e2.spec.name, e2.vcpu) == ("PAUSE_VCPU", 1) and e2.seq == e1.seq + 1
    assert ev.written["eflags"] == 0x202 and ev.written["rax"] == 7
    intro.reply_event(e2, wire.ACTION_RETRY)
    t.join(5.0)
    assert isinstance(out[0], wire.EventReply) and out[0].action == wire.ACTION_CONTINUE


@pytest.mark.parametrize("bad", ["seq", "vcpu", "event", "crash"])
def test_bad_or_crash_reply_ends_the_session(session: Any, bad: str) -> None:
    intro, s, _ = session
    t, out = _in_thread(lambda: s.send_event(FakeEvent(vcpu=4), "CR", {"cr": 3, "old_value": 1, "new_value": 2}))
    ev = intro.wait_event(5.0)
    action, vcpu, event, seq = wire.ACTION_CONTINUE, ev.vcpu, ev.spec.id, ev.seq
    if bad == "seq":
        seq += 1
    elif bad == "vcpu":
        vcpu = 1
    elif bad == "event":
        event = wire.V6.event("MSR").id
    else:
        action = wire.ACTION_CRASH
    payload = wire.encode_event_reply(wire.V6, wire.EventReply(vcpu, action, event, {"new_val": 2}))
    intro.send_raw(wire.encode_message(wire.V6, 0, seq, payload))
    t.join(5.0)
    assert isinstance(out[0], SessionEnded)
    assert ("CRASH" in out[0].reason) if bad == "crash" else ("does not match" in out[0].reason)
