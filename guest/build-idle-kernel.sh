#!/bin/bash
# Build (once) the small idle-tracking test kernel from Debian's linux-source-6.12 and print the bzImage path.
# Idempotent: the result is cached under ~/.cache/vmsight/kernels/idle-6.12-<hash of the config fragment>/bzImage;
# a cached kernel is printed at once. Build output goes to stderr (and build.log), only the path to stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/idle-kernel.config"
tarball=/usr/src/linux-source-6.12.tar.xz
cache_root="${VMSIGHT_CACHE:-$HOME/.cache/vmsight}/kernels"
hash="$(sha256sum "$fragment" | cut -c1-16)"
out="$cache_root/idle-6.12-$hash"
image="$out/bzImage"

if [[ -s "$image" ]]; then
    echo "$image"
    exit 0
fi

mkdir -p "$cache_root"
# Two concurrent callers: the second waits for the first and then finds the cached image.
exec 9>"$cache_root/.idle-6.12-$hash.lock"
flock 9
if [[ -s "$image" ]]; then
    echo "$image"
    exit 0
fi

if [[ ! -f "$tarball" ]]; then
    echo "build-idle-kernel: $tarball missing; installing linux-source-6.12 and build deps" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y linux-source-6.12 bc flex bison libelf-dev libssl-dev >&2
fi

build="$cache_root/build-idle-6.12-$hash"
src="$build/linux-source-6.12"
if [[ ! -f "$src/Makefile" ]]; then
    rm -rf "$build"
    mkdir -p "$build"
    echo "build-idle-kernel: extracting $tarball" >&2
    tar -C "$build" -xJf "$tarball"
fi

log="$build/build.log"
jobs="$(( $(nproc) + 1 ))"
(
    cd "$src"
    make tinyconfig
    KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment"
    make olddefconfig
    # Every fragment option must survive olddefconfig (a dropped dependency would silently drop a feature).
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=y)
                grep -qx "$line" .config || { echo "build-idle-kernel: $line did not stick" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set")
                opt="${line#\# }"; opt="${opt%% is not set}"
                if grep -q "^$opt=" .config; then echo "build-idle-kernel: $opt should be off" >&2; missing=1; fi ;;
        esac
    done < "$fragment"
    [[ $missing == 0 ]] || exit 1
    make -j"$jobs" bzImage
) > "$log" 2>&1 || {
    echo "build-idle-kernel: build failed, last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
}

mkdir -p "$out"
cp "$src/.config" "$out/config"
cp "$fragment" "$out/fragment.config"
cp "$src/arch/x86/boot/bzImage" "$image.tmp"
mv "$image.tmp" "$image"
echo "$image"
