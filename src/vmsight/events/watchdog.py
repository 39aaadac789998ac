"""SIGKILL insurance: whatever a vmsight process did to a VM is undone if it dies.

A process that dies in the middle of a command can leave three things behind: the VM paused (a QMP
``stop`` whose ``cont`` never came; QEMU also keeps the VM stopped when a gdb client dies without
detaching), breakpoints and watchpoints (the next hit stops the VM for good: nobody answers), and guest
page-table accessed bits cleared by idle tracking (the guest's reclaim then sees the pages as unused).

So :func:`supervise` gives a VM object a small watchdog process (``python -m vmsight.events.watchdog
--qmp PATH``) in its own session (terminal signals and ``timeout`` do not reach it). The parent streams
over the watchdog's stdin what it must undo:

* ``want STATE``: the run state to leave the VM in (the one found at attach; the dispatcher updates it
  when someone else pauses or resumes the VM);
* ``gdb ADDRESS``: the gdbstub this process holds;
* ``+ KIND GVA LEN`` / ``- KIND GVA LEN``: a breakpoint/watchpoint inserted or removed;
* ``ram JSON`` (where guest RAM is: a file and, per range, gpa, size, file offset) and ``accessed PATH`` /
  ``accessed -``: a private journal file of (pte gpa, entry value) pairs whose A bits are being cleared,
  written *before* the bits are cleared, and dropped once they were given back;
* ``libvirt JSON`` (``uri``, ``uuid``): the VM is a libvirt domain, whose run state libvirt sets
  (virDomainSuspend/Resume: no monitor, so no taint);
* ``bye``: everything is as it was found.

End of input without ``bye`` means the parent died. With points or a journal to undo, the watchdog
connects to the gdbstub (free once the dead client's socket is closed; connecting stops the VM, so the
bits are given back on a stopped guest), ORs the accessed bits back (:func:`restore_accessed`, the same
check the tracker uses), removes the points and detaches with ``D;1`` (QEMU drops every gdb point and
resumes) when the VM should run, or just hangs up when it should stay stopped (``D`` would start a paused
or ``-S`` VM). Otherwise it puts the run state right over QMP (``cont`` or ``stop``).

A libvirt domain without a gdbstub (no --allow-taint) has neither: the watchdog suspends it through libvirt
(unless it is already paused), gives the accessed bits back through the RAM file alone, and leaves it in
the run state found at attach (resumed, unless it was paused then)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import weakref
from array import array
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vmsight.vm import VM

log = logging.getLogger(__name__)

CONNECT_DEADLINE_S = 5.0
QMP_DEADLINE_S = 15.0       # QMP serves one client: a command started after the death may hold it a while
_MAX_JOURNAL = 1 << 26      # entries (1 GiB of journal): bounds what a watchdog will read
_KEEP_UNTIL_EXIT: list[WatchdogClient] = []
_BY_VM: weakref.WeakKeyDictionary[VM, WatchdogClient] = weakref.WeakKeyDictionary()


class _GpaIO(Protocol):
    def read_gpa(self, gpa: int, size: int) -> bytes: ...

    def write_gpa(self, gpa: int, data: bytes) -> None: ...


def restore_accessed(mem: _GpaIO, cleared: Mapping[int, int]) -> int:
    """Give back the Accessed bits vmsight took: ``cleared`` maps a leaf entry's gpa to its value before
    the clear. A bit is ORed back only where the entry is present, has A clear and still maps the same frame
    (a remapped entry belongs to someone else now). Returns how many were set. Call with the VM paused
    (the entry is rewritten whole: a D bit set by a running vCPU between read and write would be lost)."""
    from vmsight.memory.paging import PAGE_ACCESSED, PAGE_PRESENT, PTE_ADDR_MASK

    n = 0
    for gpa, old in cleared.items():
        cur = int.from_bytes(mem.read_gpa(gpa, 8), "little")
        if cur & PAGE_PRESENT and not cur & PAGE_ACCESSED and (cur & PTE_ADDR_MASK) == (old & PTE_ADDR_MASK):
            mem.write_gpa(gpa, (cur | PAGE_ACCESSED).to_bytes(8, "little"))
            n += 1
    return n


def ram_description(vm: VM) -> dict[str, Any] | None:
    """Where ``vm``'s RAM lives on the host, for the watchdog: a file and per range (gpa, size, offset[,
    file of that range: RAM in several blocks, one file each]); None for a backend the watchdog cannot write
    (the gdbstub: it would need the stub the dead parent held)."""
    from vmsight.memory.physical import BlockRam, MappedRam, ProcMemRam

    phys = vm.phys
    if isinstance(phys, MappedRam):
        return {"path": phys.path, "ranges": [[r.gpa, r.size, r.offset] for r in vm.layout]}
    if isinstance(phys, BlockRam) and all(isinstance(m, MappedRam) for m in phys.parts.values()):
        files = {b: m.path for b, m in phys.parts.items() if isinstance(m, MappedRam)}
        return {"path": next(iter(files.values())),
                "ranges": [[r.gpa, r.size, r.offset, files[r.block]] for r in vm.layout]}
    if isinstance(phys, ProcMemRam) and vm.pid is not None:
        return {"path": f"/proc/{vm.pid}/mem", "ranges": [[r.gpa, r.size, phys._hva_of(r, r.gpa)] for r in vm.layout]}
    return None


class _FileRam:
    """Guest RAM as a host file at known offsets (the RAM file, or /proc/QEMU/mem at host addresses)."""

    def __init__(self, desc: Mapping[str, Any]) -> None:
        self.fds: dict[str, int] = {}
        self.ranges: list[tuple[int, int, int, int]] = []   # gpa, size, offset, fd
        try:
            for r in desc["ranges"]:
                path = str(r[3]) if len(r) > 3 else str(desc["path"])
                if path not in self.fds:
                    self.fds[path] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self.ranges.append((int(r[0]), int(r[1]), int(r[2]), self.fds[path]))
        except BaseException:
            self.close()
            raise

    def _at(self, gpa: int, size: int) -> tuple[int, int]:
        for g, s, o, fd in self.ranges:
            if g <= gpa and gpa + size <= g + s:
                return fd, o + gpa - g
        raise ValueError(f"gpa {gpa:#x} is outside the RAM the parent described")

    def read_gpa(self, gpa: int, size: int) -> bytes:
        fd, off = self._at(gpa, size)
        return os.pread(fd, size, off)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        fd, off = self._at(gpa, len(data))
        os.pwrite(fd, data, off)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def read_journal(path: str) -> dict[int, int]:
    """(pte gpa -> entry value) pairs from a journal file (native u64 pairs; a torn tail is ignored)."""
    a = array("Q")
    with open(path, "rb") as f:
        data = f.read(_MAX_JOURNAL * 16)
    a.frombytes(data[:len(data) // 16 * 16])
    return dict(zip(a[0::2], a[1::2], strict=True))


class WatchdogClient:
    """The parent's end: a pipe to the watchdog process. Get one with :func:`supervise`."""

    def __init__(self, proc: subprocess.Popen[bytes], want: str) -> None:
        self.proc = proc
        self._pipe: IO[bytes] | None = proc.stdin
        self.points: set[tuple[int, int, int]] = set()
        self.wanted = want
        self._journal: str | None = None
        self._journal_fd = -1

    @classmethod
    def start(cls, *, qmp: str | None = None, gdb: str | None = None, want: str = "running") -> WatchdogClient:
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        logfile = os.environ.get("VMSIGHT_WATCHDOG_LOG")
        err = open(logfile, "ab") if logfile else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        argv = [sys.executable, "-m", "vmsight.events.watchdog"] + (["--qmp", qmp] if qmp else [])
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    close_fds=True, start_new_session=True, env=env)
        finally:
            if logfile and not isinstance(err, int):
                err.close()
        log.debug("watchdog pid %d for %s", proc.pid, qmp or gdb)
        client = cls(proc, want)
        client._send(f"want {want}")
        if gdb:
            client.gdb(gdb)
        return client

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, OSError) as e:
            log.warning("the watchdog is gone (%s): a SIGKILL would leave the VM as this process left it", e)
            self._pipe = None

    def record(self, added: bool, kind: int, gva: int, length: int) -> None:
        """A breakpoint/watchpoint of ``kind`` (Z packet number) was inserted (``added``) or removed."""
        (self.points.add if added else self.points.discard)((kind, gva, length))
        self._send(f"{'+' if added else '-'} {kind} {gva:x} {length:x}")

    def gdb(self, address: str) -> None:
        self._send(f"gdb {address}")

    def vm_dir(self, directory: str) -> None:
        """The VM directory, whose run-control lock says whether another command owns the run state."""
        self._send(f"dir {directory}")

    def want(self, state: str) -> None:
        """The run state to leave the VM in ("running", "paused", ...)."""
        self.wanted = state
        self._send(f"want {state}")

    def ram(self, desc: Mapping[str, Any]) -> None:
        self._send("ram " + json.dumps(desc))

    def libvirt(self, uri: str, uuid: str) -> None:
        """The VM is libvirt domain ``uuid`` at ``uri``: its run state is set through libvirt."""
        self._send("libvirt " + json.dumps({"uri": uri, "uuid": uuid}))

    def accessed(self, cleared: Mapping[int, int] | None) -> None:
        """Journal the entries whose A bits are about to be cleared (call *before* clearing), or, with
        None or nothing, say they were all given back."""
        if not cleared:
            if self._journal is not None:
                self._send("accessed -")
                _unlink(self._journal)
                os.close(self._journal_fd)
                self._journal = None
            return
        if self._journal is None:
            self._journal_fd, self._journal = tempfile.mkstemp(prefix="vmsight-accessed-")  # 0600, O_EXCL
        self._send(f"accessed {self._journal}")  # first: a kill mid-write leaves a prefix, nothing cleared yet
        flat = array("Q")
        for gpa, value in cleared.items():
            flat.append(gpa)
            flat.append(value)
        os.ftruncate(self._journal_fd, 0)
        os.pwrite(self._journal_fd, flat.tobytes(), 0)

    def clean(self) -> bool:
        return not self.points and self._journal is None

    def stop(self, clean: bool) -> None:
        """``clean``: nothing is left to undo and the VM is in the wanted state: the watchdog just exits.
        Otherwise the pipe stays open and the watchdog undoes what is left once this process is gone (and
        the gdb socket free)."""
        if not clean:
            _KEEP_UNTIL_EXIT.append(self)  # a collected pipe would close: EOF while we still hold the stub
            return
        self._send("bye")
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        # Not waited for: it exits once it has read "bye" (subprocess reaps it later).

    def settle(self, vm: VM) -> None:
        """At the VM's close: put the run state right over QMP if an interrupted command left it wrong,
        then let the watchdog go if nothing is left to undo."""
        ok = True
        try:
            if owner := vm.run_control_owner():   # its run state is another command's to keep
                log.debug("run state left to %s", owner)
                self.stop(clean=self.clean())
                return
            status = vm.status()
            if self.wanted == "running" and status in ("paused", "debug"):
                log.warning("the VM was left %s: resuming it (vmsight found it running)", status)
                vm.resume()   # QMP cont, or libvirt's resume for a domain
            elif self.wanted != "running" and status == "running":
                log.warning("the VM was left running: pausing it (vmsight found it %s)", self.wanted)
                vm.pause()
        except Exception as e:  # noqa: BLE001 - an interrupted exchange: the watchdog does it after exit
            log.warning("cannot check the VM's run state (%s): the watchdog will", e)
            ok = False
        self.stop(clean=ok and self.clean())


