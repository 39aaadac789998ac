"""Helpers shared by CLI commands: target attach, terminal-safe text and tables, lossless JSON output, hexdump."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

from vmsight.dump import DumpMachine, is_regular_file, open_dump
from vmsight.errors import VmsightError
from vmsight.events.watchdog import supervise
from vmsight.memory.paging import PagingEntry
from vmsight.vm import VM, attach

# --- argument types and the target (argparse) -------------------------------------------------------

def int0(text: str) -> int:
    """argparse type for numbers that may be hex (``0x...``)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal, or hex with 0x)") from None


def positive_int0(text: str) -> int:
    """argparse type for a count or size: an integer >= 1, decimal or hex."""
    n = int0(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return n


MAX_DURATION_S = 1e7          # ~115 days; time.sleep overflows far beyond


def parse_duration(text: str) -> float:
    """argparse type for a duration: seconds, or a number with ms, s, m or h (``500ms``, ``1.5``, ``2m``)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 500ms, 1s, 2m")
    v = float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    if v > MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"duration {text!r} is over {MAX_DURATION_S:.0f} s")
    return v


def positive_duration(text: str) -> float:
    """:func:`parse_duration`, and more than zero (every --interval and --duration)."""
    v = parse_duration(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be > 0: use e.g. 500ms, 1s")
    return v


def require_vm(args: argparse.Namespace) -> str:
    """The --vm value, or a clear error."""
    if not args.vm:
        raise VmsightError("no target VM: pass --vm DIR (from `vmsight vm launch --dir DIR`), --vm QMP_SOCKET or "
                           "--vm libvirt:DOMAIN")
    return str(args.vm)


# --- helpers shared by commands (commands do not import each other) -----------------------------------

def show(args: argparse.Namespace, data: bytes, base: int, meta: dict[str, object]) -> int:
    if args.raw:
        sys.stdout.buffer.write(data)
    elif args.json:
        emit_json({**meta, "size": len(data), "hex": data.hex()})
    else:
        print(hexdump(data, base))
    return 0


def resolve_dtb(vm: VM, args: argparse.Namespace) -> int:
    if getattr(args, "pid", None) is not None:
        from vmsight.linux import process_dtb  # the Linux layer: pid -> the task's user page tables

        return int(process_dtb(vm, args.pid))
    return int(args.dtb) if args.dtb is not None else vm.current_dtb()


def flags(e: PagingEntry) -> list[str]:
    names = [("present", e.present), ("writable", e.writable), ("user", e.user), ("accessed", e.accessed),
             ("dirty", e.dirty), ("huge", e.ps and e.level in (2, 3)), ("global", e.global_), ("nx", e.nx)]
    return [n for n, on in names if on]


def symbol_type(k: Any, name: str) -> str:
    """nm type letter of a kallsyms name ('?' when absent)."""
    syms = k.symbols
    try:
        i = syms.names.index(name)
    except ValueError:
        return "?"
    return chr(syms.types[i])


def open_vm(args: argparse.Namespace) -> VM:
    """Attach to --vm, with a watchdog that resumes it if this command dies while it is paused
    (unless --no-watchdog)."""
    target = require_vm(args)
    libvirt = target.startswith("libvirt:")
    vm = attach(target, gdb=getattr(args, "gdb", None),
                purpose=f"vmsight {getattr(args, 'command_name', None) or 'command'}",
                uri=getattr(args, "connect", None) if libvirt else None,
                allow_taint=libvirt and bool(getattr(args, "allow_taint", False)))
    # a libvirt domain is paused only inside paused() and resumed by its unwinding; the watchdog speaks QMP
    if not getattr(args, "no_watchdog", False) and not libvirt:
        try:
            supervise(vm)
        except BaseException:
            vm.close()
            raise
    return vm


def add_dump_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that also read memory dumps (``--vm FILE``)."""
    p.add_argument("--cr3", type=int0, metavar="GPA",
                   help="with --vm RAW_IMAGE (pmemsave): a page table to find the kernel from (default: "
                        "found by scanning the image)")


def open_machine(args: argparse.Namespace) -> VM | DumpMachine:
    """:func:`open_vm`, or for a --vm that is a file, the memory dump it holds (``--cr3`` for a raw image):
    for the commands that only read the guest kernel (ps, maps, lsmod, uname)."""
    target = require_vm(args)
    if is_regular_file(target):
        return open_dump(target, cr3=getattr(args, "cr3", None))
    return open_vm(args)


def note_if_stopped(vm: VM) -> None:
    """Event commands leave a stopped VM stopped: say so, or they would seem to hang."""
    status = vm.status()
    if status != "running":
        print(f"vmsight: the VM is {status} and stays so: events come once it runs "
              "(`vmsight vm resume` or QMP cont)", file=sys.stderr, flush=True)


def escape(text: str) -> str:
    """``text`` made safe for a terminal: every character that is not printable (C0 controls, DEL, C1,
    Unicode format/bidi/line-separator characters, unassigned ones) and the backslash become a backslash
    escape, so a guest string (comm, cmdline, path, hostname, symbol) cannot move the cursor, set the
    title or clear the screen. Unambiguous: ``\\xNN`` with NN < 0x80 is that ASCII control, with NN >= 0x80
    the raw byte of invalid UTF-8 (decoded with 'surrogateescape'); ``\\uNNNN`` is a code point."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(c) for c in text)


_SHORT = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    if c.isprintable():
        return c
    o = ord(c)
    if o < 0x80:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None,
          right: Container[str] = (), styles: Mapping[str, str] | None = None, edge: bool = True) -> Any:
    """A rich ``Table`` of ``rows`` under ``columns`` (left-aligned unless named in ``right``, styled per
    ``styles``). The title and every cell are plain text made terminal-safe with :func:`escape`: a guest string
    (comm, path, VMA name) can neither be read as rich markup nor move the cursor. rich is imported only here,
    when a table is made (``vmsight ps`` never loads it)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(escape(title)) if title is not None else None, show_edge=edge)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", style=(styles or {}).get(c))
    for r in rows:
        t.add_row(*(Text(escape(str(v))) for v in r))
    return t


