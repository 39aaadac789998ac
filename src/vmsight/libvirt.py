"""libvirt domains as targets, read-only and without taint (issue 13).

libvirt holds a domain's only QMP monitor, and a command sent behind its back (monitor passthrough) marks the
domain tainted (``custom-monitor``). So nothing here touches the monitor:

* the QEMU process is the one whose command line carries the domain's ``-uuid`` (libvirt's pid file, where
  it can be read, must name the same process);
* the RAM layout is computed from the domain XML (size and machine type), as QEMU's pc and q35 boards lay
  RAM out (below 4 GiB up to the PCI hole, the rest from 4 GiB);
* RAM is the shared memfd or file of ``<memoryBacking>``, mapped read-only (found through QEMU's
  ``/proc/PID/maps`` and its fds), else ``/proc/PID/mem`` at QEMU's anonymous mapping of that size;
* vCPU state: libvirt has no API that reads registers without the monitor, so none is known; the Linux
  layer then finds the kernel by scanning RAM, as for a raw memory image (``vmsight.dump``);
* pause and resume are libvirt's own ``virDomainSuspend``/``virDomainResume``.

The binding (``libvirt-python``, extra ``vmsight[libvirt]``) is imported on first use only."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlparse

from vmsight.errors import PermissionDenied, TargetError
from vmsight.memory.layout import RamLayout, RamRange
from vmsight.memory.physical import MappedRam, PhysicalMemory, ProcMemRam

log = logging.getLogger(__name__)

PREFIX = "libvirt:"
BINDING_HINT = ("the libvirt Python binding is not installed: pip install 'vmsight[libvirt]' (libvirt-python; "
                "needs libvirt-dev to build) or apt install python3-libvirt (scripts/setup.sh --test)")
# What a domain needs in its XML for the fastest, coherent RAM view (printed by `vmsight vm libvirt-xml`).
SHARED_RAM_XML = "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>"
TAINT_HINT = ("needs QEMU's monitor or gdbstub, which libvirt owns: pass --allow-taint to reach them through "
              "libvirt's monitor passthrough (libvirt then reports the domain tainted: custom-monitor), or add a "
              "QMP socket and gdbstub in the domain XML (`vmsight vm libvirt-xml --monitor DIR`) and pass "
              "--vm DIR/qmp.sock; the read-only commands (ps, maps, lsmod, sym, uname) need neither, nor does idle "
              "(whose counts are then lower bounds: no TLB flush)")

_STATES = {0: "no state", 1: "running", 2: "running", 3: "paused", 4: "shutting down", 5: "shut off",
           6: "crashed", 7: "pmsuspended"}
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_PIDFILE_MAX = 64
_XML_MAX = 16 << 20


def default_uri() -> str:
    """virsh's default: $LIBVIRT_DEFAULT_URI, else qemu:///system as root and qemu:///session otherwise."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")


def binding() -> ModuleType:
    """The ``libvirt`` module, with its habit of printing every error to stderr turned off (vmsight reports
    each failure itself, once)."""
    try:
        import libvirt
    except ImportError:
        raise TargetError(BINDING_HINT) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _message(e: Exception) -> str:
    get = getattr(e, "get_error_message", None)
    text = get() if get else None
    return " ".join(str(text or e).split())


def connect(uri: str | None = None) -> Any:
    """A libvirt connection (read-write, for suspend/resume; read-only when that is all we may have)."""
    lv = binding()
    uri = uri or default_uri()
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        msg = _message(e)
    low = msg.lower()
    if "permission denied" in low or "authentication" in low or "access denied" in low:
        try:
            conn = lv.openReadOnly(uri)
            log.warning("read-only connection to %s (%s): the domain cannot be paused for consistent reads",
                        uri, msg)
            return conn
        except lv.libvirtError:
            pass
        raise PermissionDenied(f"no permission on {uri}: run as root or a member of the libvirt group, or pass "
                               "-c qemu:///session for your own domains") from None
    if "no such file" in low or "connection refused" in low or "failed to connect" in low:
        raise TargetError(f"libvirtd is not running at {uri} ({msg}): start libvirtd, or pass -c URI "
                          "(env LIBVIRT_DEFAULT_URI)") from None
    raise TargetError(f"cannot connect to libvirt at {uri}: {msg}") from None


