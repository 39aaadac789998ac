"""Loaded modules seen from the host vs the guest's /proc/modules. The test guests boot without modules,
so two small dependency-free ones from the kernel's own Debian package (crc7, crc-itu-t) are copied in
through the agent and loaded with insmod."""

from __future__ import annotations

import base64
import lzma

import pytest

from tests.conftest import need
from vmsight.linux import for_each_module, kernel_of
from vmsight.qemu.kernels import module_file
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM

pytestmark = pytest.mark.guest

MODULES = ("crc7", "crc-itu-t")


def module_bytes(release: str, name: str) -> bytes | None:
    path = module_file(release, name)
    if path is None:
        return None
    return lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()


def load_module(guest: VmInstance, release: str, name: str) -> None:
    data = module_bytes(release, name)
    need(data is not None, f"{name}.ko of {release} not fetched: run scripts/setup.sh")
    assert data is not None
    b64 = base64.b64encode(data).decode()
    path = f"/tmp/{name}.ko"
    guest.agent.run(f"rm -f {path}.b64").check()
    for i in range(0, len(b64), 3000):
        guest.agent.run(f"printf %s '{b64[i:i + 3000]}' >> {path}.b64").check()
    r = guest.agent.run(f"base64 -d {path}.b64 > {path} && (grep -q '^{name.replace('-', '_')} ' /proc/modules "
                        f"|| insmod {path})")
    assert r.rc == 0, r.stderr


def proc_modules(guest: VmInstance) -> dict[str, tuple[int, int]]:
    out = {}
    for line in guest.agent.run("cat /proc/modules").check().text.splitlines():
        f = line.split()
        out[f[0]] = (int(f[1]), int(f[5], 16))
    return out


def test_lsmod_matches_proc_modules(guest: VmInstance, vm: VM) -> None:
    release = guest.agent.run("uname -r").check().text.strip()
    for name in MODULES:
        load_module(guest, release, name)
    truth = proc_modules(guest)
    assert {"crc7", "crc_itu_t"} <= set(truth)
    k = kernel_of(vm)
    with vm.paused():
        mods = list(for_each_module(k))
        assert {m.name: (m.size, m.base) for m in mods} == truth
        assert all(m.state == "Live" for m in mods)
        # An address inside a module resolves to it; symbols of the image still resolve by kallsyms.
        crc7 = next(m for m in mods if m.name == "crc7")
        assert k.lookup(crc7.base + 0x10) == ("[crc7]", 0x10)
        assert k.symbolize(k.symbol("schedule") + 4) == "schedule+0x4"
