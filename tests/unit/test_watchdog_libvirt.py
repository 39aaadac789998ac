"""The watchdog for a libvirt domain without a gdbstub (no --allow-taint): after the parent's death it gives
the journalled accessed bits back through the RAM file with the domain suspended through libvirt, then
leaves the domain in the run state found at attach. A fake binding records the libvirt calls (the real
domain: tests/guest/test_libvirt_idle.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import vmsight.libvirt
from vmsight.errors import TargetError
from vmsight.events import watchdog
from vmsight.events.watchdog import read_until_eof, settle_libvirt

RUNNING, PAUSED = 1, 3
PRESENT_A = 0x21
DESC = {"uri": "qemu:///system", "uuid": "0b6a6e0e-1111-2222-3333-444455556666"}


class FakeDomain:
    def __init__(self, state: int) -> None:
        self.st = state
        self.calls: list[str] = []

    def state(self) -> list[int]:
        return [self.st, 0]

    def suspend(self) -> None:
        self.calls.append("suspend")
        self.st = PAUSED

    def resume(self) -> None:
        self.calls.append("resume")
        self.st = RUNNING

    def name(self) -> str:
        return "web1"


class FakeConn:
    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom
        self.closed = False

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:  # noqa: N802 - libvirt's name
        assert uuid == DESC["uuid"]
        return self.dom

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    binding = SimpleNamespace(VIR_DOMAIN_RUNNING=RUNNING, VIR_DOMAIN_PAUSED=PAUSED, libvirtError=RuntimeError)
    box: dict[str, Any] = {}

    def connect(uri: str) -> FakeConn:
        assert uri == DESC["uri"]
        box["conn"] = FakeConn(box["dom"])
        return box["conn"]

    monkeypatch.setattr(vmsight.libvirt, "binding", lambda: binding)
    monkeypatch.setattr(vmsight.libvirt, "connect", connect)
    seen: list[int] = []
    real = watchdog._give_back

    def give_back(ram: Any, journal: str) -> bool:
        seen.append(box["dom"].st)   # the run state while the entries are rewritten
        return real(ram, journal)

    monkeypatch.setattr(watchdog, "_give_back", give_back)
    box["seen"] = seen
    return box


def _journal(tmp_path: Path) -> tuple[str, dict[str, Any], dict[int, int], Path]:
    ram_path = tmp_path / "guest.ram"
    cleared = {0x1000 + 8 * i: (0x200000 + i * 0x1000) | PRESENT_A for i in range(64)}
    data = bytearray(0x2000)
    for gpa, old in cleared.items():
        data[gpa:gpa + 8] = (old & ~0x20).to_bytes(8, "little")   # A cleared by the dead parent
    ram_path.write_bytes(bytes(data))
    wd = watchdog.WatchdogClient.start(want="running")
    try:
        wd.accessed(cleared)
        journal = wd._journal
        assert journal is not None
        wd._journal = None   # kept: the "dead parent" leaves it
        wd._send("accessed -")
    finally:
        wd.stop(clean=True)
        wd.proc.wait(15)
    return journal, {"path": str(ram_path), "ranges": [[0, 0x2000, 0]]}, cleared, ram_path


def _entries(ram_path: Path, cleared: dict[int, int]) -> dict[int, int]:
    data = ram_path.read_bytes()
    return {g: int.from_bytes(data[g:g + 8], "little") for g in cleared}


def test_running_domain_is_suspended_for_the_give_back_and_resumed(tmp_path: Path, fake: Any) -> None:
    journal, ram, cleared, ram_path = _journal(tmp_path)
    fake["dom"] = FakeDomain(RUNNING)
    assert settle_libvirt(DESC, "running", journal, ram)
    assert fake["dom"].calls == ["suspend", "resume"] and fake["seen"] == [PAUSED]
    assert _entries(ram_path, cleared) == cleared and not Path(journal).exists() and fake["conn"].closed


def test_domain_left_suspended_by_the_dead_parent_is_resumed(tmp_path: Path, fake: Any) -> None:
    journal, ram, cleared, ram_path = _journal(tmp_path)
    fake["dom"] = FakeDomain(PAUSED)   # killed inside vm.paused()
    assert settle_libvirt(DESC, "running", journal, ram)
    assert fake["dom"].calls == ["resume"] and fake["seen"] == [PAUSED]
    assert _entries(ram_path, cleared) == cleared


def test_domain_found_paused_stays_paused(tmp_path: Path, fake: Any) -> None:
    journal, ram, cleared, ram_path = _journal(tmp_path)
    fake["dom"] = FakeDomain(PAUSED)
    assert settle_libvirt(DESC, "paused", journal, ram)
    assert fake["dom"].calls == [] and _entries(ram_path, cleared) == cleared
    fake["dom"] = FakeDomain(PAUSED)
    assert settle_libvirt(DESC, "running")   # nothing to give back: only the run state
    assert fake["dom"].calls == ["resume"] and fake["seen"] == [PAUSED]


def test_unreachable_libvirt_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(uri: str) -> None:
        raise TargetError("libvirtd is not running")

    monkeypatch.setattr(vmsight.libvirt, "connect", refuse)
    assert not settle_libvirt(DESC, "running")


def test_undo_takes_the_libvirt_path_without_a_stub(tmp_path: Path, fake: Any) -> None:
    journal, ram, cleared, ram_path = _journal(tmp_path)
    fake["dom"] = FakeDomain(RUNNING)
    stream = io.BytesIO(f"want running\nram {json.dumps(ram)}\nlibvirt {json.dumps(DESC)}\n"
                        f"accessed {journal}\nlibvirt {{\"uri\": 1}}\n".encode())   # the malformed line is skipped
    st = read_until_eof(stream)
    assert st.libvirt == DESC and st.journal == journal and not st.bye and st.gdb is None
    assert watchdog.undo(st, None)
    assert fake["dom"].calls == ["suspend", "resume"] and _entries(ram_path, cleared) == cleared
