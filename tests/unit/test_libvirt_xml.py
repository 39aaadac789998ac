"""vmsight.libvirt without a daemon: what is read from a domain's XML, where pid files are looked for, the default
URI, and bad XML (one TargetError, never a parser traceback)."""

from __future__ import annotations

import pytest

from vmsight.errors import TargetError
from vmsight.libvirt import default_uri, parse_domain_xml, pidfile_candidates, ram_path_summary

XML = """<domain type='kvm' id='3'>
  <name>web1</name><uuid>C0F047BA-1146-41B8-B448-AFB3955D1681</uuid>
  <memory unit='GiB'>4</memory><currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  {backing}
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  {numa}
</domain>"""


def test_anonymous_domain() -> None:
    x = parse_domain_xml(XML.format(backing="", numa=""))
    assert (x.name, x.uuid, x.memory_bytes, x.vcpus, x.machine, x.domain_type) == (
        "web1", "c0f047ba-1146-41b8-b448-afb3955d1681", 4 << 30, 4, "pc-q35-7.2", "kvm")
    assert (x.ram_source, x.ram_shared, x.numa_cells, x.dimms) == ("anonymous", False, 0, 0)
    assert ram_path_summary(x) == "proc-pid-mem (root)"


def test_shared_memfd_and_numa() -> None:
    backing = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
    x = parse_domain_xml(XML.format(backing=backing, numa=""))
    assert (x.ram_source, x.ram_shared) == ("memfd", True)
    assert ram_path_summary(x) == "mapped-ram-file (shared memfd)"
    # memfd without shared access: QEMU maps it private, the host sees none of the guest's writes
    x = parse_domain_xml(XML.format(backing="<memoryBacking><source type='memfd'/></memoryBacking>", numa=""))
    assert ram_path_summary(x) == "proc-pid-mem (root)"
    numa = "<cpu><numa><cell id='0' memory='2' unit='GiB'/><cell id='1' memory='2' unit='GiB'/></numa></cpu>"
    assert ram_path_summary(parse_domain_xml(XML.format(backing="", numa=numa))).startswith("unsupported")


@pytest.mark.parametrize("text", ["", "<domain", "<network/>", "x" * 100])
def test_bad_xml_is_one_error(text: str) -> None:
    with pytest.raises(TargetError):
        parse_domain_xml(text)


def test_pidfile_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pidfile_candidates("qemu:///system", "web1") == ["/run/libvirt/qemu/web1.pid"]
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert pidfile_candidates("qemu:///session", "web1") == ["/run/user/1000/libvirt/qemu/run/web1.pid"]
    assert pidfile_candidates("qemu+unix:///system?socket=/srv/lv/run/libvirt-sock", "web1") == [
        "/srv/lv/run/qemu/web1.pid", "/run/libvirt/qemu/web1.pid"]
    assert pidfile_candidates("qemu+ssh://host/system", "web1") == ["/run/libvirt/qemu/web1.pid"]


def test_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
    assert default_uri() == "qemu:///session"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_uri() == "qemu:///system"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_uri() == "qemu:///session"
