"""``vmsight --vm X regs [--vcpu N] [--hmp]``"""

from __future__ import annotations

import argparse

from vmsight.cli.common import emit_json, open_vm

NAME = "regs"
HELP = "show a vCPU's registers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vcpu", type=int, default=None, help="vCPU index (default: all)")
    p.add_argument("--hmp", action="store_true", help="add GDTR/IDTR/LDTR/TR/DR0-7 (from HMP info registers)")


def run(args: argparse.Namespace) -> int:
    with open_vm(args) as vm:
        with vm.paused():  # one consistent snapshot of every vCPU
            cpus = [args.vcpu] if args.vcpu is not None else [v.index for v in vm.vcpus()]
            out = {}
            for i in cpus:
                regs = vm.registers(i)
                if args.hmp:
                    h = vm.hmp_registers(i)
                    regs.update({k: v for k, v in h.items() if k.startswith(("gdtr", "idtr", "ldt", "tr", "dr"))})
                out[i] = regs
    if args.json:
        emit_json({str(i): r for i, r in out.items()})
        return 0
    for i, regs in out.items():
        print(f"vCPU {i}:")
        items = list(regs.items())
        for j in range(0, len(items), 4):
            print("  " + "  ".join(f"{k:>9}={v:016x}" for k, v in items[j:j + 4]))
    return 0
