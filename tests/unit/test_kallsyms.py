"""kallsyms scanner: synthetic tables built by a small encoder (the same format scripts/kallsyms.c
writes), in both known table orders and an unknown one; then the real Debian 6.1 and 6.12 images."""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsight.errors import CorruptData, SymbolNotFound, UnsupportedKernel, VmsightError
from vmsight.linux import kallsyms as K
from vmsight.linux.kallsyms import (
    DEFAULT_TEXT_GVA,
    Kallsyms,
    decode_kallsyms,
    detect_layout,
    find_all_kallsyms,
    find_banner,
    find_banners,
    find_kallsyms,
    find_token_tables,
    kallsyms_from_reader,
)

# --- encoder ------------------------------------------------------------------------------------------


@dataclass
class Sym:
    name: str
    type: str
    gva: int
    percpu: bool = False


def _pad8(out: bytearray) -> int:
    out += b"\0" * (-len(out) % 8)
    return len(out)


def build_tokens(strings: list[bytes], fill: bool = True) -> tuple[list[bytes], list[bytes]]:
    """Token table and compressed names: every byte used is its own token; free slots get the most
    frequent pairs (one round, like the first step of scripts/kallsyms.c's optimize_result)."""
    used = {c for s in strings for c in s}
    tokens = [bytes([c]) if c in used else b"" for c in range(256)]
    if fill:
        pairs = Counter(s[i:i + 2] for s in strings for i in range(len(s) - 1))
        free = [c for c in range(256) if c not in used]
        for c, (pair, _n) in zip(free, pairs.most_common(len(free)), strict=False):
            tokens[c] = pair
    code = {t: i for i, t in enumerate(tokens) if len(t) == 2}
    comp = []
    for s in strings:
        out, i = bytearray(), 0
        while i < len(s):
            if s[i:i + 2] in code:
                out.append(code[s[i:i + 2]])
                i += 2
            else:
                out.append(s[i])
                i += 1
        comp.append(bytes(out))
    return tokens, comp


@dataclass
class Encoded:
    blob: bytes
    syms: list[Sym]
    relative_base: int
    token_table: int  # offset in blob


def encode(syms: list[Sym], order: str = "num_syms-first", seqs: int = 3, absolute_percpu: bool = True,
           relative_base: int = DEFAULT_TEXT_GVA, lead: bytes = b"", fill_tokens: bool = True) -> Encoded:
    """Emit the kallsyms tables like scripts/kallsyms.c (every table .balign 8)."""
    syms = sorted(syms, key=lambda s: (not s.percpu, s.gva))
    raw = [(s.type + s.name).encode() for s in syms]
    tokens, comp = build_tokens(raw, fill_tokens)
    n = len(syms)

    def offsets() -> bytes:
        vals = []
        for s in syms:
            if not absolute_percpu:
                vals.append(s.gva - relative_base)
            elif s.percpu:
                vals.append(s.gva)
            else:
                vals.append(relative_base - s.gva - 1)
        return b"".join(struct.pack("<i" if absolute_percpu else "<I", v) for v in vals)

    def names_and_markers() -> tuple[bytes, bytes]:
        out, markers = bytearray(), []
        for i, c in enumerate(comp):
            if i % 256 == 0:
                markers.append(len(out))
            if len(c) <= 0x7F:
                out.append(len(c))
            else:
                out += bytes([(len(c) & 0x7F) | 0x80, len(c) >> 7])
            out += c
        return bytes(out), b"".join(struct.pack("<I", m) for m in markers)

    def seqs_table() -> bytes:
        order_by_name = sorted(range(n), key=lambda i: (syms[i].name, syms[i].gva))
        if seqs == 3:
            return b"".join(bytes([i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF]) for i in order_by_name)
        return b"".join(struct.pack("<I", i) for i in order_by_name)

    names, markers = names_and_markers()
    table = b"".join(t + b"\0" for t in tokens)
    index = bytearray()
    pos = 0
    for t in tokens:
        index += struct.pack("<H", pos)
        pos += len(t) + 1
    out = bytearray(lead)
    _pad8(out)
    parts: list[tuple[str, bytes]]
    if order == "num_syms-first":
        parts = [("num", struct.pack("<I", n)), ("names", names), ("markers", markers), ("tt", table),
                 ("ti", bytes(index)), ("off", offsets()), ("rb", struct.pack("<Q", relative_base))]
        if seqs:
            parts.append(("seqs", seqs_table()))
    elif order == "offsets-first":
        parts = [("off", offsets()), ("rb", struct.pack("<Q", relative_base)), ("num", struct.pack("<I", n)),
                 ("names", names), ("markers", markers)]
        if seqs:
            parts.append(("seqs", seqs_table()))
        parts += [("tt", table), ("ti", bytes(index))]
    elif order == "shuffled":  # a layout no kernel emits: tables out of any known order
        parts = [("names", names), ("num", struct.pack("<I", n)), ("tt", table), ("ti", bytes(index)),
                 ("markers", markers), ("rb", struct.pack("<Q", relative_base)), ("off", offsets())]
    else:
        raise ValueError(order)
    where = {}
    for label, data in parts:
        where[label] = _pad8(out)
        out += data
    _pad8(out)
    out += b"\xa5" * 64
    return Encoded(bytes(out), syms, relative_base, where["tt"])


