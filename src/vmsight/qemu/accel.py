"""KVM or TCG. ``/dev/kvm`` alone proves nothing (FIELD-NOTES: it exists on hosts without vmx/svm, where
``-accel kvm`` hangs), so KVM is chosen only when the CPU has virtualisation flags *and* the KVM API
answers: ``KVM_GET_API_VERSION`` == 12 and ``KVM_CREATE_VM`` returns a VM fd."""

from __future__ import annotations

import fcntl
import logging
import os

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


def cpu_has_virt() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


def kvm_usable() -> tuple[bool, str]:
    """(usable, why)."""
    if not cpu_has_virt():
        return False, "the CPU has no vmx/svm flag"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open /dev/kvm: {e.strerror}"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False, "unexpected KVM API version"
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
        return True, "KVM_CREATE_VM succeeded"
    except OSError as e:
        return False, f"KVM_CREATE_VM failed: {e.strerror}"
    finally:
        os.close(fd)


def choose_accel(requested: str = "auto") -> str:
    """'kvm' or 'tcg'. ``requested`` may force either; ``VMSIGHT_ACCEL`` overrides 'auto'."""
    requested = os.environ.get("VMSIGHT_ACCEL", requested) if requested == "auto" else requested
    if requested in ("kvm", "tcg"):
        return requested
    ok, why = kvm_usable()
    log.info("accelerator: %s (%s)", "kvm" if ok else "tcg", why)
    return "kvm" if ok else "tcg"