def lookup(conn: Any, ref: str) -> Any:
    """A domain by id, UUID or name, as virsh takes them."""
    lv = binding()
    tries: list[tuple[str, Any]] = []
    if ref.isdigit():
        tries.append(("id", lambda: conn.lookupByID(int(ref))))
    if _UUID.fullmatch(ref):
        tries.append(("UUID", lambda: conn.lookupByUUIDString(ref)))
    tries.append(("name", lambda: conn.lookupByName(ref)))
    for _kind, fn in tries:
        try:
            return fn()
        except lv.libvirtError:
            continue
    raise TargetError(f"no libvirt domain {ref!r} at {conn.getURI()} (by id, UUID or name): "
                      f"see `virsh -c {conn.getURI()} list --all`")


# --- the domain XML ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DomainXml:
    """What vmsight needs from a domain's XML."""

    name: str
    uuid: str
    memory_bytes: int
    vcpus: int
    machine: str          # e.g. pc-i440fx-7.2, pc-q35-7.2
    ram_source: str       # anonymous | memfd | file (<memoryBacking><source type=...>)
    ram_shared: bool      # <access mode='shared'/>
    numa_cells: int
    dimms: int
    domain_type: str      # qemu (TCG) | kvm


_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def _size(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip().isdigit():
        return 0
    return int((el.text or "").strip()) * _UNITS.get(el.get("unit", "KiB").lower(), 1 << 10)


def parse_domain_xml(text: str) -> DomainXml:
    """Parse ``virDomainGetXMLDesc`` output. Raises TargetError for XML that is not a domain."""
    if len(text) > _XML_MAX:
        raise TargetError(f"domain XML of {len(text)} bytes: not a libvirt domain description")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise TargetError(f"libvirt returned domain XML that does not parse ({e})") from None
    if root.tag != "domain":
        raise TargetError(f"libvirt returned <{root.tag}>, not a <domain>")
    mb = root.find("memoryBacking")
    source = mb.find("source") if mb is not None else None
    access = mb.find("access") if mb is not None else None
    ostype = root.find("os/type")
    vcpu_text = (root.findtext("vcpu") or "").strip()
    return DomainXml(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", "").lower(),
        memory_bytes=_size(root.find("memory")),
        vcpus=int(vcpu_text) if vcpu_text.isdigit() else 0,
        machine=ostype.get("machine", "pc") if ostype is not None else "pc",
        ram_source=(source.get("type", "anonymous") if source is not None else "anonymous"),
        ram_shared=access is not None and access.get("mode") == "shared",
        numa_cells=len(root.findall("cpu/numa/cell")),
        dimms=len(root.findall("devices/memory")),
        domain_type=root.get("type", ""),
    )


def ram_layout(machine: str, ram_bytes: int) -> RamLayout:
    """Guest-physical RAM of a pc (i440fx) or q35 board with ``ram_bytes`` in one block ("pc.ram"):
    RAM below 4 GiB stops at the PCI hole (pc: 3.5 GiB, or 3 GiB when RAM reaches it; q35: 2.75 GiB, or 2 GiB;
    QEMU's gigabyte_align, hw/i386/pc_piix.c and pc_q35.c), the rest continues at 4 GiB. The legacy area
    0xa0000-0xfffff is left out: the VGA window is MMIO with a VGA device, and what 0xc0000-0xfffff shows
    depends on the chipset's PAM registers (the BIOS ROM at reset, RAM once the firmware set them); Linux
    keeps none of its own data there (e820 reserves it)."""
    if ram_bytes <= 0:
        raise TargetError("the domain XML gives no memory size")
    q35 = "q35" in machine
    if q35:
        lowmem = 0x80000000 if ram_bytes >= 0xB0000000 else 0xB0000000
    else:
        lowmem = 0xC0000000 if ram_bytes >= 0xE0000000 else 0xE0000000
    below = min(ram_bytes, lowmem)
    ranges = [RamRange(0, min(below, 0xA0000), 0, "pc.ram")]
    if below > 0x100000:
        ranges.append(RamRange(0x100000, below - 0x100000, 0x100000, "pc.ram"))
    if ram_bytes > below:
        ranges.append(RamRange(1 << 32, ram_bytes - below, below, "pc.ram"))
    return RamLayout(ranges)


# --- the QEMU process ---------------------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def _has_uuid(argv: list[str], uuid: str) -> bool:
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return False
    return any(a == "-uuid" and i + 1 < len(argv) and argv[i + 1].lower() == uuid for i, a in enumerate(argv))


def pidfile_candidates(uri: str, name: str) -> list[str]:
    """Where the libvirt daemon behind ``uri`` writes a running domain's QEMU pid."""
    u = urlparse(uri)
    out = []
    sock = parse_qs(u.query).get("socket")
    if sock:  # a daemon's socket sits in its run directory (<run>/libvirt-sock, <run>/qemu/NAME.pid)
        out.append(os.path.join(os.path.dirname(sock[0]), "qemu", f"{name}.pid"))
    if u.path == "/system":
        out.append(f"/run/libvirt/qemu/{name}.pid")
    elif u.path == "/session":
        rt = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        out.append(f"{rt}/libvirt/qemu/run/{name}.pid")
    return out


def _read_pidfile(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, _PIDFILE_MAX).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def _ns_pids(pid: int) -> list[int]:
    """``pid`` as seen in each nested pid namespace (/proc/PID/status NSpid, outermost first)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:] if x.isdigit()]
    except OSError:
        pass
    return [pid]


def find_qemu_pid(uuid: str, pidfiles: list[str]) -> int:
    """The QEMU process running domain ``uuid``: its command line must carry ``-uuid UUID``. libvirt's pid
    file is tried first; otherwise /proc is searched (a pid file, where readable, must agree)."""
    recorded = [p for p in (_read_pidfile(f) for f in pidfiles) if p is not None]
    for pid in recorded:
        if _has_uuid(_cmdline(pid), uuid):
            return pid
    hits = [int(d) for d in os.listdir("/proc") if d.isdigit() and _has_uuid(_cmdline(int(d)), uuid)]
    if len(hits) == 1:
        # A libvirtd in a container (its own pid namespace) records QEMU's pid as seen there: NSpid says so.
        if recorded and not set(recorded) & set(_ns_pids(hits[0])):
            log.warning("libvirt's pid file names pid %s, but the QEMU with -uuid %s is pid %s", recorded, uuid,
                        hits[0])
        return hits[0]
    if not hits:
        raise TargetError(f"no QEMU process with -uuid {uuid} is visible here: the domain runs on another host "
                          "or in another pid namespace; run vmsight on the domain's host, as root")
    raise TargetError(f"{len(hits)} QEMU processes carry -uuid {uuid} (pids {hits}): refusing to guess")


# --- guest RAM ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    perms: str
    dev: str
    inode: int
    path: str


def _maps(pid: int) -> list[_Mapping]:
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) < 5:
                    continue
                lo, _, hi = fields[0].partition("-")
                out.append(_Mapping(int(lo, 16), int(hi, 16), fields[1], fields[3], int(fields[4]),
                                    fields[5].strip() if len(fields) > 5 else ""))
    except PermissionError:
        raise PermissionDenied(f"cannot read /proc/{pid}/maps: run as root (or as QEMU's user)") from None
    except OSError as e:
        raise TargetError(f"cannot read QEMU pid {pid}'s mappings: {e.strerror}") from None
    return out


def _fd_of(pid: int, m: _Mapping) -> str | None:
    """/proc/PID/fd/N of the file QEMU maps at ``m`` (a memfd has no other name), matched by device and inode."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        p = f"/proc/{pid}/fd/{fd}"
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_ino == m.inode and f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}" == m.dev:
            return p
    return None


