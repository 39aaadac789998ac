"""P7 of issue 12 (first part): a 4 KiB READ_PHYSICAL round trip through :class:`vmsight.kvmi.Introspector`
against ``vmsight kvmi`` in its own process, ÷ a 4 KiB unix-socket echo between the same Python and a Python
echo process (target <= 3). Both are timed in alternating batches while the same guest runs, so a busy
machine slows both alike; the best batch of each counts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from benchmarks.timing import best_of
from vmsight.kvmi import Introspector
from vmsight.qemu.launch import LaunchConfig, launch

N = 500
ROUNDS = 9
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
while True:
    buf = s.recv(4096, socket.MSG_WAITALL)
    if not buf: break
    s.sendall(buf)
"""


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - t) / N


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d, launch(LaunchConfig(kernel="debian-6.1", memory="256M"), d) as inst:
        path = os.path.join(d, "echo.sock")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(path)
        lst.listen(1)
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, path])
        conn, _ = lst.accept()
        msg = bytes(4096)

        def echo_once() -> None:
            conn.sendall(msg)
            conn.recv(4096, socket.MSG_WAITALL)

        with Introspector() as intro:
            proc = subprocess.Popen([sys.executable, "-m", "vmsight.cli.main", "--vm", inst.dir, "kvmi",
                                     str(intro.address)], stdout=subprocess.DEVNULL)
            try:
                intro.accept(60.0)
                out["KVMi GET_REGISTERS ms (running VM: QMP stop, HMP, cont)"] = best_of(
                    lambda: intro.get_registers(0, [0xC0000080])) * 1e3
                t_kvmi = t_echo = float("inf")
                for _ in range(ROUNDS):
                    t_kvmi = min(t_kvmi, _timed(lambda: intro.read_physical(0x1000000, 4096)))
                    t_echo = min(t_echo, _timed(echo_once))
            finally:
                intro.close()
                proc.wait(30)
                conn.close()
                lst.close()
                echo.wait(10)
    out["P7 READ_PHYSICAL 4 KiB round trip us"] = t_kvmi * 1e6
    out["P7 unix-socket echo 4 KiB us (baseline)"] = t_echo * 1e6
    out["P7 ratio (target <= 3)"] = t_kvmi / t_echo
    return out
