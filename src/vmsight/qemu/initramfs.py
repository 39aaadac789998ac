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
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(cpio)
    tmp_out = out.with_suffix(".part")
    tmp_out.write_bytes(buf.getvalue())
    os.replace(tmp_out, out)
    return out
