"""``vmsight --vm X sym NAME|ADDR...``: guest kernel symbol -> address, or address -> symbol+offset."""

from __future__ import annotations

import argparse
from typing import Any

from vmsight.cli.common import emit_json, escape, open_vm, symbol_type
from vmsight.linux import kernel_of

NAME = "sym"
HELP = "resolve guest kernel symbols (name -> address, address -> name+offset) from the guest's kallsyms"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="+", metavar="NAME|ADDR", help="symbol names or addresses (0x...)")


def _is_address(text: str) -> bool:
    try:
        int(text, 0)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    out: list[dict[str, Any]] = []
    with open_vm(args) as vm:
        k = kernel_of(vm)
        for w in args.what:
            if _is_address(w):
                gva = int(w, 0) & ((1 << 64) - 1)
                hit = k.lookup(gva)
                out.append({"address": gva, "symbol": hit[0] if hit else None,
                            "offset": hit[1] if hit else None, "text": k.symbolize(gva)})
            else:
                gva = k.symbol(w)
                out.append({"name": w, "address": gva, "type": symbol_type(k, w)})
    if args.json:
        emit_json(out)   # always a list, one entry per argument, so scripts need no special case
        return 0
    for o in out:
        if "name" in o:
            print(f"{o['address']:016x} {escape(o['type'])} {escape(o['name'])}")
        else:
            print(f"{o['address']:016x} {escape(o['text'])}")
    return 0