def open_ram(pid: int, layout: RamLayout, block_bytes: int, xml: DomainXml, *, writable: bool = False) -> PhysicalMemory:
    """The fastest read path into the domain's RAM: its shared memfd/file mapped (``mapped-ram-file``), else
    ``/proc/PID/mem`` at QEMU's anonymous mapping of the block's size (``proc-pid-mem``)."""
    maps = _maps(pid)
    shared = [m for m in maps if m.perms[3:4] == "s" and m.end - m.start == block_bytes and m.inode]
    if len(shared) == 1:
        m = shared[0]
        path = _fd_of(pid, m) or (m.path if m.path.startswith("/") and not m.path.endswith("(deleted)") else None)
        if path is not None:
            def same_file(st: os.stat_result) -> None:
                if st.st_ino != m.inode:  # the fd was reused between listing and opening
                    raise TargetError(f"{path} is no longer QEMU pid {pid}'s guest RAM")
            return MappedRam(path, layout, writable=writable, verify=same_file)
        log.warning("QEMU pid %s maps its RAM shared but the file is not reachable: reading /proc/%s/mem", pid, pid)
    elif xml.ram_shared and xml.ram_source in ("memfd", "file"):
        log.warning("the domain XML asks for shared %s RAM, but QEMU pid %s maps %d shared %d MiB blocks: "
                    "reading /proc/%s/mem", xml.ram_source, pid, len(shared), block_bytes >> 20, pid)
    anon = [m for m in maps if m.perms.startswith("rw") and m.inode == 0 and not m.path
            and m.end - m.start == block_bytes]
    if len(anon) != 1:
        raise TargetError(f"cannot tell which of QEMU pid {pid}'s mappings is the guest's {block_bytes >> 20} MiB "
                          f"of RAM ({len(anon)} candidates): give the domain shared memfd RAM "
                          "(`vmsight vm libvirt-xml`)")
    base = anon[0].start
    return ProcMemRam(pid, layout, {r.gpa: base + r.offset for r in layout}, writable=writable)


