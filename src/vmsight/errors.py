"""Exception hierarchy. Every exception carries the data a caller needs (address, level, entry)
and a message that names the fix; the CLI turns them into one line and a non-zero exit code."""

from __future__ import annotations


class VmsightError(Exception):
    """Base class of every error vmsight raises on purpose."""

    exit_code = 2


# --- target / QEMU -------------------------------------------------------------------------------------

class TargetError(VmsightError):
    """The VM (or its QEMU) cannot be reached or lacks a required option."""


class QmpError(TargetError):
    """A QMP command failed."""


class GdbStubError(TargetError):
    """The gdbstub refused or misbehaved (E-reply, busy, protocol error)."""

    def __init__(self, message: str, reply: str | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class GuestAgentError(VmsightError):
    """The in-guest agent did not answer or the command failed to run."""


class PermissionDenied(VmsightError):
    """The operation needs privileges we do not have."""


# --- memory -------------------------------------------------------------------------------------------

class MemoryAccessError(VmsightError):
    """Base for failed memory accesses."""


class PhysicalAddressError(MemoryAccessError):
    """A guest-physical range is not backed by RAM (MMIO, hole, beyond the end)."""

    def __init__(self, gpa: int, size: int, reason: str = "not guest RAM") -> None:
        super().__init__(f"guest-physical range {gpa:#x}+{size:#x} is {reason}; "
                         "only RAM ranges from the VM's RAM layout can be accessed")
        self.gpa = gpa
        self.size = size


class TranslationFault(MemoryAccessError):
    """A guest-virtual address did not translate: the entry at `level` was not present
    (or was malformed). `level` is 5/4 (PML5/PML4), 3 (PDPT), 2 (PD), 1 (PT)."""

    def __init__(self, gva: int, level: int, entry: int, reason: str = "not present") -> None:
        super().__init__(f"cannot translate gva {gva:#x}: level-{level} entry {entry:#018x} {reason}")
        self.gva = gva
        self.level = level
        self.entry = entry
        self.reason = reason


class PageSwapped(TranslationFault):
    """The PTE holds a Linux swap entry (x86-64 encoding: type and offset inverted in the PTE)."""

    def __init__(self, gva: int, level: int, entry: int, swap_type: int, swap_offset: int) -> None:
        super().__init__(gva, level, entry, f"is swapped out (type {swap_type}, offset {swap_offset:#x})")
        self.swap_type = swap_type
        self.swap_offset = swap_offset


class NonCanonicalAddress(TranslationFault):
    """The gva is not canonical for the paging mode."""

    def __init__(self, gva: int, bits: int) -> None:
        super().__init__(gva, 0, 0, f"is not canonical for {bits}-bit virtual addresses")


# --- Linux --------------------------------------------------------------------------------------------

class LinuxError(VmsightError):
    """Base for guest-kernel understanding errors."""


class NoLinuxKernel(LinuxError):
    """No (validated) Linux kernel was found in guest memory."""


class UnsupportedKernel(LinuxError):
    """The kernel lacks a feature, or uses a layout vmsight does not understand."""

    def __init__(self, feature: str, hint: str = "") -> None:
        super().__init__(f"unsupported kernel: {feature}" + (f" ({hint})" if hint else ""))
        self.feature = feature


class SymbolNotFound(LinuxError):
    def __init__(self, name: str) -> None:
        super().__init__(f"symbol {name!r} not found in the guest's kallsyms")
        self.name = name


class TypeNotFound(LinuxError):
    def __init__(self, name: str) -> None:
        super().__init__(f"type {name!r} not found in the guest's BTF")
        self.name = name


class FieldNotFound(LinuxError):
    def __init__(self, type_name: str, field: str) -> None:
        super().__init__(f"{type_name} has no member {field!r}")
        self.type_name = type_name
        self.field = field


class CorruptData(LinuxError):
    """Guest data failed validation (bad magic, cycle, out-of-bounds offset, walk limit)."""

    def __init__(self, what: str, address: int | None = None) -> None:
        where = f" at {address:#x}" if address is not None else ""
        super().__init__(f"corrupt or inconsistent guest data{where}: {what}")
        self.what = what
        self.address = address


class ProcessNotFound(LinuxError):
    def __init__(self, pid: int) -> None:
        super().__init__(f"no process with pid {pid}")
        self.pid = pid
