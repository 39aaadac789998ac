"""On-disk cache of what discovery learns about one kernel build (``kernels-seen/<build id>/``).

A build is identified by its ``linux_banner`` and its kallsyms token table (both constant for a build, both
in ``.rodata``); everything stored here is independent of the KASLR slide: symbol addresses relative to
``_text`` (per-cpu symbols, which are absolute, are flagged), table offsets relative to ``_text``, and the
raw BTF blob. A later attach to the same build validates the cached facts against guest memory (the banner
and token table must be where the cache says) before using them.

Layout of an entry: ``meta.json`` (versioned, self-describing), ``kallsyms.npz`` (names as one NUL-joined
blob, type letters, addresses) and ``btf.pickle`` (the parsed BTF, when it pickles). Writes go to a
temporary directory renamed into place, so a crashed writer never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 2   # 2: btf.pickle holds (parser fingerprint, Btf)


def cache_root() -> Path:
    """``$VMSIGHT_CACHE/kernels-seen`` (default ``~/.cache/vmsight/kernels-seen``)."""
    base = Path(os.environ.get("VMSIGHT_CACHE", Path.home() / ".cache" / "vmsight"))
    return base / "kernels-seen"


@dataclass
class CachedKernel:
    """One cache entry, loaded. ``meta`` holds ``release``, ``banner``, ``banner_offset``,
    ``token_table_offset``, ``token_table_sha``, ``btf_offset``, ``btf_size`` (offsets from ``_text``)."""

    build_id: str
    meta: dict[str, Any]
    names: list[str]
    types: bytes
    rel_addresses: np.ndarray     # int64: gva - _text for relative symbols, the gva for absolute ones
    absolute: np.ndarray          # bool: per-cpu / absolute symbols (not moved by KASLR)
    btf: Any | None               # the parsed BTF object, if it was pickled


def btf_code_version() -> str:
    """Fingerprint of the BTF parser's source: a pickle written by another version is not trusted."""
    try:
        from vmsight.linux import btf as kbtf

        return hashlib.blake2b(Path(kbtf.__file__).read_bytes(), digest_size=8).hexdigest()
    except (ImportError, OSError):
        return "unknown"


def save_btf(build_id: str, btf: Any, root: Path | None = None) -> None:
    """Add the parsed BTF to an existing entry (one written before BTF was parsed, or by an older
    parser)."""
    d = (root or cache_root()) / build_id
    try:
        tmp = d / f".btf.pickle.{os.getpid()}"
        with tmp.open("wb") as f:
            pickle.dump((btf_code_version(), btf), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(d / "btf.pickle")
    except Exception as e:  # noqa: BLE001 - caching is an optimisation
        log.info("BTF not cached in %s: %s", d, e)


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


def load(build_id: str, root: Path | None = None) -> CachedKernel | None:
    """The entry for ``build_id``, or None when it is missing or unreadable (then it is rebuilt)."""
    d = (root or cache_root()) / build_id
    try:
        meta = json.loads((d / "meta.json").read_text())
        with np.load(d / "kallsyms.npz", allow_pickle=False) as z:
            blob = z["names"].tobytes()
            types = z["types"].tobytes()
            rel = z["rel_addresses"].astype(np.int64)
            absolute = z["absolute"].astype(bool)
        names = blob.decode("latin-1").split("\0")
        if len(names) != len(types) or len(rel) != len(types) or len(absolute) != len(types):
            raise ValueError("inconsistent kallsyms arrays")
        btf = None
        bp = d / "btf.pickle"
        if bp.exists():
            try:
                with bp.open("rb") as f:
                    version, btf = pickle.load(f)  # noqa: S301 - our own cache file, written by save()
                if version != btf_code_version():
                    btf = None
            except Exception as e:  # noqa: BLE001 - a stale pickle (class changed) is just a cache miss
                log.info("ignoring unreadable BTF pickle in %s: %s", d, e)
                btf = None
    except (OSError, ValueError, KeyError) as e:
        log.info("kernel cache entry %s unusable: %s", d, e)
        return None
    return CachedKernel(build_id, meta, names, types, rel, absolute, btf)


def save(build_id: str, meta: dict[str, Any], names: list[str], types: bytes, rel_addresses: np.ndarray,
         absolute: np.ndarray, btf: Any | None, root: Path | None = None) -> Path | None:
    """Write an entry atomically. Returns its directory, or None when the cache is not writable
    (caching is an optimisation: failure is logged, not raised)."""
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
            if btf is not None:
                try:
                    with (tmp / "btf.pickle").open("wb") as f:
                        pickle.dump((btf_code_version(), btf), f, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as e:  # noqa: BLE001 - unpicklable BTF: re-parse on the next attach
                    log.info("BTF not cached (%s)", e)
                    (tmp / "btf.pickle").unlink(missing_ok=True)
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


__all__ = ["FORMAT_VERSION", "CachedKernel", "btf_code_version", "cache_root", "list_entries", "load", "save",
           "save_btf"]
