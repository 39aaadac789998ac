"""Run every benchmark: ``python -m benchmarks [NAME...]``. Each ``bench_*.py`` module has ``run() -> dict``;
ratios are measured against a baseline taken in the same run, so they hold across machines."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    sys.path.insert(0, str(here.parent))
    results: dict[str, object] = {}
    for name in names:
        t = time.monotonic()
        mod = importlib.import_module(f"benchmarks.{name}")
        try:
            res = mod.run()
        except Exception as e:  # noqa: BLE001 - report and go on with the other benchmarks
            res = {"error": f"{type(e).__name__}: {e}"}
        results[name] = res
        print(f"== {name} ({time.monotonic() - t:.1f} s)")
        for k, v in res.items():
            print(f"  {k:<48} {v:.4g}" if isinstance(v, float) else f"  {k:<48} {v}")
    # Merge, so that running one benchmark keeps the others' last numbers.
    out = Path(__file__).parent / "last-results.json"
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        previous = {}
    out.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