def make_symbols(count: int = 700, seed: int = 1, base: int = DEFAULT_TEXT_GVA) -> list[Sym]:
    rng = random.Random(seed)
    words = ["do", "sys", "read", "write", "page", "task", "mm", "irq", "init", "lock", "vma", "net",
             "sched", "x86", "cpu", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    syms = [Sym("_text", "T", base), Sym("startup_64", "T", base), Sym("init_task", "D", base + 0x1A1AA40),
            Sym("linux_banner", "D", base + 0x111FFE0), Sym("__per_cpu_start", "A", 0, True),
            Sym("current_task", "A", 0x1FB80, True), Sym("dup_static", "t", base + 0x100),
            Sym("dup_static", "T", base + 0x200), Sym("dup_static", "t", base + 0x50),
            Sym("rust_" + "long_symbol_name_" * 12 + "end", "T", base + 0x300),
            Sym("digits_0123456789", "r", base + 0x400)]  # every kernel uses all ten digits
    seen = {s.name for s in syms}
    gva = base + 0x1000
    while len(syms) < count:
        name = "_".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        if name in seen:
            continue
        seen.add(name)
        gva += rng.randint(0x10, 0x400)
        syms.append(Sym(name, rng.choice("TtDdRrBb"), gva))
    return syms


def expected_map(syms: list[Sym]) -> dict[str, int]:
    """name -> gva as Kallsyms.address resolves duplicates: the first global, else the first."""
    out: dict[str, int] = {}
    for name in {s.name for s in syms}:
        group = [s for s in syms if s.name == name]
        globs = [s for s in group if s.type.isupper()]
        out[name] = (globs or group)[0].gva
    return out


def check_decoded(ks: Kallsyms, enc: Encoded) -> None:
    assert len(ks) == len(enc.syms)
    assert ks.names == [s.name for s in enc.syms]
    assert ks.types == "".join(s.type for s in enc.syms).encode()
    assert [int(a) for a in ks.addresses] == [s.gva for s in enc.syms]
    assert ks.relative_base == enc.relative_base
    for name, gva in expected_map(enc.syms).items():
        assert ks.address(name) == gva, name


# --- synthetic tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("order,seqs", [("num_syms-first", 3), ("offsets-first", 3), ("offsets-first", 4),
                                        ("offsets-first", 0)])
def test_layouts_decode_exactly(order: str, seqs: int) -> None:
    enc = encode(make_symbols(), order=order, seqs=seqs, lead=b"\x11" * 100)
    ks = find_kallsyms(enc.blob)
    check_decoded(ks, enc)
    assert ks.layout is not None and ks.layout.order == order
    assert ks.layout.seqs_entry_size == seqs
    assert (ks.layout.seqs_offset is None) == (seqs == 0)
    assert ks.layout.absolute_percpu
    assert ks.token_table is not None and ks.token_table.offset == enc.token_table


def test_debian_6_1_order_is_detected_not_assumed() -> None:
    # The same symbols in both orders: detection picks the right one each time.
    syms = make_symbols(600, seed=7)
    a = find_kallsyms(encode(syms, order="offsets-first").blob)
    b = find_kallsyms(encode(syms, order="num_syms-first").blob)
    assert a.layout and a.layout.order == "offsets-first"
    assert b.layout and b.layout.order == "num_syms-first"
    assert a.names == b.names and list(a.addresses) == list(b.addresses)


def test_unknown_layout_raises_unsupported_kernel() -> None:
    enc = encode(make_symbols(), order="shuffled")
    with pytest.raises(UnsupportedKernel) as ei:
        find_kallsyms(enc.blob)
    assert ei.value.feature == "kallsyms layout"


