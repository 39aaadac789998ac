"""The RAM layout vmsight computes from a libvirt domain's XML (machine type, size: no monitor) equals the one QEMU
builds, read from QEMU's own ``info mtree -f``, for pc and q35 boards around their PCI-hole splits. QEMU is started
with -S as libvirt starts it (memory-backend-ram ``pc.ram``): nothing runs, no RAM is touched."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need
from vmsight.libvirt import ram_layout
from vmsight.memory.layout import RamLayout
from vmsight.qemu.layout import parse_mtree
from vmsight.qemu.qmp import Qmp

pytestmark = pytest.mark.guest

# Left out by vmsight: the VGA window (MMIO with a VGA device) and the PAM area (ROM until the firmware maps RAM
# there, as under -S here); Linux keeps none of its own data there.
LEGACY = (0xA0000, 0x100000)


def _cut(layout: RamLayout) -> list[tuple[int, int, int]]:
    """(gpa, end, offset) pieces outside the legacy area, adjacent pieces joined."""
    out: list[list[int]] = []
    for r in layout:
        for lo, hi in ((r.gpa, min(r.end, LEGACY[0])), (max(r.gpa, LEGACY[1]), r.end)):
            if lo >= hi:
                continue
            off = r.offset + lo - r.gpa
            if out and out[-1][1] == lo and out[-1][2] + (lo - out[-1][0]) == off:
                out[-1][1] = hi
            else:
                out.append([lo, hi, off])
    return [(a, b, c) for a, b, c in out]


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("mib", [256, 2816, 3072, 3584, 4096, 5120])
def test_layout_matches_qemu(tmp_path: Path, machine: str, mib: int) -> None:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed (scripts/setup.sh)")
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
                             "-machine", f"{machine},memory-backend=pc.ram", "-m", f"{mib}M",
                             "-object", f"memory-backend-ram,id=pc.ram,size={mib}M",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        with Qmp(str(sock)) as q:
            qemu = parse_mtree(q.hmp("info mtree -f"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ours = ram_layout(f"pc-{'q35' if machine == 'q35' else 'i440fx'}-7.2", mib << 20)
    assert {r.block for r in qemu} == {"pc.ram"}
    assert _cut(ours) == _cut(qemu)
    assert ours.total_bytes == (mib << 20) - (LEGACY[1] - LEGACY[0])
