"""``vmsight idle``: per-process idle page tracking, a group of four commands.

  vmsight idle live PID [--interval 1s] [--duration 30s] [--backend B] [--range R]...  live table / --json lines
  vmsight idle record PID -o FILE [--interval 1s] [--duration 30s] ...             JSON lines with bitmaps
  vmsight idle report FILE [--wss] [--heatmap out.png|-]                           summarise a recording
  vmsight idle bitmap PID --start GVA --end GVA [--mark] [--wait 1s] [--raw]       proposed /proc/PID/page_idle

``vmsight idle PID ...`` (no command) is ``vmsight idle live PID ...``, as before the group existed. With --vm the
process is one inside that VM (its page tables' accessed bits); otherwise a host process. A libvirt domain
(--vm libvirt:DOMAIN, -c URI) is tracked without taint, but without a gdbstub to flush its vCPUs' TLBs the counts
are lower bounds (marked approximate); --allow-taint adds the stub and makes them exact.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from vmsight.cli.common import escape, parse_duration, positive_duration, table, text_table
from vmsight.errors import VmsightError
from vmsight.memory.paging import user_half_end

if TYPE_CHECKING:
    from vmsight.idle.protocol import Tracker

NAME = "idle"
HELP = "track which pages of a process are idle (working-set size, idle ages, per-VMA, heatmaps)"
SUBCOMMANDS = ("live", "record", "report", "bitmap")
DEFAULT_SUBCOMMAND = "live"   # `vmsight idle PID` = `vmsight idle live PID`
SHADES = " .:-=+*#%@"
MAX_TEXT_WORDS = 1 << 20      # bitmap text/JSON output: 1 Mi lines (256 GiB of addresses); --raw streams any size
RAW_CHUNK_WORDS = 1 << 16
USER_END = user_half_end(la57=True)   # the largest user half (5-level paging): a bound that holds for either mode
MAX_ROWS = 4096
MAX_HEATMAP_CELLS = 1 << 24   # rows x intervals of float64: 128 MiB
BACKENDS = ["auto", "page_idle", "damon", "clear_refs", "guest-pte"]


def _rows(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= v <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"--rows {v}: use 1 to {MAX_ROWS}")
    return v


def _int0(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (decimal, or hex with 0x)") from None


def _pid(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}") from None


_OPTION_OWNERS: dict[str, list[str]] = {}   # option -> the idle commands that take it


class _Parser(argparse.ArgumentParser):
    """An idle command's parser: bad input is one line naming the command and where its options are listed;
    an option of another idle command says whose it is (each command takes only its own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vmsight: error: {escape(self.prog.removeprefix('vmsight '))}: {escape(message)} "
                     f"(see `{escape(self.prog)} --help`)\n")

    def parse_known_args(self, *a: Any, **kw: Any) -> Any:
        # Everything after the command word reaches this parser, and it knows the global options too:
        # what it leaves is unknown to every parser, so it is refused here, in one line.
        ns, extra = super().parse_known_args(*a, **kw)
        if extra:
            opt = extra[0].split("=", 1)[0]
            owners = [c for c in _OPTION_OWNERS.get(opt, []) if f"idle {c}" != self.prog.removeprefix("vmsight ")]
            self.error(f"unrecognized arguments: {' '.join(extra)}"
                       + (f" ({opt} is an option of idle {' and idle '.join(owners)})" if owners else ""))
        return ns, extra


def _tracking(p: argparse.ArgumentParser, default_duration: str) -> None:
    """Options of the commands that track over intervals (live, record)."""
    p.add_argument("pid", type=_pid, metavar="PID", help="the process (with --vm: a process inside the VM)")
    p.add_argument("--interval", dest="interval_s", type=positive_duration, default=1.0, metavar="DURATION",
                   help="sampling interval (default 1s)")
    p.add_argument("--duration", dest="duration_s", type=positive_duration, default=None, metavar="DURATION",
                   help=f"stop after this long (default: {default_duration})")
    _backend(p)
    p.add_argument("--range", dest="ranges", action="append", default=None, metavar="NAME|START-END",
                   help="only this VMA name ([heap], a file path) or gva range (repeatable; default all)")


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: the most precise available; with --vm the process is in the VM: guest-pte")


def _add_live(p: argparse.ArgumentParser) -> None:
    _tracking(p, "until Ctrl-C")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="JSON lines: a header, one record per interval, an end record")


