"""The tracked process as procfs shows it: identity (pid + start time), kernel-thread check, VMAs, smaps.

Pid reuse: we hold a pidfd from attach time. While it says the process is alive, the pid cannot name anyone
else, so anything read through /proc/PID before that check belongs to our process. When it says the process is
gone, /proc/PID's start time tells "exited" from "exited and the pid was reused"."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass

from vmsight.idle.errors import KernelThread, PidReused, ProcessGone
from vmsight.idle.kfiles import KernelFiles
from vmsight.linux.mm import Vma  # the one VMA class: a maps line here, a guest vm_area_struct there

log = logging.getLogger(__name__)

PF_KTHREAD = 0x00200000  # include/linux/sched.h


def parse_maps(text: str) -> list[Vma]:
    """Parse /proc/PID/maps. Malformed lines are skipped (logged)."""
    vmas = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            lo, hi = parts[0].split("-")
            vmas.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3], int(parts[4]),
                            parts[5].strip() if len(parts) > 5 else ""))
        except ValueError:
            log.debug("skipping malformed maps line %r", line)
    return vmas


@dataclass
class SmapsEntry:
    vma: Vma
    fields_kb: dict[str, int]

    def bytes(self, key: str) -> int:
        return self.fields_kb.get(key, 0) * 1024


def parse_smaps(text: str) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps: a maps line followed by ``Key:   N kB`` lines."""
    out: list[SmapsEntry] = []
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            vs = parse_maps(line)
            if vs:
                out.append(SmapsEntry(vs[0], {}))
            continue
        if out and ":" in line:
            key, _, rest = line.partition(":")
            words = rest.split()
            if len(words) == 2 and words[1] == "kB":
                with contextlib.suppress(ValueError):
                    out[-1].fields_kb[key.strip()] = int(words[0])
    return out


@dataclass(frozen=True)
class ProcStat:
    comm: str
    state: str
    flags: int
    start_ticks: int


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat; comm may contain spaces and parentheses, so split at the last ')'."""
    lp, rp = text.index("("), text.rindex(")")
    comm = text[lp + 1:rp]
    rest = text[rp + 2:].split()
    # rest[0] is field 3 (state); flags is field 9, starttime field 22
    return ProcStat(comm, rest[0], int(rest[6]), int(rest[19]))


def ticks_to_ns(ticks: int) -> int:
    """Clock ticks (USER_HZ, what /proc reports times in) to ns."""
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class Process:
    """A process we track, pinned by pid + start time (+ a pidfd where the kernel has pidfd_open)."""

    def __init__(self, pid: int, proc: KernelFiles | None = None, use_pidfd: bool = True) -> None:
        if pid <= 0:
            raise ProcessGone(pid, "attach")
        self.pid = pid
        self.proc = proc or KernelFiles("/proc")
        st = self._stat("attach")
        if st.flags & PF_KTHREAD:
            raise KernelThread(pid, st.comm)
        if st.state in ("Z", "X"):
            raise ProcessGone(pid, "attach (zombie)")
        self.comm = st.comm
        self.start_ticks = st.start_ticks
        self._pidfd: int | None = None
        if use_pidfd and self.proc.root == "/proc":
            try:
                self._pidfd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                self._pidfd = None
        self.check_alive("attach")

    def _stat(self, phase: str) -> ProcStat:
        try:
            return parse_stat(self.proc.read_text(f"{self.pid}/stat"))
        except FileNotFoundError:
            raise ProcessGone(self.pid, phase) from None
        except (ValueError, IndexError):
            raise ProcessGone(self.pid, phase) from None

    def check_alive(self, phase: str = "") -> None:
        """Raise :class:`ProcessGone` / :class:`PidReused` unless the process we attached to still runs."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True  # signal not permitted, but the process exists
            if alive:
                st = self._stat(phase)
                if st.state in ("Z", "X"):
                    raise ProcessGone(self.pid, f"{phase} (zombie)" if phase else "exit (zombie)")
                return
        try:
            st = parse_stat(self.proc.read_text(f"{self.pid}/stat"))
        except (FileNotFoundError, ValueError, IndexError):
            raise ProcessGone(self.pid, phase) from None
        if st.start_ticks != self.start_ticks:
            raise PidReused(self.pid, ticks_to_ns(self.start_ticks), ticks_to_ns(st.start_ticks))
        if self._pidfd is not None or st.state in ("Z", "X"):
            raise ProcessGone(self.pid, phase)

    @property
    def start_boottime_ns(self) -> int:
        """Start time in ns since boot, to a clock tick (/proc/PID/stat field 22 is in ticks)."""
        return ticks_to_ns(self.start_ticks)

    def maps(self) -> list[Vma]:
        try:
            text = self.proc.read_text(f"{self.pid}/maps")
        except FileNotFoundError:
            raise ProcessGone(self.pid, "reading maps") from None
        self.check_alive("reading maps")
        return [v for v in parse_maps(text) if v.name != "[vsyscall]"]  # vsyscall lies above TASK_SIZE

    def smaps(self) -> list[SmapsEntry]:
        try:
            text = self.proc.read_text(f"{self.pid}/smaps")
        except FileNotFoundError:
            raise ProcessGone(self.pid, "reading smaps") from None
        self.check_alive("reading smaps")
        return [e for e in parse_smaps(text) if e.vma.name != "[vsyscall]"]

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
