"""Where a Linux guest writes CR0/CR3/CR4 and MSRs: every ``mov %reg,%crN`` and ``wrmsr`` in kernel text.

KVM traps these writes in hardware; on a stock QEMU the KVMi bridge puts a breakpoint on each write site
instead. Sites are found in two steps: a byte search for the opcodes (``0f 22`` = mov to CR, ``0f 30`` =
wrmsr), then validation with capstone: the enclosing function (the kallsyms symbol at or below the
candidate) is decoded from its start, and only a candidate that is an instruction boundary and decodes as
that instruction is kept (the opcode bytes also occur inside other instructions and data)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_FUNCTION = 64 << 10   # decode at most this far from a symbol: a longer gap means no function start is known
_CANDIDATE = re.compile(rb"\x0f[\x22\x30]")


@dataclass(frozen=True)
class WriteSite:
    """One write instruction at ``gva`` (``length`` bytes). ``cr``: 0/3/4 for ``mov %reg,%crN`` (``reg``
    is the source, a gdbstub register name), None for wrmsr; ``msr``: the MSR when an immediately
    preceding ``mov $imm,%ecx`` fixes it, else None (ecx is only known at the hit)."""

    gva: int
    length: int
    cr: int | None = None
    reg: str | None = None
    msr: int | None = None


def _capstone() -> object:
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = False
    return md


def decode_site(code: bytes, gva: int) -> WriteSite | None:
    """The write site the instruction at the start of ``code`` is, or None."""
    md = _capstone()
    for insn in md.disasm(code[:16], gva, 1):  # type: ignore[attr-defined]
        return _site_of(insn.mnemonic, insn.op_str, gva, insn.size, None)
    return None


def _site_of(mnemonic: str, op_str: str, gva: int, size: int, prev: tuple[str, str] | None) -> WriteSite | None:
    if mnemonic == "wrmsr":
        msr = None
        if prev is not None and prev[0] == "mov" and prev[1].startswith("ecx, "):
            try:
                msr = int(prev[1][5:], 0)
            except ValueError:
                msr = None
        return WriteSite(gva, size, msr=msr)
    if mnemonic == "mov" and op_str.startswith("cr"):
        dst, _, src = op_str.partition(", ")
        if dst in ("cr0", "cr3", "cr4") and re.fullmatch(r"r(?:[a-ds]x|[sd]i|[sb]p|\d+)", src):
            return WriteSite(gva, size, cr=int(dst[2:]), reg=src)
    return None


def find_write_sites(text: bytes, text_gva: int, symbol_start: Callable[[int], int | None]) -> list[WriteSite]:
    """Every validated CR0/3/4 and wrmsr write site in ``text`` (kernel text mapped at ``text_gva``).
    ``symbol_start(gva)`` gives the start gva of the function containing gva (kallsyms), or None."""
    md = _capstone()
    found: dict[int, WriteSite] = {}
    # function start -> (decoded up to, {gva: (mnemonic, operands, size)})
    decoded: dict[int, tuple[int, dict[int, tuple[str, str, int]]]] = {}
    rejected = 0
    for m in _CANDIDATE.finditer(text):
        for off in (m.start(), m.start() - 1):  # a REX prefix (41 0f 22 ..) starts one byte earlier
            if off < 0:
                continue
            gva = text_gva + off
            start = symbol_start(gva)
            if start is None or not 0 <= gva - start <= MAX_FUNCTION or start < text_gva:
                continue
            cached = decoded.get(start)
            if cached is None or cached[0] < gva + 16:
                insns = {}
                lo = start - text_gva
                end = min(len(text), gva - text_gva + 32)
                for i in md.disasm_lite(text[lo:end], start):  # type: ignore[attr-defined]
                    insns[i[0]] = (i[2], i[3], i[1])
                cached = (text_gva + end, insns)
                decoded[start] = cached
            insns = cached[1]
            hit = insns.get(gva)
            if hit is None:
                continue
            prev_gva = max((g for g in insns if g < gva), default=None)
            prev = insns[prev_gva][:2] if prev_gva is not None and prev_gva + insns[prev_gva][2] == gva else None
            site = _site_of(hit[0], hit[1], gva, hit[2], prev)
            if site is not None:
                found[gva] = site
                break
        else:
            rejected += 1
    log.debug("write sites: %d found, %d opcode matches rejected", len(found), rejected)
    return sorted(found.values(), key=lambda s: s.gva)


__all__ = ["WriteSite", "decode_site", "find_write_sites"]