def _add_record(p: argparse.ArgumentParser) -> None:
    _tracking(p, "30s")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the recording (JSON lines with each interval's bitmaps), created 0600")


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a recording from `vmsight idle record`")
    p.add_argument("--wss", action="store_true", help="working-set size per interval")
    p.add_argument("--heatmap", metavar="PNG|-", help="address x time heatmap to a PNG (and the terminal); "
                   "'-' = terminal only")
    p.add_argument("--rows", type=_rows, default=32, help="heatmap rows (address bins, default 32)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the summary as JSON")


def _add_bitmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("pid", type=_pid, metavar="PID", help="the process (with --vm: a process inside the VM)")
    p.add_argument("--start", type=_int0, required=True, metavar="GVA",
                   help="first address (rounded down to 64 pages)")
    p.add_argument("--end", type=_int0, required=True, metavar="GVA",
                   help="end address, exclusive (rounded up to 64 pages)")
    p.add_argument("--mark", action="store_true", help="mark the range idle first, wait, then read")
    p.add_argument("--wait", dest="wait_s", type=parse_duration, default=1.0, metavar="DURATION",
                   help="with --mark: time between mark and read (default 1s)")
    p.add_argument("--raw", action="store_true", help="write the binary words (native u64) to stdout")
    _backend(p)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="the words as JSON")


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "live": ("live view of a process's idle pages: WSS, idle ages, per-VMA (the default command)", _add_live),
    "record": ("record intervals with their bitmaps to a file (JSON lines)", _add_record),
    "report": ("summarise a recording: WSS, heatmap", _add_report),
    "bitmap": ("a range's idle bits in the proposed /proc/PID/page_idle layout", _add_bitmap),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    sub = p.add_subparsers(dest="idle_command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, (help_, add) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        for a in sp._actions:  # noqa: SLF001 - argparse has no public list of a parser's options
            for opt in a.option_strings:
                owners = _OPTION_OWNERS.setdefault(opt, [])
                if name not in owners:   # the parser may be built more than once in a process
                    owners.append(name)


def with_default_subcommand(args: list[str]) -> list[str]:
    """The words after ``idle`` with ``live`` put first unless they name a command (or ask for help):
    ``vmsight idle PID`` keeps working. Values of the global options before it are skipped."""
    skip = False
    for tok in args:
        if skip:
            skip = False
        elif tok in ("--", "-h", "--help"):
            return args
        elif tok.startswith("-"):
            skip = tok in ("--vm", "--gdb", "-c", "--connect")
        else:
            return args if tok in SUBCOMMANDS else [DEFAULT_SUBCOMMAND, *args]
    return args


def run(args: argparse.Namespace) -> int:
    cmd = args.idle_command
    if cmd == "report":
        return _report(args, args.file)
    if cmd == "bitmap":
        return _bitmap(args, args.pid)
    return _track(args, args.pid, record=cmd == "record")


def _ranges(args: argparse.Namespace) -> list[Any] | None:
    if not args.ranges:
        return None
    from vmsight.idle.tracker import MAX_DEFAULT_PAGES

    out: list[Any] = []
    pages = 0
    for r in args.ranges:
        m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)-(0x[0-9a-fA-F]+|\d+)", r)
        if m:
            lo, hi = int(m.group(1), 0), int(m.group(2), 0)
            if not lo < hi <= USER_END:
                raise VmsightError(f"--range {r}: need START < END <= {USER_END:#x} (the user address space)")
            pages += (hi - lo) >> 12
        out.append((lo, hi) if m else r)
    # a gva range is tracked page by page whether mapped or not: bounded like the default set of VMAs
    if pages > MAX_DEFAULT_PAGES:
        raise VmsightError(f"--range spans {pages * 4096 >> 30} GiB, over the {MAX_DEFAULT_PAGES * 4096 >> 30} GiB "
                           "one read holds: name VMAs instead ([heap], a file path) or give narrower ranges")
    return out


@contextlib.contextmanager
def _tracker(args: argparse.Namespace, pid: int) -> Iterator[Tracker]:
    """A host process (IdleTracker), or with --vm a process inside that VM (GuestIdleTracker)."""
    if not getattr(args, "vm", None):
        from vmsight.idle import IdleTracker

        with IdleTracker(pid, args.backend) as t:
            yield t
        return
    if args.backend not in ("auto", "guest-pte"):
        raise VmsightError(f"--backend {args.backend} runs on the host; a process in a VM (--vm) is tracked "
                           "through its page tables: --backend guest-pte (or auto)")
    from vmsight.cli.common import open_vm
    from vmsight.idle.guest import GuestIdleTracker

    # as every --vm command: -c/--connect and --allow-taint reach a libvirt domain
    with open_vm(args) as vm, GuestIdleTracker(vm, pid) as t:
        yield t


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


