"""Idle tracking of a process inside a libvirt domain (issue 13), against the private libvirtd of
test_libvirt.py and a TCG domain with shared memfd RAM.

Without --allow-taint there is no monitor and no gdbstub, so nothing can flush the vCPUs' TLBs after the
accessed bits are cleared: a page touched through a translation cached before the mark sets no A bit and
reads idle. The tracker says so (approximate, a lower-bound warning). What still holds, and is checked:

* no false positives: every page reported accessed is one the workload touched after the mark;
* a lower bound: every touched page whose translation cannot be cached is seen. The workload is pinned to
  vCPU 1 and everything else in user space to vCPU 0; before each round a process run on vCPU 1 (another
  mm: a CR3 write, which empties TCG's TLB) leaves only what the workload touches afterwards cached there.
  The WARM pages are touched then (cached), the COLD pages are not: after the mark, touching COLD makes
  vCPU 1 walk the page tables, which sets their A bits, so COLD <= accessed <= WARM | COLD; the WARM
  pages missed are the blind spot, measured and reported;
* the bits are given back however the tracker ends (close, an exception, SIGTERM, SIGKILL: the watchdog,
  through the RAM file with the domain suspended through libvirt): the page-table entries read through
  the RAM file equal those before, the domain runs and libvirt reports no new taint.

With --allow-taint (a domain of its own: the taint lasts as long as the domain) the mark flushes through
the gdbstub and the same rounds are exact: accessed == WARM | COLD."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import WORKLOAD, need
from tests.guest import test_libvirt as lv
from tests.guest.workload import GuestWorkload
from vmsight.idle.guest import LOWER_BOUND, GuestIdleTracker
from vmsight.idle.result import IdleSnapshot, PageState
from vmsight.memory.paging import PAGE_ACCESSED, walk_range
from vmsight.qemu.initramfs import build_initramfs, build_workload, with_extra_files
from vmsight.qemu.kernels import cached_kernel
from vmsight.vm import VM, attach

pytestmark = pytest.mark.guest

libvirtd = lv.libvirtd   # a private libvirtd of this module's own (module scope)
PAGES = 1024
ROUNDS = 3
MISSED: list[tuple[int, int]] = []   # (warm pages missed, warm pages touched) per round, for the report


def start(libvirtd: lv.Libvirtd, name: str, kernel: str, memfd: bool) -> Iterator[lv.Domain]:
    """test_libvirt.py's transient TCG domain, with the test workload in /bin (a second initramfs archive)."""
    need(cached_kernel(kernel) is not None, f"kernel {kernel} not cached (scripts/setup.sh fetches it)")
    base = build_initramfs()
    initrd = with_extra_files(base, {WORKLOAD: str(build_workload())}, libvirtd.dir / f"{name}.initrd")

    def edit(xml: str) -> str:
        xml = xml.replace(f"<initrd>{base}</initrd>", f"<initrd>{initrd}</initrd>")
        assert str(initrd) in xml
        return xml

    yield from lv.start_domain(libvirtd, name, kernel, memfd, edit)


@pytest.fixture(scope="module")
def domain(libvirtd: lv.Libvirtd) -> Iterator[lv.Domain]:
    yield from start(libvirtd, "vmsight-idle", "debian-6.12", memfd=True)


def pin(dom: lv.Domain, wl: GuestWorkload) -> None:
    """Every user process (the agent too, so whatever it starts) on vCPU 0, the workload on vCPU 1."""
    assert dom.agent.run("nproc").check().text.strip() == "2"
    dom.agent.run("for p in /proc/[0-9]*; do taskset -p 1 ${p#/proc/} >/dev/null 2>&1; done; true").check()
    dom.agent.run(f"taskset -p 2 {wl.pid} >/dev/null").check()
    assert dom.agent.run(f"taskset -p {wl.pid}").check().text.split()[-1] == "2"


def flush_vcpu1(dom: lv.Domain) -> None:
    """A process of its own on vCPU 1: switching to its mm writes CR3 there, which empties TCG's TLB."""
    dom.agent.run("taskset 2 true").check()


class PageTables:
    """The workload mapping's leaf entries, read through the domain's RAM file by a read-only attach of the
    test's own (no pause: the workload sleeps between commands, and its page-table pages stay put)."""

    def __init__(self, vm: VM, dtb: int, wl: GuestWorkload) -> None:
        self.vm, self.dtb, self.wl = vm, dtb, wl

    def entries(self) -> dict[int, int]:
        return {lf.gva: lf.pte_value for lf in walk_range(self.vm.phys, self.dtb, self.wl.addr,
                                                           self.wl.addr + self.wl.size, la57=False)}