def ram_path_summary(xml: DomainXml) -> str:
    """How vmsight would read this domain's RAM (for `vmsight vms`)."""
    if xml.numa_cells > 1 or xml.dimms:
        return "unsupported (several RAM blocks: NUMA cells or DIMMs)"
    if xml.ram_shared and xml.ram_source in ("memfd", "file"):
        return f"mapped-ram-file (shared {xml.ram_source})"
    return "proc-pid-mem (root)"


# --- an attached domain ---------------------------------------------------------------------------------

class Domain:
    """A running libvirt domain, reached without its monitor: the QEMU pid, the RAM layout and RAM."""

    def __init__(self, ref: str, uri: str | None = None, *, writable: bool = False) -> None:
        """``writable``: map a shared RAM file for writing too (explicit writes, idle tracking's accessed-bit
        clearing); reading never needs it."""
        self.uri = uri or default_uri()
        self.conn = connect(self.uri)
        try:
            self.dom = lookup(self.conn, ref)
            lv = binding()
            try:
                self.xml = parse_domain_xml(self.dom.XMLDesc(0))
                state = self.state()
            except lv.libvirtError as e:
                raise TargetError(f"libvirt domain {ref}: {_message(e)}") from None
            if state != "running" and state != "paused":
                raise TargetError(f"libvirt domain {self.xml.name} is {state}: start it first "
                                  f"(virsh -c {self.uri} start {self.xml.name})")
            if self.xml.numa_cells > 1 or self.xml.dimms:
                raise TargetError(f"libvirt domain {self.xml.name} has its RAM in several blocks (NUMA cells or "
                                  "DIMMs): vmsight reads single-block domains only")
            self.pid = find_qemu_pid(self.xml.uuid, pidfile_candidates(self.uri, self.xml.name))
            self.layout = ram_layout(self.xml.machine, self.xml.memory_bytes)
            self.phys = open_ram(self.pid, self.layout, self.xml.memory_bytes, self.xml, writable=writable)
        except BaseException:
            self.conn.close()
            raise
        log.info("libvirt domain %s (%s): QEMU pid %d, %d MiB, backend %s", self.xml.name, self.xml.uuid, self.pid,
                 self.xml.memory_bytes >> 20, self.phys.name)

    def state(self) -> str:
        return _STATES.get(int(self.dom.state()[0]), "unknown")

    def suspend(self) -> None:
        self._call(self.dom.suspend, "pause")

    def resume(self) -> None:
        self._call(self.dom.resume, "resume")

    def _call(self, fn: Any, what: str) -> None:
        lv = binding()
        try:
            fn()
        except lv.libvirtError as e:
            raise TargetError(f"libvirt cannot {what} domain {self.xml.name}: {_message(e)}") from None

    def close(self) -> None:
        close = getattr(self.phys, "close", None)
        if close:
            close()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - a connection already gone
            pass
        # the binding's __del__ fails if it runs at interpreter exit, after its module is torn down
        self.dom = self.conn = None


