"""Memory dumps as targets: :class:`DumpMachine` implements :class:`vmsight.target.Machine` over a file.

Two formats:

* an ELF core from QEMU's ``dump-guest-memory`` (QMP, ``paging=false``): each ``PT_LOAD`` is a
  guest-physical range (``p_paddr``, ``p_filesz`` bytes at ``p_offset``); the ``PT_NOTE`` segment holds,
  per vCPU, a ``CORE``/``NT_PRSTATUS`` note (general registers) and a ``QEMU`` note (``QEMUCPUState``,
  target/i386/arch_dump.c: GPRs, rip, rflags, segments with their bases, cr0-cr4 and, in newer QEMUs,
  kernel_gs_base; its ``size`` field says how much there is).
* a raw ``pmemsave 0 SIZE`` image: guest-physical memory from address 0, no registers. The kernel's page
  table is ``--cr3`` or found by scanning (``vmsight.linux.kernel``). Fine for guests below the PC's
  3.5 GiB hole; a bigger guest's image would hold MMIO reads there and the RAM above 4 GiB is not in it.

The file is untrusted input: it is mapped read-only, every header field is checked against the file's size
before use, and a file that is neither gives one line naming what is wrong."""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vmsight.errors import PermissionDenied, TargetError
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.paging import la57_from_cr4
from vmsight.memory.physical import BufferRam
from vmsight.memory.virtual import AddressSpace, AddressSpaces, cstr
from vmsight.target import CONTROL_REGISTERS

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB, _ET_CORE, _EM_386, _EM_X86_64 = 2, 1, 4, 3, 62
_PT_LOAD, _PT_NOTE = 1, 4
_PN_XNUM = 0xFFFF
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")           # Elf64_Phdr
_SHDR = struct.Struct("<IIQQQQIIQQ")         # Elf64_Shdr (only section 0, for PN_XNUM)
_NHDR = struct.Struct("<III")                # Elf64_Nhdr: namesz, descsz, type (32-bit words)
_NT_PRSTATUS = 1
MAX_SEGMENTS = 1 << 16    # QEMU writes one PT_LOAD per guest RAM block piece: a few dozen
MAX_NOTES = 4 * 4096      # two notes per vCPU (QEMU's limit is 4096 vCPUs), VMCOREINFO
MAX_NOTE_BYTES = 64 << 20

# x86_64_elf_prstatus (arch_dump.c): pr_pid at 32, user_regs_struct at 112 (27 u64), 8 bytes of padding.
_PRSTATUS_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                  "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es",
                  "fs", "gs")
_PRSTATUS_SIZE = 112 + 8 * len(_PRSTATUS_REGS) + 8
# QEMUCPUState version 1: version, size (u32); 16 GPRs, rip, rflags (u64); 10 segments of
# {u32 selector, limit, flags, pad; u64 base}; cr[5]; then (size permitting) kernel_gs_base.
_QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15", "rip", "eflags")
_QEMU_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdtr", "idtr")
_SEG = struct.Struct("<IIIIQ")
_QEMU_SEGS_AT = 8 + 8 * len(_QEMU_GPRS)
_QEMU_CR_AT = _QEMU_SEGS_AT + _SEG.size * len(_QEMU_SEGS)
_QEMU_MIN = _QEMU_CR_AT + 5 * 8
_QEMU_KGS_AT = _QEMU_MIN
_EFER_LME_LMA = 0x500


class DumpError(TargetError):
    """A file that is not a usable memory dump (one line: what is wrong with it)."""


@dataclass(frozen=True)
class DumpVcpu:
    index: int


@dataclass
class ElfCore:
    """What an ELF core says: its RAM ranges (file offsets) and each vCPU's registers, in note order."""

    ranges: list[RamRange]
    cpus: list[dict[str, int]]
    vmcoreinfo: bytes | None = None