@contextlib.contextmanager
def page_tables(libvirtd: lv.Libvirtd, dom: lv.Domain, wl: GuestWorkload) -> Iterator[PageTables]:
    from vmsight import linux

    with attach(f"libvirt:{dom.name}", uri=libvirtd.uri, writable=False) as probe:
        with probe.paused():
            dtb = linux.Guest(probe).process(wl.pid).dtb
        pt = PageTables(probe, dtb, wl)
        before = pt.entries()
        assert len(before) == PAGES and all(v & PAGE_ACCESSED for v in before.values()), "prefaulted, A set"
        yield pt


def accessed_pages(snap: IdleSnapshot, wl: GuestWorkload) -> set[int]:
    first = wl.addr >> 12
    return {int(v) - first for v in snap.pages(PageState.PRESENT | PageState.TRACKED, idle=False)
            if first <= v < first + PAGES}


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def rounds(dom: lv.Domain, wl: GuestWorkload, tr: GuestIdleTracker, pt: PageTables, *, exact: bool) -> None:
    rng = random.Random(13)
    for i in range(ROUNDS):
        chosen = rng.sample(range(PAGES), 300)
        warm, cold = set(chosen[:150]), set(chosen[150:])
        flush_vcpu1(dom)
        wl.touch(sorted(warm))            # now cached in vCPU 1's TLB
        tr.mark_idle([(wl.addr, wl.addr + wl.size)])
        assert not any(v & PAGE_ACCESSED for v in pt.entries().values()), "the mark clears every A bit"
        wl.touch(sorted(warm | cold))
        snap = tr.read()
        got = accessed_pages(snap, wl)
        assert got <= warm | cold, f"round {i}: false positives {sorted(got - warm - cold)[:10]}"
        assert cold <= got, f"round {i}: uncached pages missed {sorted(cold - got)[:10]}"
        idle = snap.pages(PageState.PRESENT | PageState.TRACKED, idle=True)
        assert len(idle) == PAGES - len(got)
        if exact:
            assert got == warm | cold and not snap.approximate and LOWER_BOUND not in snap.warnings
        else:
            MISSED.append((len(warm - got), len(warm)))
            assert snap.approximate and LOWER_BOUND in snap.warnings
            assert len(snap.pages(PageState.APPROXIMATE, idle=True)) == len(idle)  # every idle page is a guess
            assert not len(snap.pages(PageState.APPROXIMATE, idle=False))          # an accessed one is not
        assert all(v & PAGE_ACCESSED for v in pt.entries().values()), "the read gives the A bits back"


def test_lower_bound_without_taint(libvirtd: lv.Libvirtd, domain: lv.Domain) -> None:
    taints = lv.taints(libvirtd, domain.name)
    wl = GuestWorkload(domain, PAGES)
    try:
        pin(domain, wl)
        with page_tables(libvirtd, domain, wl) as pt:
            before = pt.entries()
            with attach(f"libvirt:{domain.name}", uri=libvirtd.uri) as vm:
                assert vm.backend == "mapped-ram-file" and not vm.can_flush_tlb
                with GuestIdleTracker(vm, wl.pid) as tr:
                    assert tr.approximate and "lower bounds" in tr.reason
                    rounds(domain, wl, tr, pt, exact=False)
                    tr.mark_idle([(wl.addr, wl.addr + wl.size)])   # given back by close()
                assert pt.entries() == before
                with pytest.raises(RuntimeError), GuestIdleTracker(vm, wl.pid) as tr:
                    tr.mark_idle([(wl.addr, wl.addr + wl.size)])
                    raise RuntimeError("a failure while marked")
                assert pt.entries() == before
            assert pt.entries() == before
        missed, warm = sum(m for m, _ in MISSED), sum(w for _, w in MISSED)
        print(f"\nunflushed TLB (TCG): {missed} of {warm} cached pages touched after the mark were missed "
              f"(per round {[m for m, _ in MISSED]})")
    finally:
        wl.stop()
    assert lv.state(libvirtd, domain.name) == 1
    assert lv.taints(libvirtd, domain.name) == taints
    assert "custom-monitor" not in domain.log.read_text()


