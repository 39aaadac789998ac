"""P7 of issue 12 (first part): a 4 KiB READ_PHYSICAL round trip through :class:`vmsight.kvmi.Introspector`
against ``vmsight kvmi`` in its own process, ÷ a 4 KiB unix-socket echo between the same Python and a Python
echo process, same run (target <= 3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import best_of
from vmsight.kvmi import Introspector
from vmsight.qemu.launch import LaunchConfig, launch

N = 500
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
while True:
    buf = s.recv(4096, socket.MSG_WAITALL)
    if not buf: break
    s.sendall(buf)
"""


def _echo_round_trip(d: str) -> float:
    path = os.path.join(d, "echo.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, path])
    conn, _ = lst.accept()
    msg = bytes(4096)

    def batch() -> None:
        for _ in range(N):
            conn.sendall(msg)
            conn.recv(4096, socket.MSG_WAITALL)

    try:
        return best_of(batch) / N
    finally:
        conn.close()
        lst.close()
        proc.wait(10)


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d, launch(LaunchConfig(kernel="debian-6.1", memory="256M"), d) as inst:
        with Introspector() as intro:
            proc = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "kvmi",
                                     str(intro.address)], stdout=subprocess.DEVNULL)
            try:
                intro.accept(60.0)
                t = time.perf_counter()
                intro.get_version()
                out["KVMi GET_VERSION first call ms"] = (time.perf_counter() - t) * 1e3
                t_kvmi = best_of(lambda: [intro.read_physical(0x1000000 + (i % 64) * 4096, 4096)
                                          for i in range(N)]) / N
            finally:
                intro.close()
                proc.wait(30)
        t_echo = _echo_round_trip(d)
    out["P7 READ_PHYSICAL 4 KiB round trip us"] = t_kvmi * 1e6
    out["P7 unix-socket echo 4 KiB us (baseline)"] = t_echo * 1e6
    out["P7 ratio (target <= 3)"] = t_kvmi / t_echo
    return out