def parse_elf_core(buf: bytes | mmap.mmap | memoryview, name: str = "dump") -> ElfCore:
    """Parse a QEMU ``dump-guest-memory`` ELF core held in ``buf`` (the whole file). Raises DumpError."""
    size = len(buf)
    if bytes(buf[:4]) != ELF_MAGIC:
        raise DumpError(f"{name} is not an ELF file")
    if size < _EHDR.size:
        raise DumpError(f"{name} is truncated: {size} bytes, shorter than an ELF header")
    (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, _shstrndx) = _EHDR.unpack_from(buf, 0)
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
        raise DumpError(f"{name} is not a little-endian 64-bit ELF file: only x86-64 dumps are read")
    if e_type != _ET_CORE:
        raise DumpError(f"{name} is an ELF file but not a core dump (e_type {e_type}): take one with QMP "
                        "dump-guest-memory")
    if e_machine == _EM_386:
        raise DumpError(f"{name} is a dump of a guest outside long mode (EM_386): only 64-bit guests are read")
    if e_machine != _EM_X86_64:
        raise DumpError(f"{name} is a core dump for ELF machine {e_machine}, not x86-64")
    if e_phentsize != _PHDR.size:
        raise DumpError(f"{name}: program header entries are {e_phentsize} bytes, not {_PHDR.size}")
    if e_phnum == _PN_XNUM:  # the real count is in section 0's sh_info (QEMU does this past 65535)
        if e_shnum < 1 or e_shentsize != _SHDR.size or e_shoff + _SHDR.size > size:
            raise DumpError(f"{name}: e_phnum is PN_XNUM but section header 0 is missing: truncated or damaged")
        e_phnum = _SHDR.unpack_from(buf, e_shoff)[7]
    if not 0 < e_phnum <= MAX_SEGMENTS:
        raise DumpError(f"{name}: {e_phnum} program headers (expected 1-{MAX_SEGMENTS}): damaged")
    if e_phoff + e_phnum * _PHDR.size > size:
        raise DumpError(f"{name} is truncated: its program headers end at {e_phoff + e_phnum * _PHDR.size:#x}, "
                        f"the file at {size:#x}")
    ranges: list[RamRange] = []
    notes: list[tuple[int, int]] = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(
            buf, e_phoff + i * _PHDR.size)
        if p_type not in (_PT_LOAD, _PT_NOTE) or p_filesz == 0:
            continue
        if p_offset + p_filesz > size:
            raise DumpError(f"{name} is truncated: segment {i} ({p_filesz:#x} bytes at file offset "
                            f"{p_offset:#x}) ends past the file's {size:#x} bytes")
        if p_type == _PT_NOTE:
            notes.append((p_offset, p_filesz))
            continue
        if p_filesz < p_memsz:  # not written by QEMU's paging=false; the rest would read as zeros
            log.info("%s: PT_LOAD %d holds %#x of %#x bytes: only those are RAM", name, i, p_filesz, p_memsz)
        if p_paddr + p_filesz > 1 << 52:
            raise DumpError(f"{name}: segment {i} at guest-physical {p_paddr:#x} lies beyond 2^52: damaged")
        ranges.append(RamRange(p_paddr, p_filesz, p_offset, "dump"))
    ranges.sort(key=lambda r: r.gpa)
    for a, b in zip(ranges, ranges[1:], strict=False):
        if b.gpa < a.end:
            raise DumpError(f"{name}: segments at guest-physical {a.gpa:#x} and {b.gpa:#x} overlap: damaged")
    if not ranges:
        raise DumpError(f"{name} is a core dump without memory (no PT_LOAD segment)")
    core = ElfCore(ranges, [])
    _parse_notes(buf, notes, core, name)
    return core


