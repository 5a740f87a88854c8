"""Several processes on one table, started with both fork and spawn: exact final states, the
race-free create(exist_ok=True), and a process that dies holding the lock.

Children are module-level functions with picklable arguments; they start together on a
Barrier and are joined with a timeout, and their exit codes are asserted."""

from __future__ import annotations

import os

import pytest
from conftest import JOIN_TIMEOUT, join_all

import shmkv

WORKERS = 4
OPS = 500


def hammer(table_or_name: shmkv.Table | str, index: int, barrier) -> None:
    """Writes keys of its own and increments the shared counter OPS times."""
    t = table_or_name if isinstance(table_or_name, shmkv.Table) else shmkv.attach(table_or_name)
    barrier.wait(JOIN_TIMEOUT)
    for i in range(OPS):
        t[b"w%d:%d" % (index, i)] = b"%d:%d" % (index, i)
        t.incr(b"counter")
        if i % 5 == 0:
            del t[b"w%d:%d" % (index, i)]
        assert t[b"w%d:%d" % (index, i - (i % 5 == 0))] if i else True
    t.close()


def expected_keys() -> dict[bytes, bytes]:
    return {
        b"w%d:%d" % (w, i): b"%d:%d" % (w, i)
        for w in range(WORKERS)
        for i in range(OPS)
        if i % 5 != 0
    }


@pytest.mark.parametrize("pass_table", [False, True], ids=["by-name", "pickled-table"])
def test_workers_share_one_table(mp_context, make_name, pass_table: bool) -> None:
    name = make_name()
    with shmkv.create(name, capacity=WORKERS * OPS + 1, key_size=16, value_size=16) as t:
        barrier = mp_context.Barrier(WORKERS)
        target = t if pass_table else name
        procs = [mp_context.Process(target=hammer, args=(target, w, barrier))
                 for w in range(WORKERS)]
        for p in procs:
            p.start()
        assert join_all(procs) == [0] * WORKERS
        assert t.incr(b"counter", 0) == WORKERS * OPS
        del t[b"counter"]
        assert dict(t.items()) == expected_keys()
        t.check()
        assert t.stats()["recoveries"] == 0
        t.unlink()


def create_or_attach(name: str, barrier, results) -> None:
    barrier.wait(JOIN_TIMEOUT)
    t = shmkv.create(name, capacity=100, key_size=8, value_size=8, exist_ok=True)
    t.incr(b"attached")
    results.put((os.getpid(), t.created, t.stats()["creator_pid"]))
    t.close()


def test_create_exist_ok_race(mp_context, make_name) -> None:
    """Many processes create(exist_ok=True) at once: exactly one creates, all share it."""
    name = make_name()
    n = 8
    barrier = mp_context.Barrier(n)
    results = mp_context.Queue()
    procs = [mp_context.Process(target=create_or_attach, args=(name, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=JOIN_TIMEOUT) for _ in range(n)]
    assert join_all(procs) == [0] * n
    creators = [pid for pid, created, _ in reports if created]
    assert len(creators) == 1
    assert {creator_pid for _, _, creator_pid in reports} == {creators[0]}
    with shmkv.attach(name) as t:
        assert t.incr(b"attached", 0) == n
        t.check()
        t.unlink()


def die_holding_lock(name: str, ready) -> None:
    t = shmkv.attach(name)
    t[b"before"] = b"death"
    t._hold_lock_for_testing()
    ready.set()
    os._exit(7)


def test_dead_lock_owner_is_recovered(mp_context, make_name) -> None:
    """A process that dies holding the lock blocks nobody: the next locker repairs the
    table, counts a recovery and carries on."""
    name = make_name()
    with shmkv.create(name, capacity=10, key_size=8, value_size=8) as t:
        t[b"k"] = b"v"
        ready = mp_context.Event()
        p = mp_context.Process(target=die_holding_lock, args=(name, ready))
        p.start()
        assert ready.wait(JOIN_TIMEOUT)
        assert join_all([p]) == [7]
        assert t[b"k"] == b"v"
        assert t[b"before"] == b"death"
        assert t.stats()["recoveries"] == 1
        t.check()
        t[b"after"] = b"fine"
        assert len(t) == 3
        t.unlink()


def test_lock_held_by_this_thread_is_an_error_not_a_hang(table: shmkv.Table) -> None:
    table._hold_lock_for_testing()
    try:
        with pytest.raises(shmkv.LockError):
            table[b"k"] = b"v"
    finally:
        table._hold_lock_for_testing(False)
    table[b"k"] = b"v"


def count_in_shared_dict(name: str, barrier, n: int) -> None:
    d = shmkv.SharedDict(shmkv.attach(name), codec="json")
    barrier.wait(JOIN_TIMEOUT)
    for _ in range(n):
        d.incr("visits")
    d.close()


def test_shared_dict_incr_is_atomic_across_processes(mp_context, make_name) -> None:
    """SharedDict.incr is a compare-and-swap loop on encoded values: no update is lost."""
    name = make_name()
    with shmkv.create(name, capacity=4, key_size=16, value_size=32) as t:
        barrier = mp_context.Barrier(WORKERS)
        procs = [mp_context.Process(target=count_in_shared_dict, args=(name, barrier, 300))
                 for _ in range(WORKERS)]
        for p in procs:
            p.start()
        assert join_all(procs) == [0] * WORKERS
        assert shmkv.SharedDict(t, codec="json")["visits"] == WORKERS * 300
        t.unlink()
