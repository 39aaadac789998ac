"""Private, verified runtime directories and proofs about processes, for everything vmsight keeps on disk.

vmsight usually runs as root on machines with other users, so a path another user can create, swap or
pre-plant is an attack: a directory is used only once it is proven ours (opened with O_NOFOLLOW |
O_DIRECTORY, owner == euid, no access for group/other) and files in it are reached through that
directory's fd (openat), never by re-resolving a path. Per-VM and per-stub directories are made with
mkdtemp (0700, O_EXCL, unpredictable). Imports point down: only :mod:`vmsight.errors`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile

from vmsight.errors import VmsightError

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(VmsightError):
    """A path vmsight would use is not private to it (symlink, another owner, open to others)."""


def open_private_dir(path: str, *, create: bool = True, tighten: bool = True, owners: tuple[int, ...] = (),
                     hint: str = "") -> int:
    """An O_DIRECTORY fd on ``path``, proven private: not a symlink, owned by the euid (or one of
    ``owners``), writable by nobody else. Made 0700 if missing (with ``create``). An own directory that is
    only readable by others (the 0755 ``/run/vmsight`` of older vmsight) is tightened to 0700 when
    ``tighten``; one that others could write into is refused, since they may have planted entries."""
    fix = f" ({hint})" if hint else ""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise UnsafePath(f"{path} does not exist{fix}") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{path} is a symlink or not a directory: remove it, it may have been planted by "
                             f"another user{fix}") from None
        raise UnsafePath(f"cannot open {path}: {e.strerror}{fix}") from None
    try:
        st = os.fstat(fd)
        allowed = (os.geteuid(), *owners)
        if st.st_uid not in allowed:
            raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()}: remove it, it may "
                             f"have been planted by another user{fix}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise UnsafePath(f"{path} is writable by others (mode {mode:04o}): remove it or `chmod 700 {path}`"
                             f"{fix}")
        if mode & 0o077:
            if not tighten:
                raise UnsafePath(f"{path} is open to others (mode {mode:04o}): `chmod 700 {path}`{fix}")
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_private_dir(path: str, owners: tuple[int, ...] = ()) -> bool:
    try:
        os.close(open_private_dir(path, create=False, tighten=False, owners=owners))
    except UnsafePath:
        return False
    return True


def runtime_dir() -> str:
    """This user's private runtime directory (made and verified): /run/vmsight for root, else
    $XDG_RUNTIME_DIR/vmsight when $XDG_RUNTIME_DIR is the user's own 0700 directory, else /tmp/vmsight-<euid>.
    Its ancestors are root's or the user's own, so its path may be handed to QEMU."""
    euid = os.geteuid()
    if euid == 0 and os.access("/run", os.W_OK):
        path = "/run/vmsight"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR", "")
        if os.path.isabs(xdg) and is_private_dir(xdg):
            path = os.path.join(xdg, "vmsight")
        else:
            path = f"/tmp/vmsight-{euid}"
    os.close(open_private_dir(path, hint="or set XDG_RUNTIME_DIR to a private directory of yours"))
    return path


def private_tempdir(prefix: str, base: str | None = None) -> str:
    """A new 0700 directory with an unpredictable name under ``base`` (default: :func:`runtime_dir`).
    mkdtemp's mkdir fails rather than reuse a name someone planted, so the result is ours."""
    path = tempfile.mkdtemp(prefix=prefix, dir=base or runtime_dir())
    os.close(open_private_dir(path, create=False, tighten=False))  # paranoia: prove it
    return path


def remove_private_dir(path: str, names: tuple[str, ...], *, owners: tuple[int, ...] = ()) -> bool:
    """Remove the entries ``names`` (only those: what vmsight created) from the private directory ``path``,
    then the directory if it is empty. A directory that is not private is left alone (False)."""
    try:
        fd = open_private_dir(path, create=False, tighten=False, owners=owners)
    except UnsafePath as e:
        if os.path.lexists(path):
            log.warning("not removing %s: %s", path, e)
            return False
        return True
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError as e:
        log.info("left %s: %s", path, e.strerror)
        return False
    return True


# --- processes ------------------------------------------------------------------------------------------