def test_no_token_table_is_corrupt_data() -> None:
    with pytest.raises(CorruptData):
        find_kallsyms(b"\0" * 4096 + b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00" + b"\0" * 100)


def test_two_byte_name_length() -> None:
    syms = make_symbols(300)
    long = [s for s in syms if s.name.startswith("rust_")][0]
    enc = encode(syms)
    ks = find_kallsyms(enc.blob)
    assert len(long.name) > 127
    assert ks.address(long.name) == long.gva


def test_empty_tokens_in_small_kernel() -> None:
    # Few symbols leave token slots unused: scripts/kallsyms.c emits them as "".
    enc = encode(make_symbols(40), fill_tokens=False)
    assert enc.blob.count(b"\0\0") > 0
    check_decoded(find_kallsyms(enc.blob), enc)


def test_relative_mode_without_absolute_percpu() -> None:
    # No CONFIG_KALLSYMS_ABSOLUTE_PERCPU (v6.15+ x86): every offset is unsigned from relative_base.
    syms = [s for s in make_symbols() if not s.percpu]
    enc = encode(syms, absolute_percpu=False)
    ks = find_kallsyms(enc.blob)
    assert ks.layout is not None and not ks.layout.absolute_percpu
    check_decoded(ks, enc)


def test_kaslr_relative_base_and_slide() -> None:
    slide = 0x2A00000
    syms = make_symbols(base=DEFAULT_TEXT_GVA + slide)
    enc = encode(syms, relative_base=DEFAULT_TEXT_GVA + slide)
    ks = find_kallsyms(enc.blob)
    assert ks.text_gva == DEFAULT_TEXT_GVA + slide
    assert ks.kaslr_slide == slide
    assert ks.address("current_task") == 0x1FB80  # per-cpu offsets stay absolute


def test_lookup_and_types() -> None:
    enc = encode(make_symbols())
    ks = find_kallsyms(enc.blob)
    init_task = ks.address("init_task")
    assert ks.lookup(init_task) == ("init_task", 0)
    assert ks.lookup(init_task + 0x10) == ("init_task", 0x10)
    assert ks.lookup(0x10)[0] in ("__per_cpu_start",)
    assert ks.symbol_type("init_task") == "D"
    assert ks.symbol_type("current_task") == "A"
    assert ks.address("dup_static") == DEFAULT_TEXT_GVA + 0x200  # the global one
    assert sorted(ks.all_addresses("dup_static")) == [DEFAULT_TEXT_GVA + 0x50, DEFAULT_TEXT_GVA + 0x100,
                                                      DEFAULT_TEXT_GVA + 0x200]
    assert "init_task" in ks and "nope" not in ks
    assert ks.get("nope") is None
    with pytest.raises(SymbolNotFound) as ei:
        ks.address("nope")
    assert ei.value.name == "nope"
    assert ks.as_dict()["linux_banner"] == DEFAULT_TEXT_GVA + 0x111FFE0


def test_stale_copies_are_all_reported() -> None:
    a = encode(make_symbols(seed=1))
    b = encode(make_symbols(seed=2), order="offsets-first")
    blob = a.blob + b"\0" * 4096 + b.blob
    found = find_all_kallsyms(blob)
    assert len(found) == 2
    assert found[0].token_table is not None and found[0].token_table.offset == a.token_table
    assert found[1].token_table is not None and found[1].token_table.offset == len(a.blob) + 4096 + b.token_table


def test_digits_that_are_not_a_token_table_are_ignored() -> None:
    decoy = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00" * 3
    enc = encode(make_symbols(), lead=decoy + b"\x01" * 300)
    assert [t.offset for t in find_token_tables(enc.blob)] == [enc.token_table]


def test_from_reader_over_sparse_memory() -> None:
    # Mapped pages only around the tables: the reader must stop at unmapped pages on both sides.
    enc = encode(make_symbols(), lead=b"\x00" * 5000)
    mem = enc.blob + b"\0" * (-len(enc.blob) % 4096)
    base = 0xFFFFFFFF82000000
    reads = []

    def read(gva: int, size: int) -> bytes:
        reads.append((gva, size))
        off = gva - base
        if off < 0 or off + size > len(mem):
            raise CorruptData("unmapped", gva)
        return mem[off:off + size]

    ks = kallsyms_from_reader(read, base + enc.token_table, chunk=3 * 4096)
    check_decoded(ks, enc)
    assert all(g % 4096 == 0 for g, _ in reads)
    with pytest.raises(CorruptData):
        kallsyms_from_reader(read, base + enc.token_table + 8, chunk=4096)
    with pytest.raises(CorruptData):
        kallsyms_from_reader(read, base - 0x10000)


def test_decode_cache_reuses_names() -> None:
    enc = encode(make_symbols())
    K._DECODE_CACHE.clear()
    a = find_kallsyms(enc.blob)
    b = find_kallsyms(enc.blob)
    assert a.names is b.names  # same build: decoded once


def test_banner() -> None:
    banner = b"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc 12) #1 SMP Debian\n\0"
    data = b"xx Linux version fake\0" + b"\0" * 30 + banner + b"\0" * 10
    found = find_banners(data)
    assert [b.release for b in found] == ["6.1.0-56-cloud-amd64"]
    assert find_banner(data).offset == data.index(banner)
    with pytest.raises(CorruptData):
        find_banner(b"no banner here")


def test_non_buffer_input_rejected_cleanly() -> None:
    with pytest.raises(VmsightError):
        find_kallsyms(b"")


# --- real kernels -------------------------------------------------------------------------------------

BOOT = Path(os.environ.get("VMSIGHT_DEBS", Path.home() / ".cache/vmsight/debs/x/boot"))
KERNELS = {"6.1": "vmlinuz-6.1.0-*-cloud-amd64", "6.12": "vmlinuz-6.12.*+deb12-amd64"}
# Where scripts/setup.sh (vmsight.qemu.kernels fetch) puts them.
FETCHED = {"6.1": "linux-image-6.1.*-cloud-amd64/vmlinuz", "6.12": "linux-image-6.12.*+deb12-amd64/vmlinuz"}


def kernel_image(version: str) -> Path | None:
    """The cached Debian bzImage of `version`, or None."""
    from vmsight.qemu.kernels import CACHE

    for root, pattern in ((CACHE / "kernels", FETCHED[version]), (BOOT, KERNELS[version])):
        matches = sorted(root.glob(pattern)) if root.is_dir() else []
        if matches:
            return matches[-1]
    return None


def real_vmlinux(version: str) -> bytes:
    """The decompressed vmlinux of the cached Debian kernel, or skip."""
    image = kernel_image(version)
    if image is None:
        pytest.skip(f"no Debian {version} kernel cached (scripts/setup.sh fetches them)")
    try:
        from vmsight.linux.vmlinux import vmlinux_from_bzimage
        return vmlinux_from_bzimage(image).read_bytes()
    except ImportError as e:  # zstandard / lz4 missing
        pytest.skip(f"decompressor missing: {e}")


def rodata(elf: bytes) -> tuple[memoryview, int]:
    from vmsight.linux.vmlinux import elf_sections
    s = elf_sections(elf)[".rodata"]
    return memoryview(elf)[s.offset:s.offset + s.size], s.addr


@pytest.mark.parametrize("version,order,lo,hi", [("6.1", "offsets-first", 80_000, 95_000),
                                                 ("6.12", "num_syms-first", 150_000, 175_000)])
def test_real_kernel_kallsyms(version: str, order: str, lo: int, hi: int) -> None:
    elf = real_vmlinux(version)
    ro, ro_gva = rodata(elf)
    K._DECODE_CACHE.clear()
    t0 = time.perf_counter()
    ks = find_kallsyms(ro)
    elapsed = time.perf_counter() - t0
    assert lo < len(ks) < hi
    assert ks.layout is not None and ks.layout.order == order
    assert ks.layout.seqs_entry_size == 3  # Debian 6.1 carries the backport
    assert ks.address("_text") == DEFAULT_TEXT_GVA == ks.relative_base
    assert ks.kaslr_slide == 0
    for name in ("init_task", "linux_banner", "init_top_pgt", "__start_BTF", "__stop_BTF", "page_offset_base"):
        assert ks.address(name) > DEFAULT_TEXT_GVA, name
    assert ks.symbol_type("init_task") == "D"
    assert ks.lookup(ks.address("init_task") + 8) == ("init_task", 8)
    percpu = "current_task" if version == "6.1" else "pcpu_hot"
    assert ks.symbol_type(percpu) == "A" and ks.address(percpu) < 0x100000
    assert elapsed < 3.0  # ~0.2-0.3 s on an idle machine; generous under shared CI load
    buffer_gva = ks.buffer_delta() if version == "6.12" else ro_gva
    assert buffer_gva == ro_gva
    banner = find_banner(ro, ks, buffer_gva=ro_gva)
    assert banner.offset == ks.address("linux_banner") - ro_gva
    assert banner.release.startswith(version + ".")


def test_real_kernel_decode_cached_is_fast() -> None:
    elf = real_vmlinux("6.12")
    ro, _ = rodata(elf)
    tt = next(find_token_tables(ro))
    layout = detect_layout(ro, tt)
    decode_kallsyms(ro, tt, layout)
    t0 = time.perf_counter()
    decode_kallsyms(ro, tt, layout)
    assert time.perf_counter() - t0 < 1.0


# --- a booted guest's RAM (KASLR applied, stale copies present) ---------------------------------------

def boot_to_panic_ram(version: str, tmp_path: Path) -> bytes:
    """Boot the Debian kernel with no root fs under TCG until it panics, then return a copy of its
    256 MiB RAM (shared file backend). QEMU is always killed."""
    import shutil
    import subprocess

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    image = kernel_image(version)
    if image is None:
        pytest.skip(f"no Debian {version} kernel cached (scripts/setup.sh fetches them)")
    shm = Path(f"/dev/shm/vmsight-test-kallsyms-{os.getpid()}-{version}")
    log = tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-m", "256M", "-nographic", "-no-reboot", "-kernel", str(image),
           "-append", "console=ttyS0", "-object",
           f"memory-backend-file,id=mem,size=256M,mem-path={shm},share=on", "-machine", "memory-backend=mem"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while b"Kernel panic" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"guest did not reach its panic: {log.read_bytes()[-500:]!r}")
            time.sleep(0.5)
        time.sleep(0.5)
        return shm.read_bytes()
    finally:
        proc.kill()
        proc.wait()
        shm.unlink(missing_ok=True)


