#!/usr/bin/env bash
# Idempotent set-up: system packages (apt), the project's venv, and guest kernels in ~/.cache/vmsight.
# Usage: scripts/setup.sh [--no-kernels | --test]   (--test also builds the idle-tracking test kernel, once)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

pkgs=(qemu-system-x86 busybox-static cpio bc flex bison libelf-dev libssl-dev make gcc libc6-dev xz-utils zstd)
# --test: a real libvirtd for tests/guest/test_libvirt.py (started by the tests, no systemd) and what the
# libvirt-python binding builds against
[ "${1:-}" = "--test" ] && pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config)
need_apt=()
for pkg in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${need_apt[*]}; run as root (apt-get install) or install them yourself" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.vmsight-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

if [ "${1:-}" = "--test" ] && ! .venv/bin/python -c 'import libvirt' 2>/dev/null; then
  # vmsight[libvirt]: the binding built against this machine's libvirt (same version: its API, no newer)
  .venv/bin/pip install -q "libvirt-python==$(pkg-config --modversion libvirt)"
fi

if [ "${1:-}" != "--no-kernels" ]; then
  # Package names are resolved through apt; on a machine whose lists are stale or empty, update once and retry.
  if ! .venv/bin/python -m vmsight.qemu.kernels fetch debian-6.1 debian-6.12; then
    [ "$(id -u)" -eq 0 ] && apt-get update -qq
    .venv/bin/python -m vmsight.qemu.kernels fetch debian-6.1 debian-6.12
  fi
fi

if [ "${1:-}" = "--test" ]; then
  # The idle-tracking guest kernel (page_idle, DAMON, zram, 9p): ~5 min on 2 idle cores the first time, then cached.
  guest/build-idle-kernel.sh >/dev/null
fi