def supervise(vm: VM) -> WatchdogClient:
    """The watchdog of ``vm`` (started on first call; one per VM object). It is told the run state found
    now, and settles at ``vm.close()``."""
    wd = _BY_VM.get(vm)
    if wd is None:
        domain = getattr(vm, "domain", None)   # a LibvirtVM: libvirt holds its only monitor
        qmp = None if domain is not None or vm.qmp.remote else vm.qmp.path
        wd = WatchdogClient.start(qmp=qmp, want=vm.status())
        _BY_VM[vm] = wd
        if domain is not None:
            wd.libvirt(domain.uri, domain.xml.uuid)
        if vm.directory is not None:
            wd.vm_dir(vm.directory)
        vm.close_hooks.append(lambda: wd.settle(vm))
    return wd


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- the watchdog process ------------------------------------------------------------------------------

class _State:
    def __init__(self) -> None:
        self.bye = False
        self.points: set[tuple[int, int, int]] = set()
        self.gdb: str | None = None
        self.want = "running"
        self.ram: dict[str, Any] | None = None
        self.journal: str | None = None
        self.dir: str | None = None
        self.libvirt: dict[str, str] | None = None


def read_until_eof(stream: IO[bytes]) -> _State:
    """What the parent left to undo, from its stream (malformed lines are skipped)."""
    st = _State()
    for raw in stream:
        parts = raw.decode(errors="replace").split(None, 1)
        if not parts:
            continue
        word, rest = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if word == "bye":
            st.bye = True
            return st
        try:
            if word in "+-":
                k, g, n = rest.split()
                p = (int(k), int(g, 16), int(n, 16))
                (st.points.add if word == "+" else st.points.discard)(p)
            elif word == "gdb" and rest:
                st.gdb = rest
            elif word == "dir" and rest:
                st.dir = rest
            elif word == "want" and rest:
                st.want = rest
            elif word == "ram":
                st.ram = json.loads(rest)
                import vmsight.memory.paging  # noqa: F401 - preloaded for restore_accessed
            elif word == "accessed":
                st.journal = None if rest == "-" else rest
            elif word == "libvirt":
                desc = json.loads(rest)
                st.libvirt = {"uri": str(desc["uri"]), "uuid": str(desc["uuid"])}
                import vmsight.libvirt  # noqa: F401 - preloaded (and the binding with it, below)
                try:
                    import libvirt  # noqa: F401
                except ImportError:
                    pass  # reported when it is needed
        except (ValueError, KeyError, TypeError):
            continue
    return st


