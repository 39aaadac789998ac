"""Discovery and process views on guests booted with ``pti=on`` (6.1) and ``nokaslr`` (6.12): two extra
boots (module scope), each checked against the guest's /proc through the agent. Together with the
session guests (both kernels, KASLR on, PTI off under TCG) this covers both kernels in every mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _boot
from tests.guest.workload import norm_maps
from vmsight.linux import Guest, processes
from vmsight.linux.kernel import DEFAULT_TEXT_GPA, DEFAULT_TEXT_GVA, discover, discover_in_memory
from vmsight.linux.mm import task_vmas
from vmsight.memory.paging import CR3_PTI_USER
from vmsight.qemu.launch import VmInstance
from vmsight.vm import attach

pytestmark = pytest.mark.guest

CONFIGS = {"pti": ("debian-6.1", "pti=on"), "nokaslr": ("debian-6.12", "nokaslr")}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def special(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, VmInstance]]:
    kernel, append = CONFIGS[request.param]
    for inst in _boot(tmp_path_factory, kernel, append=append):
        inst.agent.run("sleep 2001 >/dev/null 2>&1 &").check()
        yield request.param, inst


def test_discovery_and_processes(special: tuple[str, VmInstance], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mode, guest = special
    monkeypatch.setenv("VMSIGHT_CACHE", str(tmp_path))       # cold discovery in this mode
    text = int(guest.agent.run("grep ' _text$' /proc/kallsyms").check().text.split()[0], 16)
    pid = int(guest.agent.run("pidof sleep").check().text.split()[0])
    maps = norm_maps(guest.agent.run(f"cat /proc/{pid}/maps").check().text)
    release = guest.agent.run("uname -r").check().text.strip()
    with attach(guest.dir) as vm:
        with vm.paused():
            k = discover(vm)
            assert k.release == release
            assert k.text_gva == text
            if mode == "nokaslr":
                assert k.text_gva == DEFAULT_TEXT_GVA and k.kaslr_slide == 0
                assert k.text_gpa == DEFAULT_TEXT_GPA
            else:
                assert k.pti_enabled()
            g = Guest(vm)
            p = g.process(pid)
            if mode == "pti":
                # The user half is read through the user PGD (kernel PGD + 4 KiB).
                assert p.dtb == p.task.kernel_dtb + 0x1000
            assert p.task.cmdline() == ["sleep", "2001"]
            assert [(v.start, v.end, v.perms, v.offset, v.path) for v in task_vmas(k, pid)] == maps
            assert p.read(maps[0][0], 4) == b"\x7fELF"
        ours = {d["pid"]: d for d in processes(vm)}
    assert ours[pid]["cmdline"] == "sleep 2001"
    assert ours[1]["comm"] == "init"


@pytest.mark.parametrize("special", ["pti"], indirect=True)
def test_pti_user_mode_cr3_still_finds_kernel(special: tuple[str, VmInstance], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With PTI a vCPU in user mode holds the user PGD (bit 12 set); discovery then uses the kernel half."""
    mode, guest = special
    assert mode == "pti"
    monkeypatch.setenv("VMSIGHT_CACHE", str(tmp_path))
    text = k_text(guest)
    guest.agent.run("(while :; do :; done) >/dev/null 2>&1 & echo $! > /tmp/spin").check()
    try:
        with attach(guest.dir) as vm:
            seen_user = False
            for _ in range(100):
                with vm.paused():
                    for cpu in (0, 1):
                        regs = vm.registers(cpu)
                        if regs["cs"] & 3 == 3:
                            seen_user = True
                            assert regs["cr3"] & CR3_PTI_USER
                            # Only the user-mode CR3 is given: the kernel half of its PGD pair is used.
                            k = discover_in_memory(vm.phys, [regs["cr3"]], False, use_cache=False)
                            assert k.text_gva == text
                            break
                if seen_user:
                    break
            assert seen_user, "no vCPU was caught in user mode"
    finally:
        guest.agent.run("kill $(cat /tmp/spin)")


def k_text(guest: VmInstance) -> int:
    return int(guest.agent.run("grep ' _text$' /proc/kallsyms").check().text.split()[0], 16)
