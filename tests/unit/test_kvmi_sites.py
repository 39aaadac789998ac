"""kvmi.sites on synthetic code: real write sites are found and validated, opcode bytes elsewhere are not."""

from __future__ import annotations

from vmsight.kvmi.sites import WriteSite, decode_site, find_write_sites

BASE = 0xFFFF_FFFF_8100_0000


def _text() -> tuple[bytes, dict[int, int]]:
    f1 = (b"\x55"                                  # push rbp
          b"\x0f\x22\xdf"                          # mov cr3, rdi
          b"\x48\xb8\x0f\x22\xd8\x00\x00\x00\x00\x00"  # movabs rax, 0xd8220f: the opcode inside an immediate
          b"\x41\x0f\x22\xe0"                      # mov cr4, r8 (REX prefix)
          b"\xc3")
    f2 = (b"\xb9\x81\x00\x00\xc0"                  # mov ecx, 0xc0000081
          b"\x0f\x30"                              # wrmsr
          b"\x89\xf9"                              # mov ecx, edi
          b"\x0f\x30"                              # wrmsr (MSR only known at the hit)
          b"\x0f\x22\xc0"                          # mov cr0, rax
          b"\x0f\x20\xd8"                          # mov rax, cr3 (a read: not a site)
          b"\xc3")
    data = b"\x0f\x30\x0f\x22\xd8"                 # bytes before any function: no symbol, no site
    text = data + f1 + f2
    return text, {BASE + len(data): 0, BASE + len(data) + len(f1): 1}


def _symbol_start(starts: dict[int, int]):  # type: ignore[no-untyped-def]
    def find(gva: int) -> int | None:
        below = [s for s in starts if s <= gva]
        return max(below) if below else None
    return find


def test_sites_found_and_validated() -> None:
    text, starts = _text()
    f1, f2 = sorted(starts)
    sites = find_write_sites(text, BASE, _symbol_start(starts))
    assert sites == [
        WriteSite(f1 + 1, 3, cr=3, reg="rdi"),
        WriteSite(f1 + 14, 4, cr=4, reg="r8"),
        WriteSite(f2 + 5, 2, msr=0xC000_0081),
        WriteSite(f2 + 9, 2),
        WriteSite(f2 + 11, 3, cr=0, reg="rax"),
    ]


def test_decode_site() -> None:
    assert decode_site(b"\x0f\x22\xd8\x90", BASE) == WriteSite(BASE, 3, cr=3, reg="rax")
    assert decode_site(b"\x0f\x30", BASE) == WriteSite(BASE, 2)
    assert decode_site(b"\x0f\x20\xd8", BASE) is None       # read of cr3
    assert decode_site(b"\x0f\x22\xd0", BASE) is None       # mov cr2: not a KVMi CR
    assert decode_site(b"\x90", BASE) is None