def _notes(buf: bytes | mmap.mmap | memoryview, off: int, length: int, name: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in [off, off+length) (bounds already checked against the file)."""
    if length > MAX_NOTE_BYTES:
        raise DumpError(f"{name}: a {length:#x}-byte note segment: damaged")
    pos, end, count = off, off + length, 0
    while pos + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(buf, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + (namesz + 3) // 4 * 4
        nxt = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > end:
            raise DumpError(f"{name}: a note at file offset {pos:#x} runs past its segment: truncated or damaged")
        count += 1
        if count > MAX_NOTES:
            raise DumpError(f"{name}: more than {MAX_NOTES} notes: damaged")
        yield cstr(bytes(buf[name_at:name_at + namesz])), ntype, bytes(buf[desc_at:desc_at + descsz])
        pos = nxt


def _parse_notes(buf: bytes | mmap.mmap | memoryview, segments: list[tuple[int, int]], core: ElfCore,
                 name: str) -> None:
    prstatus: list[dict[str, int]] = []
    qemu: list[dict[str, int]] = []
    for off, length in segments:
        for nname, ntype, desc in _notes(buf, off, length, name):
            if nname == b"CORE" and ntype == _NT_PRSTATUS:
                if len(desc) < _PRSTATUS_SIZE - 8:
                    raise DumpError(f"{name}: a {len(desc)}-byte NT_PRSTATUS note (x86-64 has {_PRSTATUS_SIZE})")
                vals = struct.unpack_from(f"<{len(_PRSTATUS_REGS)}Q", desc, 112)
                regs = dict(zip(_PRSTATUS_REGS, vals, strict=True))
                regs["pr_pid"] = struct.unpack_from("<I", desc, 32)[0]
                del regs["orig_rax"]
                prstatus.append(regs)
            elif nname == b"QEMU" and ntype == 0:
                qemu.append(_qemu_cpu_state(desc, name))
            elif nname == b"VMCOREINFO":
                core.vmcoreinfo = desc
    # QEMU writes every vCPU's NT_PRSTATUS, then every vCPU's QEMU note, both in cpu-index order
    # (dump/dump.c write_elf64_notes). The QEMU note has the control registers; PRSTATUS alone (another
    # dumper) gives general registers only, and discovery then scans memory.
    if qemu and prstatus and len(qemu) != len(prstatus):
        raise DumpError(f"{name}: {len(prstatus)} NT_PRSTATUS notes but {len(qemu)} QEMU notes: damaged")
    core.cpus = qemu or prstatus
    for regs in core.cpus:
        regs.pop("pr_pid", None)


def _qemu_cpu_state(desc: bytes, name: str) -> dict[str, int]:
    if len(desc) < 8:
        raise DumpError(f"{name}: a {len(desc)}-byte QEMU CPU note: damaged")
    version, size = struct.unpack_from("<II", desc, 0)
    if version != 1:
        raise DumpError(f"{name}: QEMU CPU state version {version} (vmsight reads version 1)")
    if size > len(desc) or size < _QEMU_MIN:
        raise DumpError(f"{name}: QEMU CPU note says {size} bytes, holds {len(desc)} (needs {_QEMU_MIN}): damaged")
    regs = dict(zip(_QEMU_GPRS, struct.unpack_from(f"<{len(_QEMU_GPRS)}Q", desc, 8), strict=True))
    for i, seg in enumerate(_QEMU_SEGS):
        selector, limit, _flags, _pad, base = _SEG.unpack_from(desc, _QEMU_SEGS_AT + i * _SEG.size)
        if seg in ("gdtr", "idtr"):
            regs[f"{seg}_base"], regs[f"{seg}_limit"] = base, limit
        else:
            regs[seg] = selector
            regs[f"{seg}_base"] = base
    for i, cr in enumerate(struct.unpack_from("<5Q", desc, _QEMU_CR_AT)):
        if i != 1:  # CR1 is reserved
            regs[f"cr{i}"] = cr
    if size >= _QEMU_KGS_AT + 8:  # QEMU 5.2+ (commit "dump: add kernel_gs_base to QEMU CPU state")
        regs["k_gs_base"] = struct.unpack_from("<Q", desc, _QEMU_KGS_AT)[0]
    # EFER is not in the note. QEMU writes EM_X86_64 only for a guest in long mode, where paging is on:
    # a vCPU with CR0.PG and CR4.PAE is taken to be in long mode (64-bit Linux runs no other mode).
    if regs["cr0"] >> 31 & 1 and regs["cr4"] >> 5 & 1:
        regs["efer"] = _EFER_LME_LMA
    return regs


class DumpRam(BufferRam):
    """A dump file mapped read-only; RAM-block offsets are file offsets."""

    def __init__(self, mm: mmap.mmap, layout: RamLayout, name: str) -> None:
        super().__init__(mm, layout)
        self.name = name
        self._mmap = mm

    def write_gpa(self, gpa: int, data: bytes) -> None:
        raise TargetError("a memory dump is read-only: write to a live VM instead")

    def close(self) -> None:
        self._buf.release()
        self._mmap.close()


class DumpMachine:
    """A memory dump as a target (:class:`vmsight.target.Machine`). Create with :func:`open_dump`."""

    def __init__(self, path: str, phys: DumpRam, cpus: list[dict[str, int]], *, kind: str,
                 cr3: int | None = None) -> None:
        self.path = path
        self.kind = kind              # "elf-core" or "raw"
        self.phys = phys
        self.layout = phys.layout
        self.backend = phys.name
        self._cpus = cpus
        self._cr3 = cr3
        self._spaces = AddressSpaces()

    def __repr__(self) -> str:
        return f"<DumpMachine {self.kind} {self.path} {self.layout.total_bytes >> 20} MiB {len(self._cpus)} vCPUs>"

    def status(self) -> str:
        return "dump"

    @contextmanager
    def paused(self) -> Iterator[DumpMachine]:
        yield self  # a dump never runs

    def vcpus(self) -> list[DumpVcpu]:
        n = len(self._cpus) or (1 if self._cr3 is not None else 0)
        return [DumpVcpu(i) for i in range(n)]

    def registers(self, vcpu: int = 0) -> dict[str, int]:
        """All registers the dump holds for ``vcpu`` (QEMU note names; efer inferred, see the module)."""
        if not 0 <= vcpu < len(self._cpus):
            raise TargetError(f"{self.path} holds no registers for vCPU {vcpu} "
                              f"({len(self._cpus)} vCPUs in the dump)")
        return dict(self._cpus[vcpu])

    def control_registers(self) -> dict[int, dict[str, int]]:
        out = {i: {k: r[k] for k in CONTROL_REGISTERS if k in r} for i, r in enumerate(self._cpus)}
        if self._cr3 is not None:  # --cr3 wins over what vCPU 0 was doing
            out[0] = {**out.get(0, {}), "cr3": self._cr3}
        return out

    @property
    def la57(self) -> bool:
        return bool(self._cpus) and la57_from_cr4(self._cpus[0].get("cr4", 0))

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.phys.read_gpa(gpa, size)

    def address_space(self, dtb: int, *, la57: bool | None = None) -> AddressSpace:
        return self._spaces.get(self.phys, dtb, self.la57 if la57 is None else la57)

    def invalidate(self) -> None:
        """Nothing to drop: a dump does not change."""

    def close(self) -> None:
        self._spaces.clear()
        self.phys.close()

    def __enter__(self) -> DumpMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_regular_file(path: str) -> bool:
    """``path`` names a regular file (or a symlink to one: the user named it)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_dump(path: str, *, cr3: int | None = None) -> DumpMachine:
    """Open ``path``: an ELF core from ``dump-guest-memory`` (detected by its ELF magic) or else a raw
    ``pmemsave`` image from guest-physical 0. ``cr3`` gives the page table to start from (raw images have
    no registers; without it the kernel is found by scanning). Raises DumpError, PermissionDenied."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: run as its owner or root") from None
    except OSError as e:
        raise DumpError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DumpError(f"{path} is not a regular file: pass a dump-guest-memory ELF core or a pmemsave image")
        if st.st_size == 0:
            raise DumpError(f"{path} is empty: not a memory dump")
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        if mm[:4] == ELF_MAGIC:
            core = parse_elf_core(mm, path)
            if cr3 is None and not core.cpus:
                log.warning("%s has no vCPU notes: the kernel is found by scanning memory", path)
            phys = DumpRam(mm, RamLayout(core.ranges), "elf-core")
            m = DumpMachine(path, phys, core.cpus, kind="elf-core", cr3=cr3)
        else:
            if st.st_size % 4096:
                raise DumpError(f"{path} is neither an ELF core nor a raw memory image (its size {st.st_size} "
                                "is not a whole number of 4 KiB pages): pass dump-guest-memory or pmemsave output")
            phys = DumpRam(mm, RamLayout([RamRange(0, st.st_size, 0, "raw")]), "raw-image")
            m = DumpMachine(path, phys, [], kind="raw", cr3=cr3)
    except BaseException:
        mm.close()
        raise
    log.info("opened %s: %s, %d MiB in %d ranges, %d vCPUs with registers", path, m.kind,
             m.layout.total_bytes >> 20, len(m.layout), len(m._cpus))
    return m


__all__ = ["DumpError", "DumpMachine", "DumpRam", "ElfCore", "is_regular_file", "open_dump", "parse_elf_core"]
