"""Boot the idle-tracking test kernel (guest/build-idle-kernel.sh) with the host's root over 9p and run
tests/inguest there with the host's Python: page_idle, DAMON, THP and zram swap are only real inside it.
The checkout is shared at its own path as well (LaunchConfig.host_dirs), so the suite runs wherever the
checkout lives: under /tmp (a CI clone) as under /run or /dev/shm, which the guest mounts itself."""

from __future__ import annotations

import hashlib
import secrets
import shlex
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
def markers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Host files the guest must see at their own paths: one under the host's /tmp (which the guest used to
    hide under its own tmpfs), one in a shared directory below /dev/shm (where the guest mounts its own)."""
    shm = Path(f"/dev/shm/vmsight-test-{secrets.token_hex(4)}")
    shm.mkdir(mode=0o700)
    try:
        out = {"tmp": tmp_path_factory.mktemp("marker") / "marker", "shm": shm / "marker"}
        for name, p in out.items():
            p.write_text(f"host {name} {secrets.token_hex(8)}\n")
        yield out
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def idle_guest(tmp_path_factory: pytest.TempPathFactory, markers: dict[str, Path]) -> Iterator[VmInstance]:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed")
    k = idle_kernel()
    need(k.is_file(), f"idle-tracking kernel not built: run guest/build-idle-kernel.sh (expects {k})")
    # the launcher gives TCG an x86-64-v2 CPU (numpy)
    cfg = LaunchConfig(kernel=str(k), memory="1G", smp=2, host_root=True, gdb=False,
                       host_dirs=[str(ROOT), str(markers["shm"].parent)])
    with launch(cfg, tmp_path_factory.mktemp("idle-vm")) as vm:
        yield vm


def test_host_paths_seen_as_on_the_host(idle_guest: VmInstance, markers: dict[str, Path]) -> None:
    """The host root shows the host's /tmp as it is, a shared directory is mounted at its own path even below
    the guest's own /dev/shm, and guest writes to either stay in the guest."""
    tmp, shm = (shlex.quote(str(markers[k])) for k in ("tmp", "shm"))
    r = idle_guest.agent.run(f"cat {tmp} {shm} && echo guest > {tmp} && echo guest > {shm} && cat {tmp} {shm} && "
                             f"cat {shlex.quote(str(ROOT / 'pyproject.toml'))} | head -1", timeout=60, root="host")
    assert r.rc == 0, r.stderr
    want = markers["tmp"].read_text() + markers["shm"].read_text() + "guest\nguest\n"
    assert r.stdout.decode().startswith(want)
    assert "guest" not in markers["tmp"].read_text() + markers["shm"].read_text()
    assert r.stdout.decode()[len(want):] == (ROOT / "pyproject.toml").read_text().splitlines(keepends=True)[0]


def test_kernel_has_what_the_tracker_needs(idle_guest: VmInstance) -> None:
    r = idle_guest.agent.run("ls /sys/kernel/mm/page_idle/bitmap /sys/kernel/mm/damon/admin/kdamonds/nr_kdamonds "
                             "/proc/kpageflags /sys/class/zram-control/hot_add && nproc", timeout=60, root="host")
    assert r.rc == 0, r.stderr
    assert r.stdout.decode().split()[-1] == "2"


def test_inguest_suite(idle_guest: VmInstance) -> None:
    # Temporary files in the guest's own tmpfs (/run), apart from the host's /tmp and its pytest directories.
    r = idle_guest.agent.run(f"mkdir -p -m 1777 /run/inguest-tmp && cd {shlex.quote(str(ROOT))} && "
                             "TMPDIR=/run/inguest-tmp .venv/bin/python -m pytest -p no:cacheprovider -q -rA -s "
                             "tests/inguest", timeout=900, root="host")
    out = r.stdout.decode(errors="replace")
    print(out[-6000:])
    assert r.rc == 0, out[-4000:] + r.stderr.decode(errors="replace")[-2000:]
    assert " passed" in out and "skipped" not in out.split("short test summary")[-1].split("\n")[0]