class _RawStub:
    """The few packets cleanup needs, without GdbStub's start-up (target description, a wait for the
    pushed stop): after the parent's death every round trip counts. Framing is rsp.RspConnection's."""

    def __init__(self, path: str, timeout: float) -> None:
        from vmsight.qemu.rsp import RspConnection, stub_socket

        self.conn = RspConnection(stub_socket(path, timeout), timeout)

    def request(self, payload: str) -> str:
        """Send a packet, return its reply (stop replies pushed by the connect itself are skipped)."""
        self.conn.send(payload)
        deadline = time.monotonic() + self.conn.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {payload!r}")
            text = self.conn.recv_packet(left)
            if text[:1] in ("T", "S") and not payload.startswith("?"):
                continue  # the T02 that connecting pushes
            return text

    def close(self) -> None:
        self.conn.close()


def cleanup(gdb_address: str, points: set[tuple[int, int, int]], deadline_s: float = CONNECT_DEADLINE_S, *,
            resume: bool = True, ram: Mapping[str, Any] | None = None, journal: str | None = None) -> bool:
    """Connect (which stops the VM), give back the journal's accessed bits, remove ``points`` and, with
    ``resume``, detach (``D;1``: QEMU also drops whatever points it still holds, and resumes); without, hang
    up and leave the VM stopped. True when all of it was done."""
    from vmsight.errors import VmsightError

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            stub = _RawStub(gdb_address, timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            features = stub.request("qSupported:multiprocess+")
            break
        except (VmsightError, OSError, TimeoutError) as e:
            if time.monotonic() > deadline:
                log.error("watchdog: cannot reach the gdbstub at %s: %s", gdb_address, e)
                return False
            time.sleep(0.05)
    ok = True
    try:
        if journal:
            ok = _give_back(ram, journal) and ok
        for kind, gva, length in sorted(points):
            reply = stub.request(f"z{kind},{gva:x},{length:x}")
            if reply != "OK":
                log.warning("watchdog: removing Z%d at %#x: %r", kind, gva, reply)
        if resume:
            reply = stub.request("D;1" if "multiprocess+" in features else "D")
            if reply != "OK":
                log.error("watchdog: detach answered %r", reply)
                return False
        else:
            stub.request("Qqemu.sstep=7")  # QEMU's default: the setting outlives the client
    except (VmsightError, OSError, TimeoutError) as e:   # VmsightError: the stub hung up or broke framing
        log.error("watchdog: cleanup failed: %s", e)
        return False
    finally:
        stub.close()
    log.info("watchdog: removed %d points and %s", len(points), "detached" if resume else "hung up (VM stopped)")
    return ok


def _give_back(ram: Mapping[str, Any] | None, journal: str) -> bool:
    try:
        cleared = read_journal(journal)
        if ram is None:
            log.error("watchdog: %d accessed bits to give back but no writable RAM was described", len(cleared))
            return False
        mem = _FileRam(ram)
        try:
            n = restore_accessed(mem, cleared)
        finally:
            mem.close()
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("watchdog: cannot give the accessed bits back: %s", e)
        return False
    finally:
        _unlink(journal)
    log.info("watchdog: gave back %d of %d accessed bits", n, len(cleared))
    return True


def settle_qmp(qmp_path: str, want: str, deadline_s: float = QMP_DEADLINE_S) -> bool:
    """Put the run state right over QMP: ``cont`` a paused/debug VM that should run, ``stop`` a running VM
    that should not. Retries while another client holds the (single-client) QMP socket."""
    from vmsight.errors import VmsightError
    from vmsight.qemu.qmp import Qmp

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with Qmp(qmp_path, timeout=max(1.0, min(3.0, deadline - time.monotonic()))) as q:
                status = q.status()
                if want == "running" and status in ("paused", "debug"):
                    q.execute("cont")
                    log.info("watchdog: resumed the VM (it was %s)", status)
                elif want != "running" and status == "running":
                    q.execute("stop")
                    log.info("watchdog: paused the VM again (found %s)", want)
                return True
        except (VmsightError, OSError, TimeoutError) as e:
            if time.monotonic() > deadline:
                log.error("watchdog: cannot reach QMP at %s: %s", qmp_path, e)
                return False
            time.sleep(0.1)


def _libvirt_domain(desc: Mapping[str, str]) -> tuple[Any, Any]:
    """(connection, domain) of a libvirt domain by URI and UUID."""
    from vmsight.libvirt import binding, connect

    lv = binding()
    conn = connect(desc["uri"])
    try:
        return conn, conn.lookupByUUIDString(desc["uuid"])
    except lv.libvirtError:
        conn.close()
        raise


def settle_libvirt(desc: Mapping[str, str], want: str, journal: str | None = None,
                   ram: Mapping[str, Any] | None = None) -> bool:
    """A libvirt domain without a gdbstub: with a journal, suspend it (unless paused already) and give the
    accessed bits back through the RAM file; then leave it in the ``want`` run state (libvirt's own
    suspend/resume: no monitor, so no taint)."""
    from vmsight.libvirt import binding

    try:
        lv = binding()
        conn, dom = _libvirt_domain(desc)
    except Exception as e:  # noqa: BLE001 - VmsightError, or libvirtError (its binding is imported lazily)
        log.error("watchdog: cannot reach libvirt domain %s: %s", desc.get("uuid"), e)
        return False
    ok = True
    try:
        state = int(dom.state()[0])
        if journal:
            if state == lv.VIR_DOMAIN_RUNNING:
                dom.suspend()   # the entries are rewritten whole: a vCPU must not change them meanwhile
                state = lv.VIR_DOMAIN_PAUSED
            ok = _give_back(ram, journal)
        if want == "running" and state == lv.VIR_DOMAIN_PAUSED:
            dom.resume()
            log.info("watchdog: resumed libvirt domain %s", dom.name())
        elif want != "running" and state == lv.VIR_DOMAIN_RUNNING:
            dom.suspend()
            log.info("watchdog: paused libvirt domain %s again (found %s)", dom.name(), want)
    except Exception as e:  # noqa: BLE001 - libvirtError
        log.error("watchdog: libvirt domain %s: %s", desc.get("uuid"), e)
        return False
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a connection already gone
            pass
    return ok


def undo(st: _State, qmp_path: str | None) -> bool:
    """Everything a dead parent left (see the module docstring)."""
    if st.points or st.journal:
        if st.gdb and cleanup(st.gdb, st.points, resume=st.want == "running", ram=st.ram, journal=st.journal):
            return True
        if st.journal and os.path.exists(st.journal):
            if st.libvirt is not None:
                return settle_libvirt(st.libvirt, st.want, st.journal, st.ram)
            _give_back(st.ram, st.journal)  # without the stub: the VM may run meanwhile (racy, but better)
    if st.libvirt is not None:
        return settle_libvirt(st.libvirt, st.want)
    if st.dir is not None:
        from vmsight.qemu.monitors import run_control_owner

        try:
            owner = run_control_owner(st.dir)
        except Exception as e:  # noqa: BLE001 - a lock we cannot read: settle as before
            owner = None
            log.debug("watchdog: run-control lock: %s", e)
        if owner:   # the dead parent only read the VM; its run state belongs to the command holding it
            log.info("watchdog: run state left to %s", owner)
            return True
    return settle_qmp(qmp_path, st.want) if qmp_path else False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmsight-watchdog")
    p.add_argument("--qmp", help="the VM's QMP socket (to put its run state right)")
    p.add_argument("gdb_address", nargs="?", help="the gdbstub (also sent as `gdb ADDRESS`)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vmsight-watchdog: %(message)s")
    # Preload what cleanup needs while the parent is alive: after its death every millisecond counts.
    import vmsight.errors  # noqa: F401
    import vmsight.qemu.qmp  # noqa: F401
    import vmsight.qemu.rsp  # noqa: F401

    st = read_until_eof(sys.stdin.buffer)
    st.gdb = st.gdb or args.gdb_address
    if st.bye:
        return 0
    log.info("parent died (%d points, journal %s, want %s): cleaning up", len(st.points), st.journal, st.want)
    return 0 if undo(st, args.qmp) else 1


if __name__ == "__main__":
    sys.exit(main())
