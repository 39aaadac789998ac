"""Guest kernels: Debian's packaged kernels fetched with ``apt-get download`` and cached.

The package name is resolved through apt at fetch time (never a hard-coded version):
``debian-6.1`` is whatever ``linux-image-cloud-amd64`` depends on; ``debian-6.12`` is the newest
``linux-image-6.12.*+deb12-amd64`` apt knows. The ``vmlinuz`` is extracted into
``~/.cache/vmsight/kernels/<package>/vmlinuz``, and the package's small library modules (``kernel/lib``: crc7,
crc-itu-t, ...; a few MB) into ``<package>/modules/`` so tests can load real modules into a guest."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmsight.errors import VmsightError

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("VMSIGHT_CACHE", Path.home() / ".cache" / "vmsight"))
KERNEL_NAMES = ("debian-6.1", "debian-6.12")


def _run(cmd: list[str], **kw: object) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise VmsightError(f"{cmd[0]} not found: run scripts/setup.sh (or install apt/dpkg tools)") from e
    except subprocess.CalledProcessError as e:
        raise VmsightError(f"{' '.join(cmd)} failed: {e.stderr.strip()[-400:]}") from e


def _version_key(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)]


def resolve_package(name: str) -> str:
    """The Debian binary package that provides kernel ``name`` today."""
    if name == "debian-6.1":
        deps = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
        pkgs = re.findall(r"Depends: (linux-image-6\.1\.\S+-cloud-amd64)", deps)
    elif name == "debian-6.12":
        names = _run(["apt-cache", "pkgnames", "linux-image-6.12."]).split()
        pkgs = [n for n in names if re.fullmatch(r"linux-image-6\.12\.\d+\+deb12-amd64", n)]
    else:
        raise VmsightError(f"unknown kernel {name!r}: use one of {', '.join(KERNEL_NAMES)} or a path to a bzImage")
    if not pkgs:
        raise VmsightError(f"apt knows no package for {name}: run `apt-get update` (bookworm and "
                           "bookworm-security must be in the sources)")
    return sorted(pkgs, key=_version_key)[-1]


def cached_kernel(name: str) -> Path | None:
    """The newest cached vmlinuz for ``name`` without asking apt (fast path for tests)."""
    prefix = {"debian-6.1": "linux-image-6.1.", "debian-6.12": "linux-image-6.12."}.get(name)
    if prefix is None or not (CACHE / "kernels").is_dir():
        return None
    hits = sorted((p for p in (CACHE / "kernels").iterdir() if p.name.startswith(prefix)
                   and (p / "vmlinuz").is_file()), key=lambda p: _version_key(p.name))
    return hits[-1] / "vmlinuz" if hits else None


def fetch(name: str) -> Path:
    """Download (once) and extract the kernel and its library modules; returns the vmlinuz path."""
    pkg = resolve_package(name)
    dest = CACHE / "kernels" / pkg
    vmlinuz = dest / "vmlinuz"
    if vmlinuz.is_file() and (dest / "modules").is_dir():
        return vmlinuz
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        # _apt cannot write into root's home; download unsandboxed into our own temp dir.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", pkg], cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        _run(["tar", "-x", "-C", tmp, "--wildcards", "./boot/vmlinuz-*", "./lib/modules/*/kernel/lib/*"],
             stdin=tar.stdout)
        tar.wait()
        src = next(Path(tmp, "boot").glob("vmlinuz-*"))
        release = src.name.removeprefix("vmlinuz-")
        for stale in ("modules", "modules.part"):
            shutil.rmtree(dest / stale, ignore_errors=True)
        shutil.move(str(Path(tmp, "lib", "modules", release, "kernel", "lib")), dest / "modules.part")
        os.replace(dest / "modules.part", dest / "modules")
        shutil.move(str(src), vmlinuz.with_suffix(".part"))
        os.replace(vmlinuz.with_suffix(".part"), vmlinuz)
        (dest / "release").write_text(release + "\n")
    log.info("fetched %s -> %s", pkg, vmlinuz)
    return vmlinuz


def module_file(release: str, name: str) -> Path | None:
    """A fetched kernel's library module (``crc7.ko`` or ``crc7.ko.xz``), or None."""
    for d in sorted((CACHE / "kernels").glob("linux-image-*/")):
        if (d / "release").is_file() and d.joinpath("release").read_text().strip() == release:
            for suffix in (".ko", ".ko.xz"):
                if (d / "modules" / f"{name}{suffix}").is_file():
                    return d / "modules" / f"{name}{suffix}"
    return None


def kernel_path(spec: str) -> Path:
    """A kernel given by name (fetched if needed) or by path."""
    if spec in KERNEL_NAMES:
        return cached_kernel(spec) or fetch(spec)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise VmsightError(f"kernel {spec!r} is neither {' nor '.join(KERNEL_NAMES)} nor an existing file")
    return p


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "fetch":
        print("usage: python -m vmsight.qemu.kernels fetch NAME...", file=sys.stderr)
        return 2
    for name in argv[1:]:
        print(f"{name}: {fetch(name)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
