"""Drive ``vmsight-workload`` (guest_workload.c) in a test guest through the agent."""

from __future__ import annotations

import itertools
import time

from vmsight.qemu.launch import VmInstance

_ids = itertools.count(1)


def norm_maps(text: str) -> list[tuple[int, int, str, int, str]]:
    """/proc/PID/maps lines as (start, end, perms, offset, path), for comparing with vmsight's VMAs."""
    out = []
    for line in text.splitlines():
        f = line.split(None, 5)
        start, end = (int(x, 16) for x in f[0].split("-"))
        out.append((start, end, f[1], int(f[2], 16), f[5].strip() if len(f) > 5 else ""))
    return out


class GuestWorkload:
    """A guest process with PAGES pages mapped at ``addr``; ``touch`` writes a byte in chosen pages."""

    def __init__(self, guest: VmInstance, pages: int, thp: bool = False, high: bool = False) -> None:
        """``high``: mapped above 2^52 (a 5-level guest only), no THP."""
        self.guest = guest
        n = next(_ids)
        self.cmd, self.reply = f"/tmp/wl{n}.cmd", f"/tmp/wl{n}.out"
        mode = "high" if high else "thp" if thp else "nothp"
        r = guest.agent.run(f"vmsight-workload {pages} {mode} {self.cmd} {self.reply} "
                            f">/dev/null 2>&1 & echo $!").check()
        self.pid = int(r.text.split()[0])
        self.seq = 0
        line = self._wait("ready")
        _, addr, size = line.split()
        self.addr, self.size = int(addr, 16), int(size)

    def _wait(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.guest.agent.run(f"cat {self.reply} 2>/dev/null").text.splitlines()
            hits = [ln for ln in out if ln.startswith(prefix)]
            if hits:
                return hits[-1]
            time.sleep(0.1)
        raise TimeoutError(f"workload did not answer {prefix!r}")

    def command(self, text: str) -> int:
        self.seq += 1
        r = self.guest.agent.run(
            f"echo '{text}' > {self.cmd} && kill -USR1 {self.pid} && "
            f"for i in $(seq 200); do grep -q '^done {self.seq} ' {self.reply} && break; usleep 20000; done; "
            f"grep '^done {self.seq} ' {self.reply}").check()
        return int(r.text.split()[2])

    def touch(self, pages: list[int]) -> None:
        assert self.command("touch " + ",".join(map(str, pages))) == len(pages)

    def gva(self, page: int) -> int:
        return self.addr + page * 4096

    def stop(self) -> None:
        self.guest.agent.run(f"kill {self.pid} 2>/dev/null; true")
