"""The global options (--vm, --gdb, --json, -v) work before and after every command in the table, groups
included; a value given before the command survives the subparser; --version comes from package metadata;
an unexpected exception is one line (the traceback only with -vv)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsight.cli.main import COMMANDS, build_parser, parse_args

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)  # noqa: SLF001


def _leaves(p: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    sub = _subparsers(p)
    if sub is None:
        yield words, p
        return
    for name, sp in sub.choices.items():
        yield from _leaves(sp, (*words, name))


def _operands(p: argparse.ArgumentParser) -> list[str]:
    """The least a command needs to parse: one value per required positional, required options. A command
    line that ends in REMAINDER (`vm exec ... -- CMD`) is left open: options given after it are the guest's."""
    out: list[str] = []
    for a in p._actions:  # noqa: SLF001
        if a.nargs == argparse.REMAINDER:
            continue
        if not a.option_strings and a.nargs not in ("?", "*"):
            out.append(str(next(iter(a.choices))) if a.choices else "1")
        elif a.option_strings and a.required:
            out += [a.option_strings[0], "1"]
    return out


def _remainder(p: argparse.ArgumentParser) -> list[str]:
    return ["--", "true", "--json"] if any(a.nargs == argparse.REMAINDER for a in p._actions) else []  # noqa: SLF001


LEAVES = list(_leaves(build_parser()))
IDS = [" ".join(w) for w, _ in LEAVES]


def test_every_command_module_is_in_the_parser() -> None:
    import importlib

    names = set(IDS) | {w[0] for w, _ in LEAVES}   # a command may be a group of its own (idle live|record|...)
    for name, mod in COMMANDS.items():
        m = importlib.import_module(mod)
        assert m.NAME == name and name in names
    assert {"ps", "vm launch", "idle", "trace"} <= names


@pytest.mark.parametrize("words,sp", LEAVES, ids=IDS)
def test_global_options_after_the_command(words: tuple[str, ...], sp: argparse.ArgumentParser) -> None:
    base = [*words, *_operands(sp)]
    a = parse_args([*base, "--json", "--vm", "/x/vm", "--gdb", "/x/gdb.sock", "-v", "-v", *_remainder(sp)])
    assert (a.json, a.vm, a.gdb, a.verbose) == (True, "/x/vm", "/x/gdb.sock", 2)


@pytest.mark.parametrize("words,sp", LEAVES, ids=IDS)
def test_global_options_before_the_command_survive(words: tuple[str, ...], sp: argparse.ArgumentParser,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSIGHT_VM", raising=False)
    monkeypatch.delenv("VMSIGHT_GDB", raising=False)
    base = [*words, *_operands(sp)]
    a = parse_args(["--json", "--vm", "/x/vm", "--gdb", "/x/gdb.sock", "-v", *base])
    assert (a.json, a.vm, a.gdb, a.verbose) == (True, "/x/vm", "/x/gdb.sock", 1)
    a = parse_args(base)
    assert (a.json, a.vm, a.gdb, a.verbose) == (False, None, None, 0)
    a = parse_args(["--vm", "/before", "-v", *base, "--vm", "/after", "-v"])  # the last one wins, -v adds up
    assert (a.vm, a.verbose) == ("/after", 2)


@pytest.mark.parametrize("words,sp", [(w, sp) for w, sp in LEAVES if len(w) > 1], ids=[i for i in IDS if " " in i])
def test_global_options_between_group_and_command(words: tuple[str, ...], sp: argparse.ArgumentParser) -> None:
    a = parse_args([words[0], "--json", "-v", "--vm", "/x/vm", *words[1:], *_operands(sp), "-v"])
    assert (a.json, a.vm, a.verbose) == (True, "/x/vm", 2)


def test_env_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSIGHT_VM", "/env/vm")
    assert parse_args(["ps"]).vm == "/env/vm"
    assert parse_args(["ps", "--vm", "/cli/vm"]).vm == "/cli/vm"


def _vmsight(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "vmsight.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})


def test_ps_json_after_the_command_reaches_the_command(tmp_path: Path) -> None:
    """The issue's report: `ps --json` was 'unrecognized arguments'; now --vm after it is used too."""
    r = _vmsight("ps", "--json", "--vm", str(tmp_path / "missing.sock"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"vmsight: error: {tmp_path / 'missing.sock'} does not exist")
    assert r.stderr.count("\n") == 1


def test_version() -> None:
    r = _vmsight("--version")
    assert r.returncode == 0 and r.stdout == f"vmsight {importlib.metadata.version('vmsight')}\n"


BUG = ("import sys, vmsight.cli.ps as ps\n"
       "def run(args): raise KeyError('a bug')\n"
       "ps.run = run\n"
       "from vmsight.cli.main import main\n"
       "sys.exit(main(sys.argv[1:]))\n")


def test_unexpected_exception_is_one_line() -> None:
    r = _vmsight("ps", code=BUG)
    assert r.returncode == 1
    assert r.stderr == "vmsight: internal error: KeyError: 'a bug' (run with -vv for the traceback)\n"
    r = _vmsight("ps", "-vv", code=BUG)
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback (most recent call last):") and 'line 2, in run\nKeyError' in r.stderr
    assert r.stderr.endswith("vmsight: internal error: KeyError: 'a bug'\n")


def test_a_command_loads_only_its_own_module() -> None:
    """`vmsight ps` imports the ps command, not trace's event machinery, demo's rich, idle's numpy paths."""
    import subprocess
    import sys

    code = ("import sys; from vmsight.cli.main import build_parser; build_parser(['--vm', 'x', 'ps', '--json']); "
            "print(sorted(m for m in sys.modules if m.startswith(('vmsight.cli.', 'vmsight.events.dispatcher', "
            "'rich', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert eval(out) == ["vmsight.cli.common", "vmsight.cli.main", "vmsight.cli.ps", "vmsight.cli.signals"]
    code = "from vmsight.cli.main import build_parser, _selected; print(_selected(%r))"
    for argv, want in ((["--vm", "ps", "ps"], "ps"), (["vm", "exec", "--dir", "d"], "vm exec"),
                       (["-v", "--gdb", "x", "idle", "record", "1"], "idle"), (["vm"], None), (["--help"], None),
                       (["pss"], None)):
        r = subprocess.run([sys.executable, "-c", code % argv], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == str(want), argv


def test_events_package_names_resolve_lazily() -> None:
    import vmsight.events as ev

    assert set(ev.__all__) == set(ev._WHERE)
    assert all(getattr(ev, name).__name__ == name for name in ev.__all__)
