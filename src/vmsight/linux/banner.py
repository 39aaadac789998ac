"""``linux_banner`` ("Linux version R (builder) (compiler) #N ...\\n"), the one pattern for every reader.

Its own module, without numpy: a re-attach reads the banner to recognise a known build and must not pay for the
kallsyms decoder's imports."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The C string with its NUL: init/version.c formats it as "Linux version %s (%s@%s) (%s) %s\n". 400 printable
# bytes is far more than any distribution kernel's (~230); the release is what `uname -r` prints.
BANNER_RE = re.compile(rb"Linux version (\d+\.\d+[\x21-\x7e]*) \([\x20-\x7e]{1,400}\n\0")
BANNER_MAX = 512   # bytes to read at linux_banner to match it


@dataclass(frozen=True)
class Banner:
    offset: int     # in the buffer it was found in
    text: str       # without the trailing newline
    release: str    # e.g. "6.1.0-56-cloud-amd64" (what uname -r says)


def banner_from(match: re.Match[bytes]) -> Banner:
    return Banner(match.start(), match.group(0)[:-2].decode("ascii"), match.group(1).decode("ascii"))


def parse_banner(raw: bytes) -> Banner | None:
    """The banner at the start of ``raw``, or None."""
    m = BANNER_RE.match(raw)
    return None if m is None else banner_from(m)