def _cli(libvirtd: lv.Libvirtd, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmsight.cli.main", "-c", libvirtd.uri, *args]


def signal_while_marked(libvirtd: lv.Libvirtd, dom: lv.Domain, wl: GuestWorkload, pt: PageTables,
                        sig: signal.Signals) -> None:
    """`vmsight idle live` (no taint) sent ``sig`` once its mark cleared the bits: they all come back."""
    before = pt.entries()
    p = subprocess.Popen(_cli(libvirtd, "--vm", f"libvirt:{dom.name}", "--json", "idle", "live", str(wl.pid),
                              "--range", f"{wl.addr:#x}-{wl.addr + wl.size:#x}", "--interval", "60s"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the mark", lambda: not any(v & PAGE_ACCESSED for v in pt.entries().values()), 60)
        p.send_signal(sig)
        out_text, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), err
    head = json.loads(out_text.splitlines()[0])
    assert head["backend"] == "guest-pte" and head["approximate"] is True
    # SIGKILL: the watchdog suspends the domain, ORs the bits back through the RAM file, resumes it
    wait_for(f"the bits back after {sig.name}", lambda: pt.entries() == before, 20)
    wait_for("the domain running", lambda: lv.state(libvirtd, dom.name) == 1, 10)


def test_cli_connect_and_signals_give_bits_back(libvirtd: lv.Libvirtd, domain: lv.Domain) -> None:
    """`vmsight idle` takes -c (also after `idle`, before its command word): bitmap marks and reads; live
    killed by SIGTERM (the unwinding) and by SIGKILL (the watchdog, with no gdbstub: through the RAM file)
    leaves every entry as it found it, and the domain running."""
    taints = lv.taints(libvirtd, domain.name)
    wl = GuestWorkload(domain, PAGES)
    start, end = wl.addr, wl.addr + wl.size
    try:
        with page_tables(libvirtd, domain, wl) as pt:
            before = pt.entries()
            r = subprocess.run([sys.executable, "-m", "vmsight.cli.main", "--vm", f"libvirt:{domain.name}", "--json",
                                "idle", "-c",
                                libvirtd.uri, "bitmap", str(wl.pid), "--start", hex(start), "--end", hex(end),
                                "--mark", "--wait", "0.2s"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            assert out["backend"] == "guest-pte" and LOWER_BOUND in out["warnings"]
            assert out["words"] == [f"{(1 << 64) - 1:#018x}"] * (PAGES // 64)  # nothing touched: all idle
            assert pt.entries() == before
            for sig in (signal.SIGTERM, signal.SIGKILL):
                signal_while_marked(libvirtd, domain, wl, pt, sig)
            assert pt.entries() == before
    finally:
        wl.stop()
    assert lv.taints(libvirtd, domain.name) == taints
    assert "custom-monitor" not in domain.log.read_text()


def test_proc_mem_domain_then_allow_taint_is_exact(libvirtd: lv.Libvirtd) -> None:
    """A domain with anonymous RAM: the accessed bits are written through /proc/PID/mem, without taint
    (lower bounds; the watchdog gives them back through /proc/PID/mem after a SIGKILL), then with
    --allow-taint, where the mark flushes every vCPU's TLB through the gdbstub libvirt's monitor
    passthrough added, so the WARM pages are seen too."""
    for dom in start(libvirtd, "vmsight-idle-taint", "debian-6.1", memfd=False):
        conn = libvirtd.conn()
        qemu = lv.find_qemu_pid(conn.lookupByName(dom.name).UUIDString().lower(), [])
        conn.close()
        del conn
        sockets = lv.qemu_sockets(qemu)
        wl = GuestWorkload(dom, PAGES)
        try:
            pin(dom, wl)
            with page_tables(libvirtd, dom, wl) as pt:
                before = pt.entries()
                with attach(f"libvirt:{dom.name}", uri=libvirtd.uri) as vm:
                    assert vm.backend == "proc-pid-mem" and not vm.can_flush_tlb
                    with GuestIdleTracker(vm, wl.pid) as tr:
                        rounds(dom, wl, tr, pt, exact=False)
                assert pt.entries() == before
                signal_while_marked(libvirtd, dom, wl, pt, signal.SIGKILL)
                assert pt.entries() == before
                assert not any("custom" in t for t in lv.taints(libvirtd, dom.name))
                with attach(f"libvirt:{dom.name}", uri=libvirtd.uri, allow_taint=True) as vm:
                    assert vm.backend == "proc-pid-mem" and vm.can_flush_tlb
                    with GuestIdleTracker(vm, wl.pid) as tr:
                        assert not tr.approximate
                        rounds(dom, wl, tr, pt, exact=True)
                assert pt.entries() == before
        finally:
            wl.stop()
        assert any("custom" in t for t in lv.taints(libvirtd, dom.name))   # as --allow-taint says
        assert lv.qemu_sockets(qemu) == sockets, "a gdbstub socket remains"
        assert lv.state(libvirtd, dom.name) == 1
