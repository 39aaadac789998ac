"""On-disk cache of what discovery learns about one kernel build (``kernels-seen/<build id>/``).

A build is identified by its ``linux_banner`` and its kallsyms token table (both constant for a build, both
in ``.rodata``); everything stored here is independent of the KASLR slide: symbol addresses relative to
``_text`` (per-cpu symbols, which are absolute, are flagged) and table offsets relative to ``_text``. A later
attach to the same build validates the cached facts against guest memory (the banner and token table must be
where the cache says) before using them.

An entry is data only, never code (no pickles): ``meta.json`` (versioned; the few hot symbols a re-attach
needs), ``kallsyms.npz`` (names as one NUL-joined blob, type letters, addresses; read only when a symbol
outside the hot set is asked for) and ``offsets.json`` (struct member offsets and sizes resolved from BTF
so far, so that a re-attach walks tasks without parsing BTF; the BTF itself is read from guest memory
when a new one is needed). Writes go to a temporary file or directory renamed into place, so a crashed
writer never leaves half an entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 3   # 3: no btf.pickle; offsets.json; hot_absolute in meta
_OFFSETS_MAX = 1 << 20   # bytes of offsets.json: a few KiB in practice
_OFFSET_LIMIT = 1 << 24  # no struct member lies 16 MiB in


def cache_root() -> Path:
    """``$VMSIGHT_CACHE/kernels-seen`` (default ``~/.cache/vmsight/kernels-seen``)."""
    base = Path(os.environ.get("VMSIGHT_CACHE", Path.home() / ".cache" / "vmsight"))
    return base / "kernels-seen"


def list_entries(root: Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(build id, meta) of every readable entry of the current format."""
    root = root or cache_root()
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        dirs = sorted(root.iterdir())
    except OSError:
        return out
    for d in dirs:
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION:
            out.append((d.name, meta))
    return out


def load_symbols(build_id: str, root: Path | None = None) -> tuple[list[str], bytes, np.ndarray, np.ndarray]:
    """(names, type letters, addresses relative to ``_text`` or absolute, absolute flags) of an entry.
    Raises OSError or ValueError for a missing or damaged entry."""
    import numpy as np

    d = (root or cache_root()) / build_id
    with np.load(d / "kallsyms.npz", allow_pickle=False) as z:
        blob = z["names"].tobytes()
        types = z["types"].tobytes()
        rel = z["rel_addresses"].astype(np.int64)
        absolute = z["absolute"].astype(bool)
    names = blob.decode("latin-1").split("\0")
    if len(names) != len(types) or len(rel) != len(types) or len(absolute) != len(types):
        raise ValueError(f"inconsistent kallsyms arrays in {d}")
    return names, types, rel, absolute


def load_offsets(build_id: str, root: Path | None = None) -> dict[str, int]:
    """The entry's resolved offsets (``"struct\\tmember"`` -> offset or size; -1: no such member, -2: no such
    type); anything malformed is dropped (the offsets are then resolved from BTF again)."""
    path = (root or cache_root()) / build_id / "offsets.json"
    try:
        with path.open("rb") as f:
            raw = f.read(_OFFSETS_MAX + 1)
        data = json.loads(raw) if len(raw) <= _OFFSETS_MAX else None
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(k, str) and type(v) is int and -2 <= v < _OFFSET_LIMIT}


def save_offsets(build_id: str, offsets: dict[str, int], root: Path | None = None) -> None:
    """Merge ``offsets`` into the entry's offsets.json (atomically; failure is logged, not raised)."""
    d = (root or cache_root()) / build_id
    if not d.is_dir():
        return
    merged = {**load_offsets(build_id, root), **offsets}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".offsets.", dir=d)
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, sort_keys=True)
        os.replace(tmp, d / "offsets.json")
    except OSError as e:
        log.info("offsets not cached in %s: %s", d, e)


def save(build_id: str, meta: dict[str, Any], names: list[str], types: bytes, rel_addresses: np.ndarray,
         absolute: np.ndarray, root: Path | None = None) -> Path | None:
    """Write an entry atomically. Returns its directory, or None when the cache is not writable
    (caching is an optimisation: failure is logged, not raised)."""
    import numpy as np

    root = root or cache_root()
    final = root / build_id
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{build_id}.", dir=root))
        try:
            blob = "\0".join(names).encode("latin-1")
            np.savez(tmp / "kallsyms.npz", names=np.frombuffer(blob, dtype=np.uint8),
                     types=np.frombuffer(types, dtype=np.uint8),
                     rel_addresses=np.asarray(rel_addresses, dtype=np.int64),
                     absolute=np.asarray(absolute, dtype=bool))
            (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        log.warning("cannot write kernel cache %s: %s", final, e)
        return None
    return final


__all__ = ["FORMAT_VERSION", "cache_root", "list_entries", "load_offsets", "load_symbols", "save", "save_offsets"]
