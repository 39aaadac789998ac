"""Boot the idle-tracking test kernel (guest/build-idle-kernel.sh) with the host's root over 9p and run
tests/inguest there with the host's Python: page_idle, DAMON, THP and zram swap are only real inside it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
# Staying close to qemu64 keeps the TLB behaviour FIELD-NOTES measured (no PCID, 4-level paging).


def idle_kernel() -> Path:
    frag = (ROOT / "guest" / "idle-kernel.config").read_bytes()
    return (Path.home() / ".cache/vmsight/kernels" / f"idle-6.12-{hashlib.sha256(frag).hexdigest()[:16]}"
            / "bzImage")


@pytest.fixture(scope="module")
def idle_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    k = idle_kernel()
    need(k.is_file(), f"idle-tracking kernel not built: run guest/build-idle-kernel.sh (expects {k})")
    cfg = LaunchConfig(kernel=str(k), memory="1G", smp=2, host_root=True, gdb=False)  # the launcher gives TCG an x86-64-v2 CPU (numpy)
    with launch(cfg, tmp_path_factory.mktemp("idle-vm")) as vm:
        yield vm


def test_kernel_has_what_the_tracker_needs(idle_guest: VmInstance) -> None:
    r = idle_guest.agent.run("ls /sys/kernel/mm/page_idle/bitmap /sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds "
                             "/proc/kpageflags /sys/class/zram-control/hot_add && nproc", timeout=60, root="host")
    assert r.rc == 0, r.stderr
    assert r.stdout.decode().split()[-1] == "2"


def test_inguest_suite(idle_guest: VmInstance) -> None:
    r = idle_guest.agent.run(f"cd {ROOT} && .venv/bin/python -m pytest -p no:cacheprovider -q -rA -s tests/inguest",
                             timeout=900, root="host")
    out = r.stdout.decode(errors="replace")
    print(out[-6000:])
    assert r.rc == 0, out[-4000:] + r.stderr.decode(errors="replace")[-2000:]
    assert " passed" in out and "skipped" not in out.split("short test summary")[-1].split("\n")[0]
