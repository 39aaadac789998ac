"""Decompress a bzImage into the raw ``vmlinux`` ELF (test data helper).

A bzImage carries the kernel ELF compressed at ``payload_offset`` (boot protocol >= 2.08). The
compression is found by its magic: gzip, xz, zstd, lz4 (legacy frame), bzip2, lzma. In a vmlinux the
kallsyms tables and the ``.BTF`` section sit exactly as they do in guest memory (before relocation), so
the kernel-discovery parsers can be tested on real kernels without booting them.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmsight.errors import CorruptData, UnsupportedKernel

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("VMSIGHT_CACHE", Path.home() / ".cache" / "vmsight"))

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20


def _decompress_lz4_legacy(data: bytes) -> bytes:
    import lz4.block  # optional dependency ([dev] extra)

    out = []
    pos = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == _LZ4_LEGACY_MAGIC:  # concatenated legacy streams restart with the magic
            pos += 4
            continue
        if pos + 4 + size > len(data):  # the trailing u32 is the total decompressed size
            break
        out.append(lz4.block.decompress(data[pos + 4:pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK))
        pos += 4 + size
    return b"".join(out)


def _decompress_zstd(data: bytes) -> bytes:
    import zstandard  # optional dependency ([dev] extra)

    # One frame followed by the kernel's appended u32 size: a decompressobj stops at the frame's end.
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def compression_of(payload: bytes) -> str:
    """Name of the compression of a bzImage payload, from its magic."""
    if payload[:2] == b"\x1f\x8b":
        return "gzip"
    if payload[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if payload[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        return "lz4"
    if payload[:3] == b"BZh":
        return "bzip2"
    if payload[:3] == b"\x5d\x00\x00":
        return "lzma"
    raise UnsupportedKernel(f"bzImage payload compression with magic {payload[:6].hex()}")


def _decompress(kind: str, payload: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload)
    if kind == "zstd":
        return _decompress_zstd(payload)
    if kind == "lz4":
        return _decompress_lz4_legacy(payload[4:])
    raise UnsupportedKernel(f"bzImage payload compression {kind}")


@dataclass(frozen=True)
class BzImageInfo:
    protocol: int          # boot protocol version, e.g. 0x20f
    payload_offset: int    # file offset of the compressed payload
    payload_length: int
    compression: str


def bzimage_info(image: bytes) -> BzImageInfo:
    """Parse the x86 boot header of a bzImage. Raises CorruptData if it is not one."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise CorruptData("not a bzImage (no HdrS boot header)")
    (protocol,) = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        raise UnsupportedKernel(f"boot protocol {protocol:#x} (< 2.08 has no payload_offset)")
    setup_sects = image[0x1F1] or 4
    po, pl = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + po
    if start + pl > len(image) or pl < 8:
        raise CorruptData(f"bzImage payload {start:#x}+{pl:#x} beyond file size {len(image):#x}")
    return BzImageInfo(protocol, start, pl, compression_of(image[start:start + 8]))


def decompress_bzimage(image: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage."""
    info = bzimage_info(image)
    out = _decompress(info.compression, image[info.payload_offset:info.payload_offset + info.payload_length])
    if out[:4] != b"\x7fELF":
        raise CorruptData(f"decompressed {info.compression} payload is not an ELF (starts {out[:4].hex()})")
    return out


def vmlinux_from_bzimage(path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Decompress the bzImage at ``path`` once, into ``cache_dir`` (default ``~/.cache/vmsight/vmlinux``),
    keyed by the image's hash; return the vmlinux path."""
    image = Path(path).read_bytes()
    digest = hashlib.sha256(image).hexdigest()[:16]
    out_dir = cache_dir or CACHE / "vmlinux"
    out = out_dir / f"vmlinux-{digest}"
    if out.exists():
        return out
    data = decompress_bzimage(image)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(out)
    log.info("decompressed %s (%d bytes) to %s", path, len(data), out)
    return out


@dataclass(frozen=True)
class ElfSection:
    name: str
    addr: int      # gva the section is linked at
    offset: int    # file offset
    size: int


def elf_sections(elf: bytes) -> dict[str, ElfSection]:
    """Section headers of a 64-bit little-endian ELF (enough of ELF for vmlinux)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        raise CorruptData("not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(elf) or shstrndx >= shnum:
        raise CorruptData("ELF section header table out of bounds")
    raw = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    stroff, strsize = raw[shstrndx][4], raw[shstrndx][5]
    if stroff + strsize > len(elf):
        raise CorruptData("ELF section-name table out of bounds")
    out = {}
    for name_off, _type, _flags, addr, offset, size in raw:
        end = elf.find(b"\0", stroff + name_off, stroff + strsize)
        name = elf[stroff + name_off:end].decode("ascii", "replace") if end >= 0 else ""
        out[name] = ElfSection(name, addr, offset, size)
    return out


class ElfReader:
    """``read(gva, size)`` over an ELF's allocated sections (file-backed ones), so parsers written for
    guest memory can run on a vmlinux file. Raises CorruptData for an address outside them."""

    def __init__(self, elf: bytes) -> None:
        self.elf = elf
        self.sections = sorted((s for s in elf_sections(elf).values() if s.addr and s.size),
                               key=lambda s: s.addr)

    def read(self, gva: int, size: int) -> bytes:
        for s in self.sections:
            if s.addr <= gva and gva + size <= s.addr + s.size:
                off = s.offset + gva - s.addr
                if off + size > len(self.elf):
                    break
                return self.elf[off:off + size]
        raise CorruptData(f"{size:#x} bytes not inside one file-backed ELF section", gva)
