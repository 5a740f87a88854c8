"""Threads sharing one Table: close() while another thread is inside a call, and the value
buffers, which two threads must never share whatever the interpreter's switch points.

Run on every CPython the project supports; 3.9 switches threads between any two bytecodes
and so finds what 3.11+ would hide (.ci/run runs this file on 3.9 and 3.13 venvs too)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from conftest import JOIN_TIMEOUT, join_all

import shmkv

ROUNDS = 40  # closes per child, each while a thread loops on the table
BATCH = {b"b%03d" % i: b"v" * 48 for i in range(50)}


def loop_until_closed(t: shmkv.Table, started: threading.Event, outcome: list) -> None:
    """A thread: set_many and get in a loop until the table is closed under it."""
    try:
        n = 0
        while True:
            t.set_many(BATCH)
            t.get(b"b000")
            n += 1
            if n == 3:
                started.set()
    except shmkv.TableClosed:
        outcome.append("closed")
    except BaseException as exc:  # anything else fails the child
        outcome.append(repr(exc))
    finally:
        started.set()


def close_under_a_thread(name: str, rounds: int) -> None:
    """A child: attaches, lets a thread loop on the table, closes it from the main thread,
    and checks that the thread met TableClosed; `rounds` times. Exits 0 only if every round
    went so (a crash would be a signal, a stranded lock the parent's LockTimeout)."""
    for _ in range(rounds):
        t = shmkv.attach(name, lock_timeout=JOIN_TIMEOUT)
        started = threading.Event()
        outcome: list = []
        worker = threading.Thread(target=loop_until_closed, args=(t, started, outcome))
        worker.start()
        if not started.wait(JOIN_TIMEOUT):
            os._exit(3)
        t.close()
        worker.join(JOIN_TIMEOUT)
        if worker.is_alive() or outcome != ["closed"]:
            print("round failed:", outcome, file=sys.stderr)
            os._exit(4)
    os._exit(0)


def test_close_while_another_thread_is_inside_a_call(mp_context, make_name) -> None:
    """The issue's reproduction, many times over: close() waits for the call in flight,
    the looping thread gets TableClosed, nothing crashes, and the lock is never stranded."""
    name = make_name()
    with shmkv.create(name, capacity=128, key_size=8, value_size=64, lock_timeout=5.0) as t:
        child = mp_context.Process(target=close_under_a_thread, args=(name, ROUNDS))
        child.start()
        assert join_all([child]) == [0]
        t[b"after"] = b"ok"  # the lock is free: no LockTimeout
        assert t[b"after"] == b"ok" and t[b"b000"] == b"v" * 48
        t.check()
        t.unlink()


def test_calls_after_close_raise_table_closed_in_every_thread(name) -> None:
    """A thread that still holds the handle's cdata (it read it before close) gets
    SHMKV_ECLOSED from C, not a call on freed memory or an unmapped segment."""
    from shmkv._core import lib

    t = shmkv.create(name, capacity=8, key_size=8, value_size=8)
    h = t._h  # what a thread between its attribute load and its C call holds
    t.close()
    assert lib.shmkv_get(h, b"k", 1, shmkv._table.ffi.NULL, 0) == lib.SHMKV_ECLOSED
    assert lib.shmkv_put(h, b"k", 1, b"v", 1, 0, 0) == lib.SHMKV_ECLOSED
    lib.shmkv_close(h)  # again: idempotent, returns at once
    with pytest.raises(shmkv.TableClosed, match=r"^table '.*' is closed$"):
        t[b"k"]


def test_close_from_two_threads_at_once(name) -> None:
    t = shmkv.create(name, capacity=8, key_size=8, value_size=8)
    barrier = threading.Barrier(2)

    def closer() -> None:
        barrier.wait(JOIN_TIMEOUT)
        t.close()

    threads = [threading.Thread(target=closer) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_TIMEOUT)
    assert t.closed and not any(th.is_alive() for th in threads)


GETS = 20_000  # per thread: 3.9 without the fix mixed values up within a few thousand


def test_threads_never_get_each_others_values(name) -> None:
    """Two threads get different keys as fast as the interpreter switches between them:
    every value each one gets is its own key's (the buffer a value is read into is never
    shared)."""
    size = 4096
    t = shmkv.create(name, capacity=8, key_size=8, value_size=size)
    t[b"a"] = b"A" * size
    t[b"b"] = b"B" * size
    wrong: dict[bytes, int] = {b"a": 0, b"b": 0}
    barrier = threading.Barrier(2)

    def reader(key: bytes) -> None:
        mine = key.upper() * size
        barrier.wait(JOIN_TIMEOUT)
        for _ in range(GETS):
            if t.get(key) != mine or t[key] != mine:
                wrong[key] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader, args=(key,)) for key in (b"a", b"b")]
        for th in threads:
            th.start()
        for th in threads:
            th.join(JOIN_TIMEOUT)
    finally:
        sys.setswitchinterval(interval)
    assert not any(th.is_alive() for th in threads)
    assert wrong == {b"a": 0, b"b": 0}
    t.unlink()
    t.close()