@pytest.mark.guest
@pytest.mark.parametrize("version,pgd", [("6.1", 0x48), ("6.12", 0x78)])
def test_booted_guest_ram(version: str, pgd: int, tmp_path: Path) -> None:
    from vmsight.linux.btf import Btf
    from vmsight.linux.types import Program

    ram = boot_to_panic_ram(version, tmp_path)
    found = find_all_kallsyms(ram)
    assert found, "no kallsyms in guest RAM"
    ks = found[0]
    assert ks.relative_base == ks.address("_text")
    assert ks.kaslr_slide % K.IMAGE_ALIGN == 0
    banner = find_banner(ram, ks)  # the live copy among the stale ones
    assert banner.release.startswith(version + ".")
    # Place the image: gva - gpa for the kernel image (2 MiB aligned on both sides).
    image_delta = ks.address("linux_banner") - banner.offset
    assert image_delta % K.IMAGE_ALIGN == 0
    if version == "6.12":
        assert ks.buffer_delta() == image_delta
    btf = Btf(ram[ks.address("__start_BTF") - image_delta:ks.address("__stop_BTF") - image_delta])
    assert btf.member_offset("mm_struct", "pgd") == pgd
    page_offset_base = int.from_bytes(ram[ks.address("page_offset_base") - image_delta:][:8], "little")
    assert page_offset_base % (1 << 30) == 0 and page_offset_base >> 47 == 0x1FFFF

    def read(gva: int, size: int) -> bytes:
        for base in (image_delta, page_offset_base):  # kernel image, then the direct map
            off = gva - base
            if 0 <= off and off + size <= len(ram):
                return ram[off:off + size]
        raise CorruptData("gva outside the image and the direct map", gva)

    prog = Program(read, btf, ks)
    init = prog.variable("init_task")
    assert init.comm.string_() == "swapper/0"
    tasks = {t.pid.value_(): t.comm.string_() for t in prog.list_for_each_entry(init.tasks, "task_struct", "tasks")}
    assert tasks[1] in ("swapper/0", "init", "swapper")  # pid 1 panicked before exec
    assert tasks[2] == "kthreadd"
    assert len(tasks) > 10


@pytest.mark.parametrize("version", ["6.1", "6.12"])
def test_real_kernel_from_reader_reads_a_small_window(version: str) -> None:
    from vmsight.linux.vmlinux import ElfReader

    elf = real_vmlinux(version)
    ro, ro_gva = rodata(elf)
    tt = next(find_token_tables(ro))
    reader = ElfReader(elf)
    moved = []

    def read(gva: int, size: int) -> bytes:
        moved.append(size)
        return reader.read(gva, size)

    ks = kallsyms_from_reader(read, ro_gva + tt.offset)
    assert ks.address("_text") == DEFAULT_TEXT_GVA
    assert ks.names == find_kallsyms(ro).names
    assert sum(moved) <= 6 << 20  # the small first window was enough
