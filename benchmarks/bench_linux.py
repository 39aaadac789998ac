"""Kernel discovery without symbol files, on the real Debian 6.1 and 6.12 images (decompressed vmlinux).

Per kernel: scan for the kallsyms token table, detect the table layout, decode every symbol (cold: the
per-build decode cache cleared; warm: cached), index the BTF and build its name index, and one member
lookup. Targets: kallsyms decode <= 0.3 s for 163k symbols, BTF index well under 0.5 s. Times are the
best of several runs (the machine is shared)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.timing import best_of
from vmsight.linux import kallsyms as K
from vmsight.linux.btf import Btf
from vmsight.linux.vmlinux import elf_sections, vmlinux_from_bzimage
from vmsight.qemu.kernels import CACHE

BOOT = Path.home() / ".cache/vmsight/debs/x/boot"
KERNELS = {"6.1": "vmlinuz-6.1.0-*-cloud-amd64", "6.12": "vmlinuz-6.12.*+deb12-amd64"}
FETCHED = {"6.1": "linux-image-6.1.*-cloud-amd64/vmlinuz", "6.12": "linux-image-6.12.*+deb12-amd64/vmlinuz"}



def _bench_kernel(version: str, image: Path) -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    elf = vmlinux_from_bzimage(image).read_bytes()
    secs = elf_sections(elf)
    ro = secs[".rodata"]
    rodata = memoryview(elf)[ro.offset:ro.offset + ro.size]
    tt = next(K.find_token_tables(rodata))
    layout = K.detect_layout(rodata, tt)

    def cold() -> None:
        K._DECODE_CACHE.clear()
        K.decode_kallsyms(rodata, tt, layout)

    def end_to_end() -> None:
        K._DECODE_CACHE.clear()
        K.find_kallsyms(rodata)

    ks = K.find_kallsyms(rodata)
    out[f"{version}_symbols"] = len(ks)
    out[f"{version}_kallsyms_layout"] = layout.order
    out[f"{version}_kallsyms_scan_s"] = best_of(lambda: next(K.find_token_tables(rodata)))
    out[f"{version}_kallsyms_layout_detect_s"] = best_of(lambda: K.detect_layout(rodata, tt))
    out[f"{version}_kallsyms_decode_cold_s"] = best_of(cold)
    out[f"{version}_kallsyms_decode_warm_s"] = best_of(lambda: K.decode_kallsyms(rodata, tt, layout))
    out[f"{version}_kallsyms_end_to_end_cold_s"] = best_of(end_to_end)
    # 1000 lookups timed, reported per lookup in microseconds.
    out[f"{version}_lookup_us"] = best_of(lambda: [ks.lookup(ks.relative_base + i) for i in range(1000)]) * 1e3

    b = secs[".BTF"]
    raw = elf[b.offset:b.offset + b.size]
    btf = Btf(raw)
    out[f"{version}_btf_types"] = len(btf)
    out[f"{version}_btf_bytes"] = len(raw)
    out[f"{version}_btf_index_s"] = best_of(lambda: Btf(raw))
    out[f"{version}_btf_index_plus_names_s"] = best_of(lambda: Btf(raw).find("task_struct"))
    out[f"{version}_btf_first_member_lookup_s"] = best_of(lambda: Btf(raw).member_offset("mm_struct", "pgd"))
    out[f"{version}_mm_struct_pgd_offset"] = btf.member_offset("mm_struct", "pgd")
    return out


def run() -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    for version, pattern in KERNELS.items():
        images = []
        for root, pat in ((CACHE / "kernels", FETCHED[version]), (BOOT, pattern)):
            images = sorted(root.glob(pat)) if root.is_dir() else []
            if images:
                break
        if not images:
            out[f"{version}_skipped"] = "no cached Debian kernel (scripts/setup.sh fetches them)"
            continue
        out.update(_bench_kernel(version, images[-1]))
    return out


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:<40} {v:.4g}" if isinstance(v, float) else f"{k:<40} {v}")
