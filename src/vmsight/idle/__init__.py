"""Per-process idle page tracking by virtual address.

Public API (backend-neutral result types are in :mod:`vmsight.idle.result`):

* :class:`Tracker`: the protocol every tracker implements (this one; ``vmsight.idle.guest.GuestIdleTracker`` for
  a process inside a VM); reports and the CLI use only it.
* :class:`IdleTracker` ``(pid, backend="auto")`` with ``mark_idle(ranges=None)`` and ``read(ranges=None) ->
  IdleSnapshot``; backends ``page_idle`` (exact, page), ``damon`` (approximate, region), ``clear_refs`` (VMA).
* :class:`IdleSnapshot`: sparse bitmap by vfn in the proposed ``/proc/PID/page_idle`` word layout +
  per-page :class:`PageState` / swap arrays + VMAs + per-VMA :class:`VmaUsage`.
* :mod:`vmsight.idle.stats`: interval statistics, idle ages, the versioned JSON-lines record format.
"""

from vmsight.idle.errors import (
    AccessDenied,
    BackendUnavailable,
    BadRange,
    KernelThread,
    PidReused,
    ProcessGone,
    TrackerBusy,
)
from vmsight.idle.procfs import Vma
from vmsight.idle.protocol import Tracker
from vmsight.idle.result import FORMAT_VERSION, AccessRegion, IdleSegment, IdleSnapshot, PageState, VmaUsage
from vmsight.idle.tracker import BACKENDS, IdleTracker, choose_backend, probe_backends

__all__ = [
    "Tracker", "IdleTracker", "IdleSnapshot", "IdleSegment", "PageState", "Vma", "VmaUsage", "AccessRegion",
    "FORMAT_VERSION", "BACKENDS", "choose_backend", "probe_backends",
    "AccessDenied", "BackendUnavailable", "BadRange", "KernelThread", "PidReused", "ProcessGone", "TrackerBusy",
]
