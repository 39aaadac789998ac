"""Launch throwaway QEMU guests for tests and the demo.

A launched VM lives in a directory holding ``vm.json`` (pid, sockets, RAM file, agent, kernel), the QMP,
gdbstub and agent sockets, the serial console log and QEMU's own log. Guest RAM is a shared
``memory-backend-file`` under /dev/shm, so vmsight can map it. QEMU runs in its own process group and,
unless detached, dies with the launching process (PR_SET_PDEATHSIG) and with the context manager."""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmsight.errors import TargetError, VmsightError
from vmsight.qemu.accel import choose_accel
from vmsight.qemu.agent import GuestAgent
from vmsight.qemu.initramfs import build_initramfs, with_extra_files
from vmsight.qemu.kernels import kernel_path

log = logging.getLogger(__name__)

QEMU = os.environ.get("VMSIGHT_QEMU", "qemu-system-x86_64")
_PR_SET_PDEATHSIG = 1
_SOCK_MAX = 100  # sun_path is 108 bytes
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise VmsightError(f"bad memory size {text!r}: use e.g. 256M or 1G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


@dataclass
class LaunchConfig:
    kernel: str = "debian-6.12"      # debian-6.1 | debian-6.12 | path to a bzImage
    initrd: str | None = None        # default: the agent's busybox initramfs
    memory: str = "256M"
    smp: int = 1
    append: str = ""                 # extra kernel command line
    accel: str = "auto"              # auto | kvm | tcg
    host_root: bool = False          # share the host's / read-only over 9p (tag "host")
    gdb: bool = True                 # -gdb socket (run control); without it one can be added at runtime
    ram_backend: str = "file"        # file (shared /dev/shm file) | memfd (shared memfd) | anonymous (QEMU default)
    guest_files: dict[str, str] = field(default_factory=dict)  # guest path -> host file, added to the initramfs
    cpu: str | None = None           # -cpu; default: host under KVM, an x86-64-v2 qemu64 under TCG
    defaults: bool = False           # keep QEMU's default devices (VGA with its vga.vram, NIC, IDE): no -nodefaults
    extra_args: list[str] = field(default_factory=list)
    boot_timeout: float = 180.0


# Two spare QMP monitors (QEMU serves one client per monitor): `ps`, `regs`, `maps` work beside a `trace`.
QMP_AUX = ("qmp-1", "qmp-2")


@dataclass
class VmInstance:
    """A launched VM, as recorded in ``DIR/vm.json``."""

    dir: str
    pid: int
    qmp: str
    gdb: str | None
    agent_socket: str
    ram_file: str | None
    ram_size: int
    console_log: str
    kernel: str
    accel: str
    config: dict[str, Any]
    # spare QMP monitors: read-only commands attach to a free one while another command holds the first
    qmp_aux: list[str] = field(default_factory=list)
    _agent: GuestAgent | None = field(default=None, repr=False, compare=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def agent(self) -> GuestAgent:
        if self._agent is None:
            self._agent = GuestAgent(self.agent_socket)
        return self._agent

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return _is_qemu(self.pid)

    def to_json(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if not f.startswith("_")}
        d["format_version"] = 1
        return d

    def stop(self, timeout: float = 5.0) -> None:
        """Kill QEMU (its whole process group) and remove the RAM file. Idempotent."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                raise TargetError(f"cannot stop QEMU pid {self.pid}: {e}; run as its owner or root") from e
        if self._proc is not None:
            self._proc.wait(timeout)
        else:
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        if self.ram_file:
            try:
                os.unlink(self.ram_file)
            except FileNotFoundError:
                pass
        _live.discard(self)

    def __enter__(self) -> VmInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __hash__(self) -> int:
        return hash((self.pid, self.dir))


_live: set[VmInstance] = set()


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_live):
        try:
            vm.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _is_qemu(pid: int) -> bool:
    try:
        return "qemu" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def _die_with_parent() -> None:
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def qemu_command(cfg: LaunchConfig, *, kernel: Path, initrd: Path, accel: str, ram_file: str | None,
                 ram_size: int, socks: dict[str, str], console_log: str) -> list[str]:
    append = "console=ttyS0 panic=-1 " + ("vmsight.hostroot " if cfg.host_root else "") + cfg.append
    cmd = [QEMU, "-name", "vmsight", *([] if cfg.defaults else ["-nodefaults"]), "-display", "none", "-no-reboot",
           "-machine", "pc" if cfg.ram_backend == "anonymous" else "pc,memory-backend=mem", "-accel", accel,
           "-m", str(ram_size >> 20) + "M",
           "-smp", f"{cfg.smp},sockets={cfg.smp},cores=1,threads=1",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", append.strip(),
           "-chardev", f"file,id=con,path={console_log}", "-serial", "chardev:con",
           "-chardev", f"socket,id=agent,path={socks['agent']},server=on,wait=off", "-serial", "chardev:agent",
           *(arg for k in sorted(socks) if k.startswith("qmp")
             for arg in ("-qmp", f"unix:{socks[k]},server=on,wait=off")),
           "-device", "pvpanic"]
    if cfg.ram_backend == "file":
        cmd += ["-object", f"memory-backend-file,id=mem,size={ram_size},mem-path={ram_file},share=on"]
    elif cfg.ram_backend == "memfd":
        cmd += ["-object", f"memory-backend-memfd,id=mem,size={ram_size},share=on"]
    elif cfg.ram_backend != "anonymous":
        raise VmsightError(f"unknown ram_backend {cfg.ram_backend!r}: file, memfd or anonymous")
    # TCG's default qemu64 lacks SSE4.2/POPCNT (x86-64-v2): the host's numpy dies with SIGILL in host_root guests.
    cmd += ["-cpu", cfg.cpu or ("host" if accel == "kvm" else TCG_CPU)]
    if cfg.gdb:
        cmd += ["-gdb", f"unix:{socks['gdb']},server=on,wait=off"]
    if cfg.host_root:
        cmd += ["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"]
    return cmd + list(cfg.extra_args)


def reap_stale_ram_files(shm: str = "/dev/shm", min_age_s: float = 10.0) -> list[str]:
    """Remove our guests' RAM files that no process maps any more. A launcher killed with SIGKILL takes
    its QEMU with it (PR_SET_PDEATHSIG) but cannot remove the file; the next launch does."""
    candidates = [p for p in Path(shm).glob("vmsight-*.ram") if time.time() - p.stat().st_mtime > min_age_s]
    if not candidates:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        if "/vmsight-" in text:
            mapped.update(line.split(None, 5)[-1].removesuffix(" (deleted)") for line in text.splitlines()
                          if "/vmsight-" in line)
    removed = []
    for p in candidates:
        if str(p) not in mapped:
            p.unlink(missing_ok=True)
            removed.append(str(p))
    if removed:
        log.info("removed %d stale guest RAM file(s): %s", len(removed), ", ".join(removed))
    return removed


def launch(cfg: LaunchConfig, directory: str | os.PathLike[str], *, detach: bool = False) -> VmInstance:
    """Start a guest and return once its agent answers. With ``detach`` QEMU outlives this process
    (``vmsight vm launch --detach``); otherwise it dies with it."""
    if shutil.which(QEMU) is None:
        raise VmsightError(f"{QEMU} not found: run scripts/setup.sh (apt-get install qemu-system-x86)")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    old = d / "vm.json"
    if old.exists():
        prev = load(d)
        if prev.alive():
            raise VmsightError(f"{d} already holds a running VM (pid {prev.pid}): `vmsight vm stop --dir {d}` first")
    reap_stale_ram_files()
    kernel = kernel_path(cfg.kernel)
    initrd = Path(cfg.initrd) if cfg.initrd else build_initramfs()
    if cfg.guest_files:
        initrd = with_extra_files(initrd, cfg.guest_files, d / "initrd.img")
    accel = choose_accel(cfg.accel)
    ram_size = parse_size(cfg.memory)
    tag = secrets.token_hex(4)
    sockdir = d if len(str(d)) < _SOCK_MAX - 12 else Path(f"/tmp/vmsight-{tag}")
    sockdir.mkdir(parents=True, exist_ok=True)
    socks = {k: str(sockdir / f"{k}.sock") for k in ("qmp", *QMP_AUX, "gdb", "agent")}
    for s in socks.values():
        Path(s).unlink(missing_ok=True)
    ram_file = f"/dev/shm/vmsight-{tag}.ram" if cfg.ram_backend == "file" else None
    console_log = str(d / "console.log")
    cmd = qemu_command(cfg, kernel=kernel, initrd=initrd, accel=accel, ram_file=ram_file,
                       ram_size=ram_size, socks=socks, console_log=console_log)
    log.info("starting %s", " ".join(cmd))
    qlog = open(d / "qemu.log", "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                            preexec_fn=os.setsid if detach else _die_with_parent)
    qlog.close()
    vm = VmInstance(dir=str(d), pid=proc.pid, qmp=socks["qmp"], qmp_aux=[socks[k] for k in QMP_AUX],
                    gdb=socks["gdb"] if cfg.gdb else None,
                    agent_socket=socks["agent"], ram_file=ram_file, ram_size=ram_size,
                    console_log=console_log, kernel=str(kernel), accel=accel, config=asdict(cfg), _proc=proc)
    _live.add(vm)
    try:
        _wait_booted(vm, proc, cfg.boot_timeout)
    except BaseException:
        vm.stop()
        raise
    (d / "vm.json").write_text(json.dumps(vm.to_json(), indent=2) + "\n")
    if detach:
        _live.discard(vm)
        vm._proc = None
    return vm


def _wait_booted(vm: VmInstance, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(vm.agent_socket):
        if proc.poll() is not None:
            raise TargetError(f"QEMU exited with status {proc.returncode}: {_tail(Path(vm.dir) / 'qemu.log')}")
        if time.monotonic() > deadline:
            raise TargetError("QEMU did not create its sockets")
        time.sleep(0.02)
    agent = vm.agent
    while True:
        if agent.ping(0.5):
            return
        if proc.poll() is not None:
            raise TargetError(f"QEMU exited with status {proc.returncode} during boot; console: "
                              f"{_tail(Path(vm.console_log))}")
        if time.monotonic() > deadline:
            raise TargetError(f"guest did not boot within {timeout:.0f} s; console: {_tail(Path(vm.console_log))}")


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return "(no log)"


def load(directory: str | os.PathLike[str]) -> VmInstance:
    """The VM recorded in ``DIR/vm.json``."""
    p = Path(directory) / "vm.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise VmsightError(f"{directory} holds no vm.json: start one with `vmsight vm launch --dir {directory}`") from None
    data.pop("format_version", None)
    return VmInstance(**data)
