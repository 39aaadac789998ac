"""Shared fixtures: real QEMU guests (session-scoped: one boot per kernel per configuration).

Tests that need something this machine lacks skip with a reason; with VMSIGHT_REQUIRE_ALL=1 (CI) such a
skip becomes a failure, so a missing install step cannot hide behind a green run."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsight.qemu.initramfs import build_workload
from vmsight.qemu.kernels import cached_kernel
from vmsight.qemu.launch import LaunchConfig, VmInstance, launch
from vmsight.qemu.qmp import Qmp
from vmsight.vm import VM, attach

# tests/inguest runs inside the idle-tracking guest (driven by tests/guest/test_idle_in_guest.py); on a host
# without page_idle it has nothing to run, so it is not collected rather than reported as skipped.
collect_ignore_glob = [] if os.path.exists("/sys/kernel/mm/page_idle/bitmap") else ["inguest/*"]

KERNELS = ("debian-6.1", "debian-6.12")
WORKLOAD = "/bin/vmsight-workload"  # guest_workload.c, in every test guest


def need(condition: bool, reason: str) -> None:
    """Skip (or fail under VMSIGHT_REQUIRE_ALL=1) unless ``condition``."""
    if condition:
        return
    if os.environ.get("VMSIGHT_REQUIRE_ALL") == "1":
        pytest.fail(f"required capability missing: {reason}")
    pytest.skip(reason)


def _boot(tmp_path_factory: pytest.TempPathFactory, kernel: str, **kw: object) -> Iterator[VmInstance]:
    need(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 not installed (scripts/setup.sh)")
    need(cached_kernel(kernel) is not None, f"kernel {kernel} not cached (scripts/setup.sh fetches it)")
    d = tmp_path_factory.mktemp(f"vm-{kernel}")
    # 512 MiB: below that Linux turns transparent huge pages off at boot.
    kw.setdefault("memory", "512M")
    kw.setdefault("guest_files", {WORKLOAD: str(build_workload())})
    cfg = LaunchConfig(kernel=kernel, smp=2, **kw)  # type: ignore[arg-type]
    with launch(cfg, d) as inst:
        yield inst


@pytest.fixture(scope="session", params=KERNELS)
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmInstance]:
    """A running guest (2 vCPUs, 512 MiB, KASLR on) per Debian kernel, with the test workload in /bin; the
    guest agent gives ground truth."""
    yield from _boot(tmp_path_factory, request.param)


def _status(guest: VmInstance) -> str:
    with Qmp(guest.qmp) as q:
        return q.status()


@pytest.fixture()
def vm(guest: VmInstance, request: pytest.FixtureRequest) -> Iterator[VM]:
    """vmsight attached to ``guest``; detached after the test, which must leave the VM running (a VM left
    paused would hang the next test's guest agent, far from the culprit)."""
    status = _status(guest)
    assert status == "running", f"the guest was left {status} by an earlier test (before {request.node.name})"
    with attach(guest.dir) as v:
        yield v
    assert guest.alive()
    deadline = time.monotonic() + 2.0
    while (status := _status(guest)) != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == "running", f"{request.node.name} left the guest {status}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