class MonitorPassthrough:
    """QMP through libvirt's monitor passthrough (``virDomainQemuMonitorCommand``), for ``--allow-taint``: the
    run-control half of vmsight (gdbstub, registers) on a domain whose only monitor libvirt holds. libvirt marks
    the domain tainted (custom-monitor) at the first command; that is said once, as a warning. QMP events go
    to libvirt, not here: :meth:`pull_event` has none."""

    # No QMP socket of our own: the watchdog of a killed tracer resumes the VM through the gdbstub instead
    # (vmsight.events.watchdog, as for a QEMU on another host).
    remote = True

    def __init__(self, domain: Domain) -> None:
        self._domain = domain
        self.path = f"{PREFIX}{domain.xml.name}"
        self._warned = False

    def execute(self, name: str, **arguments: Any) -> Any:
        import libvirt_qemu

        from vmsight.errors import QmpError

        lv = binding()
        if not self._warned:
            self._warned = True
            log.warning("libvirt now reports domain %s as tainted (custom-monitor): --allow-taint sends QMP "
                        "commands through libvirt's monitor passthrough (for the gdbstub and registers)",
                        self._domain.xml.name)
        request = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})})
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(self._domain.dom, request, 0))
        except lv.libvirtError as e:
            raise QmpError(f"QMP {name} through libvirt failed: {_message(e)}") from None
        except ValueError:
            raise QmpError(f"QMP {name} through libvirt: the reply is not JSON") from None
        if not isinstance(reply, dict) or "error" in reply:
            err = reply.get("error") if isinstance(reply, dict) else None
            raise QmpError(f"QMP {name} failed: {err.get('desc') if isinstance(err, dict) else reply}")
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def pull_event(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        if timeout:
            time.sleep(min(timeout, 0.05))  # no events here; callers poll status() as well
        return None

    def close(self) -> None:
        """Nothing to close: the connection is the domain's."""


def list_domains(uri: str | None = None) -> list[dict[str, Any]]:
    """Every domain the connection sees: name, id, UUID, state, vCPUs, memory and how RAM would be read."""
    uri = uri or default_uri()
    conn = connect(uri)
    lv = binding()
    try:
        out = []
        for dom in conn.listAllDomains(0):
            try:
                xml = parse_domain_xml(dom.XMLDesc(0))
                state = _STATES.get(int(dom.state()[0]), "unknown")
            except (lv.libvirtError, TargetError) as e:
                log.info("skipping a domain: %s", e)
                continue
            out.append({"target": f"{PREFIX}{xml.name}", "name": xml.name, "id": dom.ID() if dom.ID() > 0 else None,
                        "uuid": xml.uuid, "state": state, "vcpus": xml.vcpus, "memory_bytes": xml.memory_bytes,
                        "ram": ram_path_summary(xml), "uri": uri})
        return out
    finally:
        conn.close()


def introspection_xml(*, monitor_dir: str | None = None) -> str:
    """Domain XML fragments that make a domain fully introspectable by vmsight."""
    parts = ["<!-- inside <domain>: guest RAM as a shared memfd, mapped by vmsight (fast, coherent, no taint) -->",
             SHARED_RAM_XML]
    if monitor_dir:
        d = monitor_dir.rstrip("/")
        parts += [
            "",
            "<!-- optional, for run control (trace, watch, regs): a QMP socket and a gdbstub of vmsight's own.",
            "     libvirt marks the domain tainted (custom-argv) when it starts with these. The root element",
            "     must declare xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'. -->",
            "<qemu:commandline>",
            "  <qemu:arg value='-qmp'/>",
            f"  <qemu:arg value='unix:{d}/qmp.sock,server=on,wait=off'/>",
            "  <qemu:arg value='-gdb'/>",
            f"  <qemu:arg value='unix:{d}/gdb.sock,server=on,wait=off'/>",
            "</qemu:commandline>",
        ]
    return "\n".join(parts) + "\n"


__all__ = ["BINDING_HINT", "Domain", "DomainXml", "MonitorPassthrough", "PREFIX", "connect", "default_uri", "find_qemu_pid",
           "introspection_xml", "list_domains", "lookup", "open_ram", "parse_domain_xml", "ram_layout"]
