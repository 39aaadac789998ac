"""The memory-dump reader (vmsight.dump) on synthetic files: a QEMU-style ELF core built here from the note
layout of target/i386/arch_dump.c, raw images, and damaged files, which must each give one clear line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsight.cli.main import main
from vmsight.dump import DumpError, DumpMachine, open_dump, parse_elf_core
from vmsight.errors import NoLinuxKernel, PhysicalAddressError, TargetError
from vmsight.linux.kernel import discover
from vmsight.target import Machine

PAGE = 4096
PRSTATUS_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                 "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es",
                 "fs", "gs")


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def prstatus(cpu: int, regs: dict[str, int]) -> bytes:
    d = bytearray(112 + 8 * len(PRSTATUS_REGS) + 8)
    struct.pack_into("<I", d, 32, cpu + 1)
    struct.pack_into(f"<{len(PRSTATUS_REGS)}Q", d, 112, *(regs.get(r, 0) for r in PRSTATUS_REGS))
    return note(b"CORE", 1, bytes(d))


def qemu_state(regs: dict[str, int], *, size: int = 440, version: int = 1) -> bytes:
    """QEMUCPUState as QEMU 7.2 writes it (440 bytes: cr[5] then kernel_gs_base)."""
    d = bytearray(max(size, 440))
    struct.pack_into("<II", d, 0, version, size)
    gprs = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
            "r14", "r15", "rip", "eflags")
    struct.pack_into("<18Q", d, 8, *(regs.get(r, 0) for r in gprs))
    for i, seg in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")):
        struct.pack_into("<IIIIQ", d, 152 + 24 * i, regs.get(seg, 0), 0xFFFFFFFF, 0, 0, regs.get(f"{seg}_base", 0))
    struct.pack_into("<5Q", d, 392, *(regs.get(f"cr{i}", 0) for i in range(5)))
    struct.pack_into("<Q", d, 432, regs.get("k_gs_base", 0))
    return note(b"QEMU", 0, bytes(d[:size]))


CPU0 = {"rip": 0xFFFFFFFF81234567, "rsp": 0xFFFFC90000013F00, "cr0": 0x80050033, "cr3": 0x1A2B000,
        "cr4": 0x3506F0, "gs_base": 0xFFFF88801F400000, "k_gs_base": 0x7F0000001000, "cs": 0x10, "ss": 0x18,
        "eflags": 0x246, "rax": 7}
CPU1 = {**CPU0, "rip": 0xFFFFFFFF81000010, "cr3": 0x3C4D000, "cr4": 0x3506F0 | 1 << 12, "gs_base": 0x1000}


def build_core(segments: list[tuple[int, bytes]], cpus: list[dict[str, int]] | None = None,
               *, notes: bytes | None = None) -> bytearray:
    """An ELF64 ET_CORE like dump-guest-memory paging=false: PT_NOTE, then one PT_LOAD per (gpa, data)."""
    cpus = [CPU0, CPU1] if cpus is None else cpus
    if notes is None:
        notes = b"".join(prstatus(i, c) for i, c in enumerate(cpus)) + b"".join(qemu_state(c) for c in cpus)
    phnum = 1 + len(segments)
    phoff = 64
    note_off = phoff + 56 * phnum
    data_off = note_off + len(notes)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 4, 62, 1, 0, phoff, 0, 0, 64,
                       56, phnum, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(notes), len(notes), 0)
    off = data_off
    for gpa, data in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, off, 0, gpa, len(data), len(data), 0)
        off += len(data)
    return bytearray(ehdr + phdrs + notes + b"".join(d for _, d in segments))


def write(tmp_path: Path, data: bytes | bytearray, name: str = "core") -> str:
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p)


def one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes | bytearray) -> str:
    """Run `vmsight --vm FILE ps` on ``data``: exit 2 and exactly one stderr line, no traceback."""
    path = write(tmp_path, data, "bad")
    assert main(["--vm", path, "ps"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsight: error: "), err
    return lines[0]


def test_core_ranges_registers_and_reads(tmp_path: Path) -> None:
    low = bytes(range(256)) * (0xA0000 // 256)
    high = b"\x5a" * PAGE * 4
    path = write(tmp_path, build_core([(0, low), (0x100000, high)]))
    with open_dump(path) as m:
        assert isinstance(m, Machine)
        assert m.kind == "elf-core" and m.backend == "elf-core"
        assert [(r.gpa, r.size) for r in m.layout] == [(0, 0xA0000), (0x100000, 4 * PAGE)]
        assert m.read_gpa(0x1FF, 3) == bytes([0xFF, 0, 1])
        assert m.read_gpa(0x100000 + 5, 4) == b"\x5a" * 4
        with pytest.raises(PhysicalAddressError):  # the hole between the PT_LOADs is not RAM
            m.read_gpa(0xA0000, 1)
        with pytest.raises(TargetError, match="read-only"):
            m.phys.write_gpa(0, b"x")
        assert [v.index for v in m.vcpus()] == [0, 1]
        regs = m.control_registers()
        for i, cpu in enumerate((CPU0, CPU1)):
            for k in ("rip", "rsp", "cr0", "cr3", "cr4", "gs_base", "k_gs_base", "cs", "ss", "eflags"):
                assert regs[i][k] == cpu[k], (i, k)
            assert regs[i]["efer"] & 0x400  # long mode inferred from EM_X86_64 + CR0.PG + CR4.PAE
        assert m.registers(0)["rax"] == 7
        assert m.la57 is False  # vCPU 0's CR4.LA57 is clear
        with m.paused() as same:
            assert same is m


def test_core_cr3_override_and_la57(tmp_path: Path) -> None:
    la57_cpu = {**CPU0, "cr4": CPU0["cr4"] | 1 << 12}
    with open_dump(write(tmp_path, build_core([(0, bytes(PAGE))], [la57_cpu])), cr3=0x5000) as m:
        assert m.la57 is True
        assert m.control_registers()[0]["cr3"] == 0x5000
        assert m.control_registers()[0]["cr4"] == la57_cpu["cr4"]


def test_prstatus_only_and_old_qemu_note(tmp_path: Path) -> None:
    # Another dumper's core (no QEMU notes): general registers only, no CR3, so discovery would scan.
    notes = prstatus(0, CPU0)
    with open_dump(write(tmp_path, build_core([(0, bytes(PAGE))], notes=notes))) as m:
        regs = m.control_registers()[0]
        assert regs["rip"] == CPU0["rip"] and regs["gs_base"] == CPU0["gs_base"] and "cr3" not in regs
    # A QEMU older than kernel_gs_base writes a 432-byte state: read without it.
    notes = prstatus(0, CPU0) + qemu_state(CPU0, size=432)
    with open_dump(write(tmp_path, build_core([(0, bytes(PAGE))], notes=notes), "old")) as m:
        regs = m.control_registers()[0]
        assert regs["cr3"] == CPU0["cr3"] and "k_gs_base" not in regs


def test_raw_image(tmp_path: Path) -> None:
    data = bytearray(16 * PAGE)
    data[0x3008:0x3010] = (0x1122334455667788).to_bytes(8, "little")
    with open_dump(write(tmp_path, data, "raw.img")) as m:
        assert m.kind == "raw" and [(r.gpa, r.size) for r in m.layout] == [(0, 16 * PAGE)]
        assert m.read_gpa(0x3008, 8) == data[0x3008:0x3010]
        assert m.control_registers() == {} and m.vcpus() == []
        with pytest.raises(NoLinuxKernel):  # nothing known and nothing found: scanned, in both paging modes
            discover(m, use_cache=False)
    with open_dump(write(tmp_path, data, "raw.img"), cr3=0x2000) as m:
        assert m.control_registers() == {0: {"cr3": 0x2000}} and [v.index for v in m.vcpus()] == [0]
        with pytest.raises(NoLinuxKernel):
            discover(m, use_cache=False)


def _core(tmp_path: Path) -> bytearray:
    return build_core([(0, bytes(8 * PAGE)), (0x100000, bytes(4 * PAGE))])


def test_truncated_core(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    core = _core(tmp_path)
    line = one_line_error(tmp_path, capsys, core[:len(core) - PAGE])
    assert "truncated" in line and "segment 2" in line
    assert "shorter than an ELF header" in one_line_error(tmp_path, capsys, core[:40])
    assert "program headers end" in one_line_error(tmp_path, capsys, core[:100])


def test_pt_load_beyond_eof(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    core = _core(tmp_path)
    struct.pack_into("<Q", core, 64 + 56 * 1 + 8, 1 << 40)  # PT_LOAD 1's p_offset
    line = one_line_error(tmp_path, capsys, core)
    assert "truncated" in line and "ends past the file" in line
    core = _core(tmp_path)
    struct.pack_into("<Q", core, 64 + 56 * 2 + 32, (1 << 64) - PAGE)  # p_filesz that wraps in C
    assert "ends past the file" in one_line_error(tmp_path, capsys, core)


def test_damaged_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    core = _core(tmp_path)
    struct.pack_into("<H", core, 16, 2)  # ET_EXEC
    assert "not a core dump" in one_line_error(tmp_path, capsys, core)
    core = _core(tmp_path)
    struct.pack_into("<H", core, 18, 3)  # EM_386
    assert "long mode" in one_line_error(tmp_path, capsys, core)
    core = _core(tmp_path)
    core[4] = 1  # ELFCLASS32
    assert "64-bit" in one_line_error(tmp_path, capsys, core)
    core = _core(tmp_path)
    struct.pack_into("<H", core, 56, 0)  # e_phnum 0
    assert "program headers" in one_line_error(tmp_path, capsys, core)
    core = _core(tmp_path)  # two PT_LOADs at the same gpa
    struct.pack_into("<Q", core, 64 + 56 * 2 + 24, 0x1000)
    assert "overlap" in one_line_error(tmp_path, capsys, core)


def test_damaged_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_desc = struct.pack("<III", 5, 0x7FFFFFF0, 0) + b"QEMU\0\0\0\0"
    assert "runs past its segment" in one_line_error(tmp_path, capsys, build_core([(0, bytes(PAGE))],
                                                                                  notes=bad_desc))
    v2 = prstatus(0, CPU0) + qemu_state(CPU0, version=2)
    assert "version 2" in one_line_error(tmp_path, capsys, build_core([(0, bytes(PAGE))], notes=v2))
    small = prstatus(0, CPU0) + qemu_state(CPU0, size=200)
    assert "damaged" in one_line_error(tmp_path, capsys, build_core([(0, bytes(PAGE))], notes=small))
    lying = prstatus(0, CPU0) + note(b"QEMU", 0, qemu_state(CPU0)[20:20 + 300])
    assert "QEMU CPU" in one_line_error(tmp_path, capsys, build_core([(0, bytes(PAGE))], notes=lying))
    mismatch = prstatus(0, CPU0) + prstatus(1, CPU1) + qemu_state(CPU0)
    assert "2 NT_PRSTATUS notes but 1 QEMU" in one_line_error(tmp_path, capsys,
                                                              build_core([(0, bytes(PAGE))], notes=mismatch))


def test_not_a_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "neither an ELF core nor a raw memory image" in one_line_error(tmp_path, capsys, b"garbage" * 1000)
    assert "empty" in one_line_error(tmp_path, capsys, b"")
    # Page-sized garbage is a valid raw image that holds no kernel.
    assert "no Linux kernel found" in one_line_error(tmp_path, capsys, bytes(range(256)) * 64)
    # A dump is refused by the commands that need a live VM, in one line.
    path = write(tmp_path, _core(tmp_path))
    assert main(["--vm", path, "regs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a running VM" in err[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x300), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_headers_only_raise_dump_error(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    """Any byte of the headers and notes changed: parsing either succeeds or raises DumpError (never
    struct.error, IndexError, OverflowError or a read outside the file)."""
    core = build_core([(0, bytes(2 * PAGE)), (0x100000, bytes(PAGE))])
    for pos, val in edits:
        if pos < len(core):
            core[pos] = val
    try:
        c = parse_elf_core(bytes(core), "fuzz")
    except DumpError as e:
        assert "\n" not in str(e)
        return
    for r in c.ranges:
        assert r.offset + r.size <= len(core)


def test_both_targets_have_the_machine_members() -> None:
    """mypy checks the signatures (vm.py, linux/ take a Machine); this catches a member dropped at runtime."""
    from vmsight.vm import VM

    members = ("phys", "la57", "address_space", "vcpus", "control_registers", "paused")
    for cls in (VM, DumpMachine):
        missing = [m for m in members if m != "phys" and not hasattr(cls, m)]
        assert not missing, (cls, missing)
