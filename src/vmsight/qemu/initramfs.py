"""Builds the test guests' busybox initramfs (``guest_init.sh`` + busybox-static), cached by content."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from vmsight.errors import VmsightError
from vmsight.qemu.kernels import CACHE

BUSYBOX = Path("/bin/busybox")


def build_initramfs() -> Path:
    """Path of the cached ``initramfs.cpio.gz`` (built on first use)."""
    init = resources.files("vmsight.qemu").joinpath("guest_init.sh").read_bytes()
    if not BUSYBOX.is_file():
        raise VmsightError("busybox-static is not installed: run scripts/setup.sh (apt-get install busybox-static)")
    if shutil.which("cpio") is None:
        raise VmsightError("cpio is not installed: run scripts/setup.sh (apt-get install cpio)")
    bb = BUSYBOX.read_bytes()
    digest = hashlib.sha256(init + hashlib.sha256(bb).digest()).hexdigest()[:16]
    out = CACHE / "initramfs" / f"agent-{digest}.cpio.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root", "mnt"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        (root / "init").write_bytes(init)
        os.chmod(root / "init", 0o755)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        data = _pack(root)
    tmp_out = out.with_suffix(".part")
    tmp_out.write_bytes(data)
    os.replace(tmp_out, out)
    return out


def _pack(root: Path) -> bytes:
    """A gzip'd newc cpio of the tree at ``root``, owned by root, reproducible (mtime 0)."""
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=names,
                          capture_output=True, check=True).stdout
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(cpio)
    return buf.getvalue()


def _newc_gz(files: dict[str, bytes]) -> bytes:
    """An archive holding ``files`` (guest path -> content, mode 0755) and their directories."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for guest_path, data in files.items():
            dest = root / guest_path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            os.chmod(dest, 0o755)
        return _pack(root)


def with_extra_files(base: Path, files: dict[str, str], out: Path) -> Path:
    """``base`` followed by a second archive with ``files`` (guest path -> host path): the kernel unpacks
    concatenated initramfs archives in order, so the base stays cached and shared."""
    extra = _newc_gz({g: Path(h).read_bytes() for g, h in files.items()})
    out.write_bytes(base.read_bytes() + extra)
    return out


def build_workload() -> Path:
    """The static test workload (``guest_workload.c``), compiled once and cached by source hash."""
    src = resources.files("vmsight.qemu").joinpath("guest_workload.c").read_bytes()
    out = CACHE / "guest-tools" / f"vmsight-workload-{hashlib.sha256(src).hexdigest()[:16]}"
    if out.is_file():
        return out
    if shutil.which("gcc") is None:
        raise VmsightError("gcc is not installed: run scripts/setup.sh (apt-get install gcc libc6-dev)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp, "workload.c")
        c.write_bytes(src)
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out.with_suffix(".part")), str(c)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise VmsightError(f"cannot build the guest workload: {r.stderr.strip()[-400:]} "
                               "(static linking needs libc6-dev)")
    os.replace(out.with_suffix(".part"), out)
    return out
