"""Memory dumps as targets: a paused guest's `dump-guest-memory` ELF core and `pmemsave` image read by the
CLI give the same ps, maps, lsmod and uname as the live, still-paused guest; the core's vCPU notes agree
with what QEMU's HMP says about the same stopped vCPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.guest.test_linux_modules import MODULES, load_module
from vmsight.dump import open_dump
from vmsight.qemu.launch import VmInstance
from vmsight.qemu.monitors import connect_monitor
from vmsight.qemu.qmp import Qmp
from vmsight.vm import attach

pytestmark = pytest.mark.guest

COMMANDS = (["ps"], ["ps", "--threads"], ["maps", "1"], ["lsmod"], ["uname", "-a"])


def cli(target: str, *argv: str) -> Any:
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", target, "--json", *argv],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"vmsight --vm {target} {' '.join(argv)}: {r.stderr}"
    out = json.loads(r.stdout)
    if argv[0] == "uname":
        out["kernel"].pop("from_cache")  # how this run found the kernel, not what it found
    return out


def test_dumps_equal_live_guest(guest: VmInstance, tmp_path: Path) -> None:
    release = guest.agent.run("uname -r").check().text.strip()
    for name in MODULES:  # something for lsmod to list
        load_module(guest, release, name)
    core, raw = tmp_path / "core.elf", tmp_path / "ram.raw"
    # The primary monitor, claimed like vmsight commands claim one (they then use the spare ones without
    # waiting for this one's greeting); dump-guest-memory and pmemsave answer when the file is written,
    # which on a loaded host takes longer than QMP's default 3 s.
    q, claim = connect_monitor(guest.dir, [guest.qmp], "tests/guest/test_dumps.py",
                               lambda path: Qmp(path, timeout=120))
    try:
        with q:
            assert q.status() == "running"
            q.execute("stop")
            try:
                q.execute("dump-guest-memory", paging=False, protocol=f"file:{core}")
                ram = int(q.execute("query-memory-size-summary")["base-memory"])
                q.execute("pmemsave", val=0, size=ram, filename=str(raw))
                assert raw.stat().st_size == ram

                live = {" ".join(c): cli(guest.dir, *c) for c in COMMANDS}
                assert q.status() == "paused"  # the CLI left the paused guest paused
                assert {p["pid"] for p in live["ps"]} >= {1, 2}
                assert live["maps 1"] and {"crc7", "crc_itu_t"} <= {m["name"] for m in live["lsmod"]}
                assert live["uname -a"]["release"] == release
                for path in (core, raw):
                    for c in COMMANDS:
                        assert cli(str(path), *c) == live[" ".join(c)], f"{' '.join(c)} on {path.name}"
                # A raw image with the kernel's page table given finds the same kernel.
                dtb = live["uname -a"]["kernel"]["init_top_pgt_gpa"]
                assert cli(str(raw), "ps", "--cr3", hex(dtb)) == live["ps"]

                # The core's notes hold each vCPU's state as HMP shows it for the same stopped vCPUs.
                with attach(guest.dir) as vm, open_dump(str(core)) as dump:
                    hmp = vm.control_registers()
                    notes = dump.control_registers()
                    assert sorted(notes) == sorted(hmp) == [v.index for v in vm.vcpus()]
                    for i, regs in hmp.items():
                        for k in ("cr0", "cr2", "cr3", "cr4", "rip", "rsp", "eflags", "cs", "ss", "fs_base",
                                  "gs_base"):
                            assert notes[i][k] == regs[k], (i, k)
                        assert notes[i]["efer"] & 0x400 == regs["efer"] & 0x400  # long mode, as inferred
                assert q.status() == "paused"
            finally:
                q.execute("cont")
    finally:
        claim.release()