# --- live / record ------------------------------------------------------------------------------------------
def _track(args: argparse.Namespace, pid: int, record: bool) -> int:
    from vmsight.idle.stats import header_record, run_intervals

    as_json = getattr(args, "json", False)
    duration_s = args.duration_s if args.duration_s is not None else (30.0 if record else None)
    if duration_s is not None and args.interval_s > duration_s + 1e-9:
        raise VmsightError(f"--interval {args.interval_s:g}s is longer than --duration {duration_s:g}s"
                           f"{'' if args.duration_s is not None else ' (the default of idle record)'}: nothing "
                           "would be read in time; give a shorter --interval or a longer --duration")
    output = args.output if record else None
    ranges = _ranges(args)
    if output is not None:
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise VmsightError(f"idle record: no directory {parent} for -o {output}: create it first")
    out: Any = sys.stdout
    try:
        with _tracker(args, pid) as t:
            if output is not None:  # opened once the pid is known good: a typo does not truncate a file
                out = _open_output(output)
            head = header_record(pid, t.comm, t.backend_name, t.reason, t.granularity, t.approximate,
                                 args.interval_s * 1000)
            if record or as_json:
                _emit(out, json.dumps(head), output)
            else:
                print(f"pid {pid} ({escape(t.comm)}): {t.reason}", file=sys.stderr)
            live = None
            if not record and not as_json and sys.stdout.isatty():
                from rich.live import Live
                live = Live(refresh_per_second=4)
                live.start()

            def on_interval(rec: dict[str, Any], snap: Any) -> None:
                if record or as_json:
                    _emit(out, json.dumps(rec), output)
                    if record:
                        print(f"\rinterval {rec['index']}: wss {_mib(rec['wss_bytes'])} MiB", end="",
                              file=sys.stderr, flush=True)
                elif live is not None:
                    live.update(_table(head, rec))
                else:
                    print(_plain(rec))

            try:
                why = run_intervals(t, args.interval_s, duration_s, on_interval, ranges=ranges,
                                    with_bitmap=record)
            except KeyboardInterrupt:
                why = "interrupted"
            finally:
                if live is not None:
                    live.stop()
            if record or as_json:
                _emit(out, json.dumps({"type": "end", "format_version": head["format_version"], "reason": why}),
                      output)
            if record:
                print(f"\nrecorded to {output} ({why})", file=sys.stderr)
            elif why not in ("duration", "interrupted"):
                print(f"stopped: {why}", file=sys.stderr)
    finally:
        if out is not sys.stdout:
            with contextlib.suppress(OSError):
                out.close()
    return 0