def text_table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, right: Container[str] = ()) -> str:
    """``rows`` under ``columns`` as aligned plain text, the form of ps(1) and lsmod(8) (for pipes and grep;
    :func:`table` is the rich form). Columns named in ``right`` are right-aligned; the last column is never
    padded. Every cell is made terminal-safe with :func:`escape`, so widths are those of what is printed."""
    body = [[escape(str(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if name in right else c.ljust(w)
               for c, w, name in zip(cells, widths, columns, strict=True)]
        if columns and columns[-1] not in right:
            out[-1] = cells[-1]
        return " ".join(out).rstrip()

    return "\n".join([line(list(columns))] + [line(r) for r in body])


def json_safe(obj: Any) -> Any:
    """``obj`` with every string valid Unicode, losslessly: a guest string that held invalid UTF-8
    (decoded with 'surrogateescape') is shown with U+FFFD in its field, and its exact bytes go in a sibling
    ``<field>_hex`` (for a list of strings, a list of hex strings). Plain strings are left as they are, so
    the sibling exists only when the bytes could not be said in JSON."""
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for key, val in obj.items():
            out[key] = json_safe(val)
            if isinstance(val, str) and _lossy(val):
                out[f"{key}_hex"] = _raw(val).hex()
            elif isinstance(val, list | tuple) and any(isinstance(v, str) and _lossy(v) for v in val):
                out[f"{key}_hex"] = [_raw(v).hex() if isinstance(v, str) else v for v in val]
        return out
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, str) and _lossy(obj):
        return _raw(obj).decode("utf-8", "replace")
    return obj


def _lossy(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _raw(text: str) -> bytes:
    """The bytes a guest string was decoded from ('surrogateescape'); a stray surrogate from elsewhere is
    kept as its code point's bytes rather than failing."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def emit_json(obj: Any) -> None:
    json.dump(json_safe(obj), sys.stdout, indent=None if isinstance(obj, dict) and len(obj) < 4 else 2)
    sys.stdout.write("\n")


def json_line(obj: Any) -> str:
    """One JSON-lines record (no newline), strings made valid Unicode losslessly like :func:`emit_json`."""
    return json.dumps(json_safe(obj))


def hexdump(data: bytes, base: int) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + i:016x}  {hx:<47}  |{asc}|")
    return "\n".join(lines)
