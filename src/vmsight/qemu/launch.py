"""Launch throwaway QEMU guests for tests and the demo.

A launched VM lives in a directory holding ``vm.json`` (pid, sockets, RAM file, agent, kernel), the QMP,
gdbstub and agent sockets, the serial console log and QEMU's own log. Guest RAM is a shared
``memory-backend-file`` in a private per-VM directory under /dev/shm (mkdtemp, 0700; the file pre-created
0600, so no other user can read guest memory), so vmsight can map it; the directory goes on every exit
path (stop, exceptions, the CLI's SIGTERM/SIGHUP/SIGINT, ``vm stop``; after SIGKILL the next launch reaps
it). QEMU runs in its own process group and, unless detached, dies with the launching process
(PR_SET_PDEATHSIG) and with the context manager."""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vmsight import runtime
from vmsight.errors import GuestAgentError, TargetError, VmsightError
from vmsight.qemu.accel import choose_accel
from vmsight.qemu.agent import GuestAgent
from vmsight.qemu.initramfs import build_initramfs, with_extra_files
from vmsight.qemu.kernels import kernel_path

log = logging.getLogger(__name__)

QEMU = os.environ.get("VMSIGHT_QEMU", "qemu-system-x86_64")
_PR_SET_PDEATHSIG = 1
_SOCK_MAX = 100  # sun_path is 108 bytes
_VM_JSON_MAX = 1 << 20
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
    # host_root guests: host directories also shared at their own path (tags hostdir0...), seen even where the
    # guest's own /run or /dev would hide them (a checkout under /run/user/...)
    host_dirs: list[str] = field(default_factory=list)
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
    runtime_dir: str | None = None  # private per-VM dir (RAM file, long-path sockets): removed by stop()
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
                if os.getpgid(self.pid) == self.pid:  # QEMU leads its own group (setsid)
                    os.killpg(self.pid, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
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
        if self.runtime_dir:
            remove_runtime_dir(self.runtime_dir, owners=_uid_owners(self.pid))
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
        for i, hd in enumerate(cfg.host_dirs):
            path = hd.replace(",", ",,")  # QEMU's option syntax escapes a comma by doubling it
            cmd += ["-virtfs", f"local,path={path},mount_tag=hostdir{i},security_model=none,readonly=on,"
                    "multidevs=remap"]
    return cmd + list(cfg.extra_args)


RAM_FILE = "ram"
_VM_DIR_REF = "vm-dir"  # the VM directory this runtime dir belongs to (`vm stop` checks it)
RUNTIME_NAMES = (RAM_FILE, _VM_DIR_REF, *(f"{k}.sock" for k in ("qmp", *QMP_AUX, "gdb", "agent")))


def _uid_owners(pid: int) -> tuple[int, ...]:
    uid = runtime.proc_uid(pid)
    return () if uid is None else (uid,)


def new_runtime_dir(vm_dir: Path, shm: str = "/dev/shm") -> str:
    """A private directory for one VM (mkdtemp: 0700, unpredictable, never a planted one), on tmpfs."""
    rt = runtime.private_tempdir("vmsight-", shm if os.path.isdir(shm) else None)
    fd = os.open(os.path.join(rt, _VM_DIR_REF), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(vm_dir))
    return rt


def create_ram_file(rt: str) -> str:
    """The guest RAM file, created 0600 before QEMU starts (QEMU would create it with the umask, 0644)."""
    path = os.path.join(rt, RAM_FILE)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return path


def runtime_dir_vm(rt: str) -> str | None:
    """The VM directory recorded in the runtime dir ``rt``, or None."""
    try:
        fd = os.open(os.path.join(rt, _VM_DIR_REF), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        return f.read(4096)


def remove_runtime_dir(rt: str, owners: tuple[int, ...] = ()) -> bool:
    """Remove a VM's private runtime dir: only the names vmsight puts there, only if it is still private."""
    return runtime.remove_private_dir(rt, RUNTIME_NAMES, owners=owners)


def _mapped_files() -> set[str]:
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        if "/vmsight-" in text:
            mapped.update(line.split(None, 5)[-1].removesuffix(" (deleted)") for line in text.splitlines()
                          if "/vmsight-" in line)
    return mapped


def reap_stale_ram_files(shm: str = "/dev/shm", min_age_s: float = 10.0) -> list[str]:
    """Remove our guests' RAM files (with their private directories) that no process maps any more. A
    launcher killed with SIGKILL takes its QEMU with it (PR_SET_PDEATHSIG) but cannot remove the file; the
    next launch does. Only this user's own private directories are touched."""
    now = time.time()
    candidates = []
    for p in Path(shm).glob("vmsight-*"):
        try:
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                (p / _VM_DIR_REF).lstat()  # made by new_runtime_dir, not some other program's directory
            ram = (p / RAM_FILE).lstat() if stat.S_ISDIR(st.st_mode) else st
        except OSError:
            continue
        if st.st_uid == os.geteuid() and stat.S_ISREG(ram.st_mode) and now - ram.st_mtime > min_age_s:
            candidates.append(p)
    if not candidates:
        return []
    mapped = _mapped_files()
    removed = []
    for p in candidates:
        ram_path = str(p / RAM_FILE) if p.is_dir() else str(p)
        if ram_path in mapped:
            continue
        if p.is_dir():
            if remove_runtime_dir(str(p)):
                removed.append(ram_path)
        elif p.name.endswith(".ram"):  # the world-readable /dev/shm/vmsight-*.ram of older vmsight
            p.unlink(missing_ok=True)
            removed.append(ram_path)
    if removed:
        log.info("removed %d stale guest RAM file(s): %s", len(removed), ", ".join(removed))
    return removed


def launch(cfg: LaunchConfig, directory: str | os.PathLike[str], *, detach: bool = False) -> VmInstance:
    """Start a guest and return once its agent answers. With ``detach`` QEMU outlives this process
    (``vmsight vm launch --detach``); otherwise it dies with it. If QEMU or the guest fails to start, the
    error says why in QEMU's own words (qemu.log) and nothing is left: no process, socket, log, RAM, or
    directory that this call created."""
    if shutil.which(QEMU) is None:
        raise VmsightError(f"{QEMU} not found: run scripts/setup.sh (apt-get install qemu-system-x86)")
    d = Path(directory).resolve()
    created = not d.exists()
    try:
        return _launch(cfg, d, detach=detach)
    except BaseException:
        if created:
            for name in _LAUNCH_FILES:
                (d / name).unlink(missing_ok=True)
            try:
                d.rmdir()  # only if empty: anything else in it is not ours
            except OSError:
                pass
        raise


def _own_dir(d: Path) -> None:
    """``d`` made (0700) or checked: a directory of this user that nobody else can write. QEMU (run by us,
    often root) creates its logs there: in another user's directory a planted link would aim them."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise VmsightError(f"{d} is not a directory (a symlink?): pass a directory of your own as --dir")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise VmsightError(f"{d} belongs to uid {st.st_uid} or others may write to it (mode "
                           f"{stat.S_IMODE(st.st_mode):o}): pass a directory of your own as --dir")


def _private_log(path: Path) -> int:
    """A fresh 0600 log file at ``path`` (never through a symlink); its fd, open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _launch(cfg: LaunchConfig, d: Path, *, detach: bool) -> VmInstance:
    _own_dir(d)
    old = d / "vm.json"
    if old.exists():
        prev = load(d)
        if prev.alive():
            raise VmsightError(f"{d} already holds a running VM (pid {prev.pid}): `vmsight vm stop --dir {d}` first")
    reap_stale_ram_files()
    kernel = kernel_path(cfg.kernel)
    initrd = Path(cfg.initrd) if cfg.initrd else build_initramfs()
    guest_files = dict(cfg.guest_files)
    if cfg.host_dirs:
        cfg = replace(cfg, host_dirs=_resolve_host_dirs(cfg))  # QEMU and the guest get the same resolved paths
        guest_files["/etc/vmsight-hostdirs"] = _write_host_dirs(cfg.host_dirs, d)
    if guest_files:
        initrd = with_extra_files(initrd, guest_files, d / "initrd.img")
    accel = choose_accel(cfg.accel)
    ram_size = parse_size(cfg.memory)
    # One private directory per VM: its RAM file (0600) and, when DIR's path is too long, its sockets.
    rt = new_runtime_dir(d)
    proc: subprocess.Popen[bytes] | None = None
    try:
        sockdir = d if len(str(d)) < _SOCK_MAX - 12 else Path(rt)
        socks = {k: str(sockdir / f"{k}.sock") for k in ("qmp", *QMP_AUX, "gdb", "agent")}
        for s in socks.values():
            Path(s).unlink(missing_ok=True)
        ram_file = create_ram_file(rt) if cfg.ram_backend == "file" else None
        console_log = str(d / "console.log")
        os.close(_private_log(Path(console_log)))   # QEMU appends to it: the guest's console stays private
        cmd = qemu_command(cfg, kernel=kernel, initrd=initrd, accel=accel, ram_file=ram_file,
                           ram_size=ram_size, socks=socks, console_log=console_log)
        log.info("starting %s", " ".join(cmd))
        qlog = os.fdopen(_private_log(d / "qemu.log"), "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                preexec_fn=os.setsid if detach else _die_with_parent)
        qlog.close()
        vm = VmInstance(dir=str(d), pid=proc.pid, qmp=socks["qmp"], qmp_aux=[socks[k] for k in QMP_AUX],
                        gdb=socks["gdb"] if cfg.gdb else None,
                        agent_socket=socks["agent"], ram_file=ram_file, runtime_dir=rt, ram_size=ram_size,
                        console_log=console_log, kernel=str(kernel), accel=accel, config=asdict(cfg), _proc=proc)
        _live.add(vm)
    except BaseException:  # an exception or a signal (the CLI's SystemExit) before stop() can clean up
        if proc is not None:
            proc.kill()
            proc.wait()
        remove_runtime_dir(rt)
        raise
    try:
        _wait_booted(vm, proc, cfg.boot_timeout)
    except BaseException:
        vm.stop()
        _forget_failed_launch(vm)
        raise
    (d / "vm.json").write_text(json.dumps(vm.to_json(), indent=2) + "\n")
    if detach:
        _live.discard(vm)
        vm._proc = None
    return vm


def _resolve_host_dirs(cfg: LaunchConfig) -> list[str]:
    if not cfg.host_root:
        raise VmsightError("host_dirs needs host_root=True (the directories are mounted inside the host root)")
    dirs = []
    for hd in cfg.host_dirs:
        p = os.path.realpath(hd)
        if "\n" in p or not os.path.isdir(p):
            raise VmsightError(f"host directory {hd!r} is not an existing directory (without newlines): pass "
                               "a directory to share with the guest")
        dirs.append(p)
    return dirs


def _write_host_dirs(dirs: list[str], d: Path) -> str:
    """The guest's list of ``host_dirs`` mount points, one per line (guest_init.sh reads it)."""
    out = d / "hostdirs"
    out.unlink(missing_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(p + "\n" for p in dirs))
    return str(out)


# What a launch writes into the VM directory besides sockets (removed again when the launch fails).
_LAUNCH_FILES = ("console.log", "qemu.log", "initrd.img", "hostdirs")


def _forget_failed_launch(vm: VmInstance) -> None:
    """Remove the sockets and files of a launch whose QEMU is dead (the error message carries the logs)."""
    for s in (vm.qmp, vm.gdb, vm.agent_socket, *getattr(vm, "qmp_aux", ())):
        if s:
            Path(s).unlink(missing_ok=True)
    for name in _LAUNCH_FILES:
        (Path(vm.dir) / name).unlink(missing_ok=True)


def _wait_booted(vm: VmInstance, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout

    def exited() -> TargetError:
        qemu, console = log_tail(Path(vm.dir) / "qemu.log"), log_tail(Path(vm.console_log))
        return TargetError(f"QEMU exited with status {proc.returncode} during start-up" + (f": {qemu}" if qemu else "")
                           + (f"; console: {console}" if console else ""))

    while not os.path.exists(vm.agent_socket):
        if proc.poll() is not None:
            raise exited()
        if time.monotonic() > deadline:
            raise TargetError("QEMU did not create its sockets")
        time.sleep(0.02)
    while True:
        try:
            if vm._agent is None:  # noqa: SLF001 - a short connect timeout: QEMU may be exiting
                vm._agent = GuestAgent(vm.agent_socket, connect_timeout=0.5)  # noqa: SLF001
            if vm._agent.ping(0.5):  # noqa: SLF001
                return
        except (GuestAgentError, OSError) as e:
            # QEMU closes (or never serves) the agent socket when it exits: report why QEMU exited, in its own
            # words, rather than how the socket failed ("connection reset").
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise TargetError(f"the guest agent fails ({e}); console: "
                                      f"{log_tail(Path(vm.console_log))}") from None
                if vm._agent is not None:  # noqa: SLF001
                    vm._agent.close()  # noqa: SLF001
                    vm._agent = None  # noqa: SLF001
                time.sleep(0.2)
                continue
            raise exited() from None
        if proc.poll() is not None:
            raise exited()
        if time.monotonic() > deadline:
            raise TargetError(f"guest did not boot within {timeout:.0f} s; console: {log_tail(Path(vm.console_log))}")


def log_tail(path: Path, lines: int = 3, limit: int = 400) -> str:
    """The last ``lines`` non-blank lines of a log (QEMU's errors, a console), joined by " | " into one line
    of at most ``limit`` characters; "" when there are none. Control characters are left to the caller's
    escaping (the CLI escapes every message)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:])
    return tail if len(tail) <= limit else "..." + tail[-limit:]


def stopped_message(directory: str | os.PathLike[str], info: dict[str, Any]) -> str | None:
    """One line saying that the VM recorded in ``directory`` (its vm.json ``info``) is stopped: its QEMU is
    gone, a zombie, or the pid now runs something else (its command line lacks the VM's QMP socket). None
    when it runs, or when that cannot be told (no pid recorded, /proc hidden)."""
    pid, qmp = info.get("pid"), info.get("qmp")
    if type(pid) is not int or pid <= 0 or not isinstance(qmp, str):
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        running = state not in ("Z", "X") and f"unix:{qmp},".encode() in cmdline
    except (FileNotFoundError, ProcessLookupError, IndexError):
        running = False
    except OSError:
        return None
    if running:
        return None
    said = log_tail(Path(directory) / "qemu.log", lines=1, limit=200)
    return (f"the VM in {directory} is stopped: its QEMU (pid {pid}) has exited" + (f" ({said})" if said else "")
            + f"; `vmsight vm launch --dir {directory}` starts a new one")


def load(directory: str | os.PathLike[str]) -> VmInstance:
    """The VM recorded in ``DIR/vm.json``."""
    p = Path(directory) / "vm.json"
    try:
        with p.open("rb") as f:
            raw = f.read(_VM_JSON_MAX + 1)  # launch writes ~1 KiB: a huge file is not one
        data = json.loads(raw)
    except FileNotFoundError:
        raise VmsightError(f"{directory} holds no vm.json: start one with `vmsight vm launch --dir {directory}`") from None
    except PermissionError:
        raise VmsightError(f"cannot read {p}: run as root or as the user that launched the VM") from None
    except (OSError, ValueError) as e:
        raise TargetError(f"{p} is not a vm.json of `vmsight vm launch` ({str(e)[:100]}): relaunch the VM") from None
    fields = {f.name for f in dataclasses.fields(VmInstance) if not f.name.startswith("_")}
    if not (isinstance(data, dict) and len(raw) <= _VM_JSON_MAX and set(data) - {"format_version"} == fields
            and all(isinstance(data[k], str) for k in ("dir", "qmp", "agent_socket", "console_log", "kernel"))
            and all(isinstance(data[k], int) and not isinstance(data[k], bool) for k in ("pid", "ram_size"))
            and all(isinstance(data[k], str | None) for k in ("gdb", "ram_file")) and isinstance(data["config"], dict)):
        raise TargetError(f"{p} lacks the fields `vmsight vm launch` writes, or is damaged: relaunch the VM")
    data.pop("format_version", None)
    return VmInstance(**data)