def _open_output(path: str) -> Any:
    """The recording, created 0600 (it names the process's mappings), never through a symlink."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise VmsightError(f"idle record: cannot create {path}: {e.strerror}"
                           + (" (a symlink: give the real path)" if e.errno == errno.ELOOP else "")) from None
    return os.fdopen(fd, "w")


def _emit(out: Any, line: str, path: str | None) -> None:
    try:
        out.write(line + "\n")
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:  # ENOSPC (/dev/full), EIO, EFBIG ...
        raise VmsightError(f"cannot write {path or 'the output'}: {e.strerror}") from None


def _plain(rec: dict[str, Any]) -> str:
    h = rec["idle_age_hist_bytes"]
    return (f"[{rec['index']:4d}] wss {_mib(rec['wss_bytes'])} MiB  idle {_mib(rec['idle_bytes'])} MiB  "
            f"swapped {_mib(rec['swapped_bytes'])} MiB  idle>=k: "
            + " ".join(f"{k}:{_mib(v)}" for k, v in h.items()))


def _table(head: dict[str, Any], rec: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.text import Text

    # the header's comm is the process's (a guest's, with --vm): escaped, never read as markup
    title = Text(escape(f"pid {head['pid']} ({head['comm']})  backend {head['backend']} ({head['granularity']}"
                        f"{', approximate' if head['approximate'] else ''})  interval {rec['index']}  "
                        f"{rec['elapsed_ms']:.0f} ms"), style="bold")
    summary = Text(f"WSS {_mib(rec['wss_bytes'])} MiB   idle {_mib(rec['idle_bytes'])} MiB   "
                   f"resident {_mib(rec['present_bytes'])} MiB   swapped {_mib(rec['swapped_bytes'])} MiB   "
                   f"untracked {_mib(rec['untracked_bytes'])} MiB")
    ages = [f">={k}" for k in rec["idle_age_hist_bytes"]]
    hist = table(ages, [[_mib(v) for v in rec["idle_age_hist_bytes"].values()]],
                 title="idle for >= k intervals (MiB)", right=ages, edge=False)
    cols = ("mapping", "kind", "mapped", "resident", "accessed", "idle", "swapped")
    vt = table(cols, ([g["label"][-48:] or "?", g["kind"], _mib(g["mapped_bytes"]), _mib(g["present_bytes"]),
                       _mib(g["accessed_bytes"]), _mib(g["idle_bytes"]), _mib(g["swapped_bytes"])]
                      for g in rec["vmas"][:20]),
               title="per VMA (MiB)", right=cols[2:], edge=False)
    parts: list[Any] = [title, summary, hist, vt]
    if rec.get("warnings"):
        parts.append(Text(escape("; ".join(sorted(set(rec["warnings"])))[:300]), style="yellow"))
    return Group(*parts)


# --- report -------------------------------------------------------------------------------------------------
def _report(args: argparse.Namespace, path: str) -> int:
    from vmsight.idle.stats import heatmap_matrix, read_recording

    try:
        rec = read_recording(path, bitmaps=bool(args.heatmap))
    except (OSError, ValueError) as e:
        raise VmsightError(f"cannot read recording {path}: {getattr(e, 'strerror', None) or e}") from None
    for w in rec.warnings:
        print(f"vmsight: warning: {path}: {escape(w)}", file=sys.stderr)
    h, its = rec.header, rec.intervals
    wss = [i["wss_bytes"] for i in its]
    as_json = getattr(args, "json", False)
    summary = {"format_version": h.get("format_version", 1), "pid": h.get("pid"), "comm": h.get("comm"),
               "backend": h.get("backend"), "intervals": len(its), "interval_ms": h.get("interval_ms"),
               "wss_mean_bytes": int(sum(wss) / len(wss)) if wss else 0, "wss_max_bytes": max(wss, default=0),
               "wss_min_bytes": min(wss, default=0), "end": (rec.end or {}).get("reason"), "warnings": rec.warnings}
    if as_json:
        if args.wss:
            summary["wss_bytes"] = wss
        print(json.dumps(summary))
    else:
        # header fields are whatever the file says: escaped and shortened for the terminal
        pid, comm, backend, ival, end = (escape(str(summary[k]))[:200] for k in
                                         ("pid", "comm", "backend", "interval_ms", "end"))
        print(f"pid {pid} ({comm}), backend {backend}, {len(its)} intervals of {ival} ms; "
              f"WSS mean {_mib(summary['wss_mean_bytes'])} MiB, "
              f"min {_mib(summary['wss_min_bytes'])}, max {_mib(summary['wss_max_bytes'])}"
              + (f"; ended: {end}" if summary["end"] else ""))
        if args.wss:
            top = max(wss, default=0) or 1
            cols = ("#", "elapsed_ms", "wss_MiB", "idle_MiB", "swapped_MiB", "")
            print(text_table(cols, [(i["index"], f"{i['elapsed_ms']:.0f}", _mib(i["wss_bytes"]), _mib(i["idle_bytes"]),
                                     _mib(i["swapped_bytes"]), "#" * int(40 * i["wss_bytes"] / top)) for i in its],
                             right=cols[:-1]))
    if args.heatmap:
        if args.rows * len(its) > MAX_HEATMAP_CELLS:
            raise VmsightError(f"--heatmap: {args.rows} rows x {len(its)} intervals is over {MAX_HEATMAP_CELLS} "
                               f"cells: give --rows {max(1, MAX_HEATMAP_CELLS // len(its))} or fewer")
        try:
            mat, labels = heatmap_matrix(rec, args.rows)
        except (OSError, ValueError) as e:
            raise VmsightError(f"cannot read the bitmaps of recording {path}: "
                               f"{getattr(e, 'strerror', None) or e}") from None
        if mat.size == 0:
            raise VmsightError(f"{path} holds no bitmaps: record it with `vmsight idle record`")
        if not as_json:
            print(_term_heatmap(mat, labels))
        if args.heatmap != "-":
            _png_heatmap(mat, labels, h, args.heatmap)
            print(f"heatmap written to {args.heatmap}", file=sys.stderr)
    return 0


def _term_heatmap(mat: Any, labels: list[tuple[int, int]]) -> str:
    import numpy as np

    lines = ["accessed fraction per address bin (rows) and interval (columns): ' ' none ... '@' all, '?' untracked"]
    for r in range(mat.shape[0]):
        cells = "".join("?" if np.isnan(v) else SHADES[min(len(SHADES) - 1, int(round(v * (len(SHADES) - 1))))]
                        for v in mat[r])
        lines.append(f"{labels[r][0]:#014x} |{cells}|")
    return "\n".join(lines)


def _png_heatmap(mat: Any, labels: list[tuple[int, int]], head: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel(f"interval ({str(head.get('interval_ms', '?'))[:40]} ms each)", parse_math=False)
    ax.set_ylabel("virtual address (mapped ranges, gaps removed)")
    step = max(1, len(labels) // 12)
    ax.set_yticks(range(0, len(labels), step))
    ax.set_yticklabels([f"{lo:#x}" for lo, _ in labels[::step]], fontsize=7)
    # parse_math off: a comm or backend name from the file must not be read as mathtext ("$\\x" raises)
    ax.set_title(f"pid {str(head.get('pid'))[:40]} ({str(head.get('comm'))[:40]}) accessed fraction — "
                 f"{str(head.get('backend'))[:40]}", parse_math=False)
    fig.colorbar(im, ax=ax, label="accessed fraction of tracked pages")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- bitmap -------------------------------------------------------------------------------------------------
def _bitmap(args: argparse.Namespace, pid: int) -> int:
    if not 0 <= args.start < args.end <= USER_END:
        raise VmsightError(f"idle bitmap: --start and --end need 0 <= start < end <= {USER_END:#x} "
                           "(the user address space)")
    start_vfn = (args.start >> 12) // 64 * 64          # the ABI's offsets are multiples of 8 bytes = 64 pages
    end_page = -(-args.end // 4096)
    end_vfn = -(-end_page // 64) * 64
    nwords = (end_vfn - start_vfn) // 64
    if nwords > MAX_TEXT_WORDS and not args.raw:
        raise VmsightError(f"idle bitmap: {nwords} words is over the {MAX_TEXT_WORDS}-word limit of text and "
                           f"--json output ({MAX_TEXT_WORDS * 64 * 4096 >> 30} GiB of addresses): narrow "
                           "--start/--end, or use --raw (streamed, any size)")
    from vmsight.idle.tracker import MAX_DEFAULT_PAGES

    with _tracker(args, pid) as t:
        # only the mapped parts (unmapped words read 0 in the ABI): a range over the whole user half must
        # not make the tracker allocate per-page state for 2^35 pages
        lo, hi = start_vfn << 12, end_vfn << 12
        rng = [(max(lo, v.start_gva), min(hi, v.end_gva)) for v in t.vmas()
               if v.start_gva < hi and lo < v.end_gva and not v.perms.startswith("---")]
        mapped = sum(b - a for a, b in rng) >> 12
        if mapped > MAX_DEFAULT_PAGES:
            raise VmsightError(f"idle bitmap: {mapped * 4096 >> 30} GiB of the range is mapped, over the "
                               f"{MAX_DEFAULT_PAGES * 4096 >> 30} GiB one read holds: narrow --start/--end")
        if args.mark:
            t.mark_idle(rng)
            time.sleep(args.wait_s)
        snap = t.read(rng)
    if args.raw:  # in pieces: the whole user range is 2^32+ bytes of (mostly zero) words
        for _, piece in snap.iter_words(start_vfn, end_vfn, RAW_CHUNK_WORDS):
            sys.stdout.buffer.write(piece.tobytes())
        return 0
    words = snap.words(start_vfn, end_vfn)
    if getattr(args, "json", False):
        print(json.dumps({"format_version": 1, "pid": pid, "backend": snap.backend, "start_vfn": start_vfn,
                          "offset_bytes": start_vfn // 64 * 8, "words": [f"{int(w):#018x}" for w in words],
                          "warnings": snap.warnings}))
        return 0
    print(f"# /proc/{pid}/page_idle (proposed ABI) via {snap.backend}: offset = vfn // 64 * 8, bit = vfn % 64, "
          "1 = idle")
    for i, w in enumerate(words):
        vfn = start_vfn + 64 * i
        print(f"{(vfn // 64) * 8:#014x}  {int(w):016x}  # gva {vfn << 12:#x}")
    for w in sorted(set(snap.warnings)):
        print(f"# warning: {w}", file=sys.stderr)
    return 0
