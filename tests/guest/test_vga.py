"""Issue 9 item 4: a QEMU with its default devices (no -nodefaults, so a VGA and its `vga.vram` RAM block) and
a QEMU whose RAM is several memory backends (two NUMA nodes) still get the fast shared-file backend, and
what it reads equals QEMU's own view (HMP `xp`, `x`, `gva2gpa`) and the guest's (a process's own writes)."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WORKLOAD, need
from tests.guest.workload import GuestWorkload
from vmsight import linux
from vmsight.errors import PhysicalAddressError
from vmsight.memory.physical import BlockRam
from vmsight.qemu.initramfs import build_workload
from vmsight.qemu.kernels import cached_kernel
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.vm import VM, attach

pytestmark = pytest.mark.guest
KERNEL = "debian-6.12"


def _boot(tmp: Path, **kw: object) -> Iterator[VmInstance]:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed (scripts/setup.sh)")
    need(cached_kernel(KERNEL) is not None, f"kernel {KERNEL} not cached (scripts/setup.sh fetches it)")
    cfg = LaunchConfig(kernel=KERNEL, smp=2, guest_files={WORKLOAD: str(build_workload())}, **kw)  # type: ignore[arg-type]
    with launch(cfg, tmp) as inst:
        yield inst


@pytest.fixture(scope="module")
def vga_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    yield from _boot(tmp_path_factory.mktemp("vga-vm"), defaults=True)


@pytest.fixture(scope="module")
def numa_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    """RAM in two shared files, one per NUMA node (plus the default VGA): two memory backends."""
    private = Path(tempfile.mkdtemp(prefix="vmtest-numa-", dir="/dev/shm"))  # 0700: guest RAM is private
    args = []
    for i in range(2):
        f = private / f"node{i}.ram"
        os.close(os.open(f, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # QEMU would make it 0644
        args += ["-object", f"memory-backend-file,id=node{i},size=192M,mem-path={f},share=on",
                 "-numa", f"node,nodeid={i},memdev=node{i}"]
    try:
        yield from _boot(tmp_path_factory.mktemp("numa-vm"), defaults=True, ram_backend="anonymous",
                         memory="384M", extra_args=args)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _xp(vm: VM, gpa: int, n: int) -> bytes:
    """``n`` bytes at ``gpa`` as HMP `xp` prints them (QEMU's own read of guest-physical memory)."""
    return _hex_dump(vm.qmp.hmp(f"xp /{n}xb {gpa:#x}"))


def _x(vm: VM, gva: int, n: int) -> bytes:
    """``n`` bytes at ``gva`` as HMP `x` prints them (QEMU's walk with the monitor's CPU, vCPU 0)."""
    return _hex_dump(vm.qmp.hmp(f"x /{n}xb {gva:#x}"))


def _hex_dump(text: str) -> bytes:
    return bytes(int(b, 16) for line in text.splitlines() for b in line.split(":", 1)[1].split())


def _gva2gpa(vm: VM, gva: int) -> int | None:
    m = re.search(r"gpa: (0x[0-9a-f]+)", vm.qmp.hmp(f"gva2gpa {gva:#x}"))
    return int(m.group(1), 16) if m else None


def _check_reads(vm: VM, guest: VmInstance) -> None:
    rng = random.Random(9)
    with vm.paused():
        for _ in range(40):
            r = rng.choice(vm.layout.ranges)
            gpa = r.gpa + rng.randrange(max(1, r.size - 64))
            assert vm.read_gpa(gpa, 64) == _xp(vm, gpa, 64), hex(gpa)
        # Across the ranges' edges (the first MiB's ROM shadows, the node boundary), where dispatch happens.
        for r in vm.layout.ranges[1:]:
            if vm.layout.find(r.gpa - 1) is not None:
                assert vm.read_gpa(r.gpa - 32, 64) == _xp(vm, r.gpa - 32, 64), hex(r.gpa)
        assert any(vm.read_gpa(0x1000000, 0x10000)), "the kernel is in RAM: the sample must not be all zeros"
        regs = vm.registers(0)
        for gva in (regs["rip"], regs["gs_base"], regs["rsp"]):
            t = vm.translate(gva, regs["cr3"])
            assert t.gpa == _gva2gpa(vm, gva), hex(gva)
            assert vm.read_gva(gva, 48, regs["cr3"]) == _x(vm, gva, 48), hex(gva)
    # The guest's own view: kernel discovery over this backend, and a process's writes read from outside.
    g = linux.Guest(vm)
    assert g.kernel.banner == guest.agent.run("cat /proc/version").check().text.strip()
    wl = GuestWorkload(guest, 64, thp=False)
    try:
        pages = [0, 5, 17, 63]
        proc = g.process(wl.pid)

        def firsts() -> list[int]:  # the byte each touch increments, in every page
            with vm.paused():
                return [proc.read(wl.gva(i), 1)[0] for i in pages]

        before = firsts()
        wl.touch(pages)
        wl.touch([5])
        assert firsts() == [(b + n) & 0xFF for b, n in zip(before, (1, 2, 1, 1), strict=True)]
    finally:
        wl.stop()


@pytest.mark.parametrize("target", ["dir", "qmp"])
def test_default_vga_uses_the_shared_ram_file(vga_guest: VmInstance, target: str) -> None:
    """Through vm.json (which names the RAM file) and through the bare QMP socket (any QEMU: the file is
    found from the memory backend). Before: vga.vram read the RAM file at its own block offset 0 (wrong data
    at 0xfd000000), or the RAM file was refused for /proc/PID/mem."""
    with (attach(vga_guest.dir) if target == "dir" else attach(vga_guest.qmp, gdb=vga_guest.gdb)) as vm:
        mtree = vm.qmp.hmp("info mtree -f")
        vram = re.search(r"([0-9a-f]+)-[0-9a-f]+ \(prio \d+, ram\): vga\.vram", mtree)
        assert vram, "the guest must have QEMU's default VGA (no -nodefaults)"
        assert vm.backend == "mapped-ram-file"
        assert {r.block for r in vm.layout} == {"mem"}
        with pytest.raises(PhysicalAddressError):  # a frame buffer, not guest RAM
            vm.read_gpa(int(vram.group(1), 16), 8)
        _check_reads(vm, vga_guest)


def test_two_memory_backends_are_each_mapped(numa_guest: VmInstance) -> None:
    with attach(numa_guest.dir) as vm:
        assert vm.backend == "mapped-ram-file"
        assert isinstance(vm.phys, BlockRam)
        assert {r.block for r in vm.layout} == {"node0", "node1"}
        paths = {b: os.path.realpath(p.path) for b, p in vm.phys.parts.items()}  # type: ignore[attr-defined]
        assert {b: Path(p).name for b, p in paths.items()} == {"node0": "node0.ram", "node1": "node1.ram"}
        r1 = min((r for r in vm.layout if r.block == "node1"), key=lambda r: r.gpa)
        assert r1.gpa == 192 << 20, "node 1 starts where node 0 ends"
        _check_reads(vm, numa_guest)
        # A write through one block's file is seen by QEMU at the guest-physical address of that block.
        gpa = r1.gpa + 0x123000
        with vm.paused():
            old = vm.read_gpa(gpa, 8)
            try:
                vm.write_gpa(gpa, b"VMSIGHT!")
                assert _xp(vm, gpa, 8) == b"VMSIGHT!"
            finally:
                vm.write_gpa(gpa, old)
