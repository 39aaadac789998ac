"""Kernel discovery on live guests (6.1 cloud and 6.12, KASLR on), checked against the guest's own view
(its /proc/kallsyms, /proc/version, /proc/cmdline, hostname) through the guest agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsight.linux import Guest, current_task, find_task, for_each_task, kernel_of
from vmsight.linux.kernel import DEFAULT_TEXT_GVA, discover, discover_in_memory, set_hostname, uname
from vmsight.memory.paging import gva_to_gpa
from vmsight.qemu.launch import VmInstance
from vmsight.vm import VM

pytestmark = pytest.mark.guest

SYMBOLS = ("_text", "init_task", "linux_banner", "init_uts_ns", "schedule", "do_sys_open", "page_offset_base",
           "__start_BTF", "init_top_pgt")


def kallsyms_truth(guest: VmInstance, names: tuple[str, ...]) -> dict[str, int]:
    pattern = " ".join(f"-e ' {n}$'" for n in names)
    out = guest.agent.run(f"grep {pattern} /proc/kallsyms").check().text
    truth: dict[str, int] = {}
    for line in out.splitlines():
        addr, _t, name = line.split()[:3]
        truth.setdefault(name, int(addr, 16))
    return truth


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("VMSIGHT_CACHE", str(tmp_path))
    yield tmp_path


def test_discovery_matches_guest(guest: VmInstance, vm: VM, fresh_cache: Path) -> None:
    with vm.paused():
        k = discover(vm)
    assert not k.from_cache
    release = guest.agent.run("uname -r").check().text.strip()
    assert k.release == release
    assert k.banner == guest.agent.run("cat /proc/version").check().text.strip()
    truth = kallsyms_truth(guest, SYMBOLS)
    assert truth["_text"] == k.text_gva
    for name, gva in truth.items():
        assert k.symbol(name) == gva, name
    assert k.kaslr_slide == k.text_gva - DEFAULT_TEXT_GVA
    assert k.text_gpa % 0x200000 == 0
    # The physical base and page_offset_base are right if the kernel's own page tables agree with them.
    assert gva_to_gpa(vm.phys, k.dtb, k.text_gva) == k.text_gpa
    assert gva_to_gpa(vm.phys, k.dtb, k.page_offset_base + 0x123000) == 0x123000
    # vmemmap: the struct page of the kernel's first frame is mapped where vmemmap_base says.
    gva_to_gpa(vm.phys, k.dtb, k.vmemmap_base + (k.text_gpa >> 12) * k.sizeof("page"))
    assert k.paging_mode == "4-level"
    assert len(k.symbols) > 50_000
    assert len(k.btf) > 50_000
    # A later attach to the same build comes from the cache and agrees.
    assert list(fresh_cache.glob("kernels-seen/*/meta.json"))
    with vm.paused():
        k2 = discover(vm)
    assert k2.from_cache
    assert k2.facts() | {"from_cache": False} == k.facts()
    # Offsets resolved from BTF are kept with the entry: the next attach walks tasks without parsing BTF,
    # and without reading the full symbol table (the hot symbols suffice).
    with vm.paused():
        pids = sorted(t.pid for t in for_each_task(k2))
        assert not k2.has_member("task_struct", "no_such_member_here")
    k2.flush_offsets()
    offsets = json.loads(next(fresh_cache.glob("kernels-seen/*/offsets.json")).read_text())
    assert offsets["task_struct\tpid"] == k.offsetof("task_struct", "pid")
    assert offsets["task_struct\tno_such_member_here"] == -1
    with vm.paused():
        k3 = discover(vm)
        assert k3.from_cache and sorted(t.pid for t in for_each_task(k3)) == pids
        assert k3._btf is None and k3.symbols._names is None          # neither was needed
        assert not k3.has_member("task_struct", "no_such_member_here") and k3._btf is None
        assert k3.symbol("schedule") == truth["schedule"]              # a cold symbol: the table, loaded now
        assert k3.symbols._names is not None


def test_address_to_symbol(guest: VmInstance, vm: VM) -> None:
    k = kernel_of(vm)
    truth = kallsyms_truth(guest, ("schedule", "init_task"))
    assert k.lookup(truth["schedule"] + 0x10) == ("schedule", 0x10)
    assert k.symbolize(truth["init_task"]) == "init_task"


def test_typed_objects_and_globals(guest: VmInstance, vm: VM) -> None:
    comm1 = guest.agent.run("cat /proc/1/comm").check().text.strip()
    cmdline = guest.agent.run("cat /proc/cmdline").check().text.strip()
    hostname = guest.agent.run("hostname").check().text.strip()
    g = Guest(vm)
    k = g.kernel
    with vm.paused():
        init = g.object("init_task")
        assert init.comm.string_() == "swapper/0"
        assert int(init.pid) == 0
        one = find_task(k, 1)
        assert one.comm == comm1
        assert int(g.object("", "struct task_struct", one.gva).pid) == 1
        assert int(init.tasks.next) == one.gva + k.offsetof("task_struct", "tasks")
        assert k.saved_command_line() == cmdline
        u = uname(k)
    assert u["release"] == k.release
    assert u["nodename"] == hostname
    assert u["machine"] == "x86_64"


def test_hostname_write_is_seen_by_guest(guest: VmInstance, vm: VM) -> None:
    k = kernel_of(vm)
    old = guest.agent.run("hostname").check().text.strip()
    try:
        with vm.paused():
            set_hostname(k, "seen-from-host")
        assert guest.agent.run("hostname").check().text.strip() == "seen-from-host"
        with vm.paused():
            assert uname(k)["nodename"] == "seen-from-host"
    finally:
        with vm.paused():
            set_hostname(k, old)
    assert guest.agent.run("hostname").check().text.strip() == old


def test_per_cpu_current_task(guest: VmInstance, vm: VM) -> None:
    k = kernel_of(vm)
    with vm.paused():
        assert k.nr_cpu_ids() == 2
        for cpu in range(2):
            regs = vm.registers(cpu)
            gs = regs["gs_base"] if regs["cs"] & 3 == 0 else regs["k_gs_base"]
            assert k.per_cpu_offset(cpu) == gs      # kernel-mode GS base is the per-cpu base
            cur = current_task(k, cpu)
            if cur.pid == 0:
                assert cur.comm == f"swapper/{cpu}"
            else:
                assert find_task(k, cur.pid) == cur


def test_ram_scan_fallback_without_page_tables(guest: VmInstance, vm: VM) -> None:
    """With no CR3 to start from, every token table in RAM is tried (stale copies included) and the
    live one is recognised by the init_top_pgt walk."""
    text = kallsyms_truth(guest, ("_text",))["_text"]
    with vm.paused():
        k = discover_in_memory(vm.phys, [], False, use_cache=False)
    assert k.text_gva == text
    assert "ram_scan" in k.timings
    assert gva_to_gpa(vm.phys, k.dtb, text) == k.text_gpa


def test_cli_sym_uname_lsmod_json(guest: VmInstance) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> object:
        r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "--json", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    truth = kallsyms_truth(guest, ("schedule", "init_task", "_text"))
    out = cli("sym", "schedule", "init_task", "_text", hex(truth["schedule"] + 5))
    assert isinstance(out, list)
    assert [o["address"] for o in out[:3]] == [truth["schedule"], truth["init_task"], truth["_text"]]
    assert out[3]["symbol"] == "schedule" and out[3]["offset"] == 5
    one = cli("sym", "schedule")
    assert isinstance(one, list) and [o["address"] for o in one] == [truth["schedule"]]   # a list even for one
    u = cli("uname")
    assert isinstance(u, dict)
    assert u["release"] == guest.agent.run("uname -r").check().text.strip()
    assert u["nodename"] == guest.agent.run("hostname").check().text.strip()
    mods = cli("lsmod")
    assert isinstance(mods, list)
    truth_mods = guest.agent.run("cut -d' ' -f1 /proc/modules").check().text.split()
    assert sorted(m["name"] for m in mods) == sorted(truth_mods)
    r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", guest.dir, "sym", "no_such_symbol_xyz"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no_such_symbol_xyz" in r.stderr