class LockStep:
    """Makes two threads take turns at every line of shmkv/_table.py they run (through a
    trace function), so that each line of one thread's call runs between two lines of the
    other's: whatever the interpreter's own switch points, code that takes a shared object in
    two statements is caught every time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.running = 2
        from shmkv import _table

        self.source = _table.__file__

    def run(self, me: int, body) -> None:
        def local(frame, event, arg):  # noqa: ARG001
            if event == "line":
                with self.cond:
                    self.turn = 1 - me
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: self.turn == me or self.running < 2,
                                       timeout=JOIN_TIMEOUT)
            return local

        def tracer(frame, event, arg):  # noqa: ARG001
            return local if frame.f_code.co_filename == self.source else None

        sys.settrace(tracer)
        try:
            body()
        finally:
            sys.settrace(None)
            with self.cond:
                self.running -= 1
                self.cond.notify_all()


def test_threads_taking_turns_at_every_line_get_their_own_values(name) -> None:
    """The same, with the threads interleaved line by line: deterministic on every
    CPython, and it fails at once if the buffers are taken in two steps."""
    size = 64
    t = shmkv.create(name, capacity=8, key_size=8, value_size=size)
    t[b"a"] = b"A" * size
    t[b"b"] = b"B" * size
    got: dict[bytes, list] = {b"a": [], b"b": []}
    step = LockStep()

    def reader(me: int, key: bytes) -> None:
        def body() -> None:
            for _ in range(50):
                got[key] += [t.get(key), t[key], t.pop(b"none", None)]
        step.run(me, body)

    threads = [threading.Thread(target=reader, args=(i, key))
               for i, key in enumerate((b"a", b"b"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_TIMEOUT)
    assert not any(th.is_alive() for th in threads)
    for key, values in got.items():
        assert set(values) == {key.upper() * size, None}, f"{key!r} got another's value"
    t.unlink()
    t.close()


def test_a_thread_that_ends_holding_the_lock_is_recovered(name) -> None:
    """The kernel hands a lock whose holder thread ended to the next locker as owner-dead,
    as it does for a dead process: a thread of the same process, on the same handle, then
    recovers the table (the dead thread's state in the handle is not its own) instead of
    finding it broken."""
    t = shmkv.create(name, capacity=8, key_size=8, value_size=8)
    t[b"k"] = b"v"
    holder = threading.Thread(target=t._hold_lock_for_testing)
    holder.start()
    holder.join(JOIN_TIMEOUT)
    assert not holder.is_alive()
    t[b"k"] = b"w"
    assert t[b"k"] == b"w" and t.stats()["recoveries"] == 1
    t.check()
    t.unlink()
    t.close()


def _close_in_child(t: shmkv.Table) -> None:
    t.close()  # hangs if the lock a parent thread held at the fork is still taken


# Forking a process with a second thread is the very case under test (3.12+ warns of it).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_close_in_a_child_forked_while_a_thread_was_closing(table: shmkv.Table) -> None:
    """A thread of the parent inside close() holds the table's close lock when another
    thread forks: the child, where that thread does not exist, must still be able to
    close() (the lock is renewed in the child)."""
    import multiprocessing
    import threading

    from conftest import JOIN_TIMEOUT, join_all

    holding, release = threading.Event(), threading.Event()

    def closer_stuck_inside() -> None:
        with table._close_lock:  # as close() holds it while it waits for calls in flight
            holding.set()
            release.wait(JOIN_TIMEOUT)

    thread = threading.Thread(target=closer_stuck_inside)
    thread.start()
    try:
        assert holding.wait(JOIN_TIMEOUT)
        child = multiprocessing.get_context("fork").Process(target=_close_in_child,
                                                            args=(table,))
        child.start()
        assert join_all([child]) == [0]
    finally:
        release.set()
        thread.join(JOIN_TIMEOUT)
