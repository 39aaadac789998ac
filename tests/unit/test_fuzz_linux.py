"""Fuzzing the guest-data parsers: random mutations of valid kallsyms tables, BTF blobs and typed
memory must only ever raise VmsightError subclasses, and finish in bounded time."""

from __future__ import annotations

import os
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_btf import kernel_like
from tests.unit.test_kallsyms import encode, make_symbols
from tests.unit.test_types import TASKS, build
from vmsight.errors import VmsightError
from vmsight.linux.btf import Btf, BtfKind
from vmsight.linux.kallsyms import find_all_kallsyms, find_banners

KALLSYMS_BLOBS = [encode(make_symbols(300, seed=3), order=o).blob for o in ("num_syms-first", "offsets-first")]
BTF_BLOB = kernel_like()[0]
TIME_LIMIT_S = 5.0

mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=24)
FUZZ = settings(max_examples=int(os.environ.get("VMSIGHT_FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(blob: bytes, muts: list[tuple[float, int]], cut: float | None = None) -> bytes:
    out = bytearray(blob)
    for where, value in muts:
        out[int(where * len(out))] = value
    if cut is not None:
        out = out[:int(cut * len(out))]
    return bytes(out)


@FUZZ
@given(which=st.integers(0, 1), muts=mutations, cut=st.none() | st.floats(0, 1))
def test_kallsyms_mutations(which: int, muts: list[tuple[float, int]], cut: float | None) -> None:
    blob = mutate(KALLSYMS_BLOBS[which], muts, cut)
    t0 = time.perf_counter()
    try:
        for ks in find_all_kallsyms(blob):
            assert len(ks.names) == len(ks.addresses) == len(ks.types)
            ks.lookup(ks.relative_base + 0x10)
            ks.get("init_task")
    except VmsightError:
        pass
    find_banners(blob)
    assert time.perf_counter() - t0 < TIME_LIMIT_S


def _table_offsets(blob: bytes) -> list[int]:
    lay = find_all_kallsyms(blob)[0].layout
    assert lay is not None
    return [lay.num_syms_offset, lay.names_offset, lay.markers_offset, lay.token_table_offset,
            lay.token_index_offset, lay.offsets_offset, lay.relative_base_offset, lay.seqs_offset or 0,
            lay.names_offset + lay.names_size - 4]


TABLES = [_table_offsets(b) for b in KALLSYMS_BLOBS]


@FUZZ
@given(which=st.integers(0, 1), table=st.integers(0, 8),
       muts=st.lists(st.tuples(st.integers(-16, 64), st.integers(0, 255)), min_size=1, max_size=8))
def test_kallsyms_table_header_mutations(which: int, table: int, muts: list[tuple[int, int]]) -> None:
    # Aim at the few bytes that steer layout detection: counts, first markers, index, relative_base.
    out = bytearray(KALLSYMS_BLOBS[which])
    for delta, value in muts:
        pos = TABLES[which][table] + delta
        if 0 <= pos < len(out):
            out[pos] = value
    t0 = time.perf_counter()
    try:
        for ks in find_all_kallsyms(bytes(out)):
            assert len(ks.names) == len(ks.addresses)
            ks.lookup(ks.relative_base)
    except VmsightError:
        pass
    assert time.perf_counter() - t0 < TIME_LIMIT_S


@FUZZ
@given(muts=mutations, cut=st.none() | st.floats(0, 1))
def test_btf_mutations(muts: list[tuple[float, int]], cut: float | None) -> None:
    blob = mutate(BTF_BLOB, muts, cut)
    t0 = time.perf_counter()
    try:
        btf = Btf(blob)
    except VmsightError:
        return
    for tid in range(0, len(btf) + 1):
        for op in (btf.type, btf.type_name, btf.size_of, btf.resolve, btf.name, btf.kind):
            try:
                op(tid)
            except VmsightError:
                pass
        try:
            if btf.kind(tid) in (BtfKind.STRUCT, BtfKind.UNION):
                for name in btf.members(tid):
                    btf.member(tid, name)
        except VmsightError:
            pass
    for name in ("task_struct", "struct mm_struct", "enum pid_type", "pcpu_hot"):
        try:
            btf.find(name)
            btf.member_offset(name, "pgd")
        except VmsightError:
            pass
    try:
        btf.enumerator("PIDTYPE_MAX")
    except VmsightError:
        pass
    assert time.perf_counter() - t0 < TIME_LIMIT_S


@FUZZ
@given(muts=st.lists(st.tuples(st.integers(0, 0x3FF), st.integers(0, 255)), min_size=1, max_size=32))
def test_typed_walks_over_mutated_memory(muts: list[tuple[int, int]]) -> None:
    mem, btf, ids, prog = build()
    for off, value in muts:  # corrupt the task structs and their list links
        mem.buf[0x100 + off] = value
    t0 = time.perf_counter()
    try:
        for task in prog.list_for_each_entry(TASKS[0] + 16, "task_struct", "tasks", limit=1000):
            task.comm.string_()
            task.value_()
            task.mm.pgd.pgd.value_()
    except VmsightError:
        pass
    assert time.perf_counter() - t0 < TIME_LIMIT_S


def test_self_referencing_struct_value_is_bounded() -> None:
    # A struct whose anonymous member is itself (a cycle in corrupt BTF) must not recurse forever.
    blob = bytearray(BTF_BLOB)
    btf = Btf(bytes(blob))
    sid = btf.find("mm_struct").id
    # Rewrite mm_struct's first (anonymous) member (after the 24-byte header and its 12-byte
    # btf_type) to have type mm_struct itself.
    pos = 24 + btf._offs[sid - 1] + 12
    struct.pack_into("<I", blob, pos + 4, sid)
    bad = Btf(bytes(blob))
    try:
        bad.member("mm_struct", "pgd")
    except VmsightError:
        pass
    else:
        raise AssertionError("a self-containing struct should not resolve")