def proc_uid(pid: int) -> int | None:
    """Real uid of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks (with the pid, names one process across pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def listening_socket_inodes(path: str, pid: int) -> set[int]:
    """Inodes of the listening unix sockets bound at ``path`` in ``pid``'s network namespace."""
    out = set()
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split(None, 7)
                # Flags __SO_ACCEPTCON (0x10000): listening; the bound path is the last field.
                if len(parts) == 8 and int(parts[3], 16) & 0x10000 and parts[7].rstrip("\n") == path:
                    out.add(int(parts[6]))
    except (OSError, ValueError, StopIteration):
        pass
    return out


def listens_on(pid: int, path: str) -> bool:
    """Whether process ``pid`` itself holds the listening unix socket bound at ``path``: proof that a socket
    file is that process's, which a planted socket or a forged record cannot give."""
    inodes = listening_socket_inodes(path, pid)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                return True
    return False


# --- runtime gdbstubs ------------------------------------------------------------------------------------

_STUB_SOCK = "gdb.sock"
_STUB_RECORD = "gdbstub-"  # gdbstub-<qemu pid>-<its start time>: the socket path, in the private runtime dir


def _stub_dir_owners(qemu_pid: int) -> tuple[int, ...]:
    uid = proc_uid(qemu_pid)
    return () if uid is None else (uid,)


def _forget_stub(dfd: int, record: str, sock: str | None, owners: tuple[int, ...]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record, dir_fd=dfd)
    if sock and os.path.basename(sock) == _STUB_SOCK and os.path.basename(os.path.dirname(sock)).startswith(
            "vmsight-gdb-"):
        remove_private_dir(os.path.dirname(sock), (_STUB_SOCK,), owners=owners)


def _read_record(dfd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace").strip() or None
    finally:
        os.close(fd)


def find_runtime_stub(qemu_pid: int) -> str | None:
    """The socket of the runtime gdbstub an earlier attach (of this user) added to QEMU ``qemu_pid``, if QEMU
    itself still listens on it in a private directory; records of QEMUs that are gone are swept."""
    dfd = open_private_dir(runtime_dir())
    try:
        found = None
        for name in os.listdir(dfd):
            if not name.startswith(_STUB_RECORD):
                continue
            try:
                pid, start = (int(x) for x in name[len(_STUB_RECORD):].split("-"))
            except ValueError:
                continue
            alive = proc_start_time(pid) == start
            if alive and pid != qemu_pid:
                continue
            sock = _read_record(dfd, name)
            owners = _stub_dir_owners(pid)
            if (alive and sock and listens_on(pid, sock)
                    and is_private_dir(os.path.dirname(sock), owners=owners)):
                found = sock
            else:
                _forget_stub(dfd, name, sock, owners)
        return found
    finally:
        os.close(dfd)


def new_runtime_stub_path(qemu_pid: int) -> str:
    """A socket path for a runtime gdbstub of QEMU ``qemu_pid`` in a new private directory with an
    unpredictable name that only QEMU's user (and root) can enter."""
    quid = proc_uid(qemu_pid)
    euid = os.geteuid()
    if quid is None:
        raise UnsafePath(f"QEMU pid {qemu_pid} is gone")
    if quid == euid:
        d = private_tempdir("vmsight-gdb-")
    elif euid == 0:
        # Root's runtime dir is 0700: QEMU's user could not reach it. mkdtemp in sticky /tmp cannot be
        # pre-planted or renamed by others; handed to QEMU's user, it is private to them and root.
        d = private_tempdir("vmsight-gdb-", "/tmp")
        os.chown(d, quid, -1)
    else:
        raise UnsafePath(f"QEMU pid {qemu_pid} runs as uid {quid}: attach as that user or root, or pass its "
                         "gdbstub socket (--gdb PATH)")
    return os.path.join(d, _STUB_SOCK)


def record_runtime_stub(qemu_pid: int, sock: str) -> None:
    """Remember ``sock`` as QEMU ``qemu_pid``'s runtime gdbstub (QEMU allows one) for later attaches."""
    start = proc_start_time(qemu_pid)
    if start is None:
        return
    dfd = open_private_dir(runtime_dir())
    try:
        name = f"{_STUB_RECORD}{qemu_pid}-{start}"
        tmp = f".{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.write(fd, sock.encode() + b"\n")
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def forget_runtime_stub(qemu_pid: int, sock: str) -> None:
    """Drop a stub directory made by :func:`new_runtime_stub_path` that QEMU did not take."""
    remove_private_dir(os.path.dirname(sock), (_STUB_SOCK,), owners=_stub_dir_owners(qemu_pid))
