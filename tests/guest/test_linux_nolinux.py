""""No Linux kernel found in guest memory": for RAM without a kernel (zeros, noise, and noise holding stale
kernel-looking data), and for a real QEMU whose guest has not booted (paused before the firmware ran)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import need
from vmsight.errors import NoLinuxKernel
from vmsight.linux.kernel import NO_LINUX, discover, discover_in_memory
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import BufferRam
from vmsight.vm import attach


def ram(data: bytes | bytearray) -> BufferRam:
    return BufferRam(bytearray(data), RamLayout([RamRange(0, len(data), 0, "test")]))


def test_zero_ram_is_not_linux() -> None:
    with pytest.raises(NoLinuxKernel, match=NO_LINUX):
        discover_in_memory(ram(bytes(32 << 20)), [0x1000], False, use_cache=False)


def test_noise_with_stale_fragments_is_not_linux() -> None:
    rng = np.random.default_rng(7)
    buf = bytearray(rng.integers(0, 256, 32 << 20, dtype=np.uint8).tobytes())
    # Fragments that look like a kernel's: a banner, a token-table digit run, a BTF magic.
    buf[0x100000:0x100000 + 60] = b"Linux version 6.1.0-56-cloud-amd64 (stale copy) #1 SMP\n\0".ljust(60, b"\0")
    buf[0x300000:0x300014] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
    buf[0x500000:0x500004] = b"\x9f\xeb\x01\x00"
    # A CR3 whose "page tables" are the noise itself.
    with pytest.raises(NoLinuxKernel, match=NO_LINUX):
        discover_in_memory(ram(buf), [0x200000], False, use_cache=False)


@pytest.mark.guest
def test_unbooted_guest(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    need(qemu is not None, "qemu-system-x86_64 not installed")
    assert qemu is not None
    sock = str(tmp_path / "qmp.sock")
    ram_file = f"/dev/shm/vmsight-nolinux-{os.getpid()}.ram"
    proc = subprocess.Popen([qemu, "-S", "-nodefaults", "-display", "none", "-machine", "pc,memory-backend=mem",
                             "-accel", "tcg", "-m", "64M", "-object",
                             f"memory-backend-file,id=mem,size=64M,mem-path={ram_file},share=on",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        with attach(sock) as vm:
            with pytest.raises(NoLinuxKernel, match=NO_LINUX):
                discover(vm)
    finally:
        proc.kill()
        proc.wait(10)
        Path(ram_file).unlink(missing_ok=True)
