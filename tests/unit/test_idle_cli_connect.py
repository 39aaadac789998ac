"""`vmsight idle` takes -c/--connect and --allow-taint as every --vm command does (libvirt domains), before
or after `idle`, and a URI value is not mistaken for the command word."""

from __future__ import annotations

import pytest

from vmsight.cli.idle import with_default_subcommand
from vmsight.cli.main import build_parser


@pytest.mark.parametrize("words", [["-c", "qemu:///system", "bitmap", "5"], ["--connect", "qemu:///session", "record", "5"]])
def test_uri_is_not_the_command_word(words: list[str]) -> None:
    assert with_default_subcommand(words) == words


def test_default_command_after_a_uri() -> None:
    assert with_default_subcommand(["-c", "qemu:///system", "5"]) == ["live", "-c", "qemu:///system", "5"]


@pytest.mark.parametrize("argv", [
    ["-c", "qemu:///system", "--allow-taint", "--vm", "libvirt:web1", "idle", "live", "5"],
    ["--vm", "libvirt:web1", "idle", "bitmap", "-c", "qemu:///system", "--allow-taint", "5", "--start", "0",
     "--end", "0x1000"],
    ["--vm", "libvirt:web1", "idle", "record", "5", "-o", "/tmp/x", "--connect", "qemu:///system"],
])
def test_idle_commands_take_connect_and_allow_taint(argv: list[str]) -> None:
    args = build_parser(argv).parse_args(argv)
    assert args.connect == "qemu:///system" and args.vm == "libvirt:web1"
    assert args.allow_taint == ("--allow-taint" in argv)
