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
