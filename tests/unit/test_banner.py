"""linux/banner.py: the one linux_banner pattern (discovery's read at linux_banner and the kallsyms scan)."""

from __future__ import annotations

from vmsight.linux.banner import BANNER_MAX, parse_banner
from vmsight.linux.kallsyms import find_banner, find_banners

DEBIAN = (b"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) "
          b"12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-06)\n\0")


def test_parse_banner_text_and_release() -> None:
    b = parse_banner(DEBIAN + b"junk")
    assert b is not None
    assert b.release == "6.1.0-57-cloud-amd64"
    assert b.text == DEBIAN[:-2].decode()      # what the build id hashes: no newline, no NUL
    assert b.offset == 0


def test_parse_banner_rejects_lookalikes() -> None:
    assert parse_banner(DEBIAN[:-1]) is None                     # no NUL: not the C string
    assert parse_banner(DEBIAN[:-2] + b"\0") is None             # no newline
    assert parse_banner(b"Linux version 6.1 \x01(x)\n\0") is None  # control byte in the release
    assert parse_banner(b"Linux version abc (x)\n\0") is None     # release must start with N.N
    assert parse_banner(b"Linux version 6.1 (" + b"a" * 401 + b"\n\0") is None   # unbounded
    assert parse_banner(b"x" + DEBIAN) is None                  # anchored


def test_scan_and_read_agree() -> None:
    buf = b"\0" * 100 + DEBIAN + b"\0" * 50 + DEBIAN.replace(b"6.1.0-57", b"6.1.0-58")
    found = find_banners(buf)
    assert [b.offset for b in found] == [100, 100 + len(DEBIAN) + 50]
    assert found[0] == find_banner(buf)
    again = parse_banner(buf[100:100 + BANNER_MAX])
    assert again is not None and (again.text, again.release) == (found[0].text, found[0].release)
