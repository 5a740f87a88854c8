"""shmkv.memoize: keys that every process computes alike, one computation however many
processes miss at once (fork and spawn, started on a Barrier), a computer that dies holding
the lock, and what is and is not cached."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from conftest import JOIN_TIMEOUT, join_all

import shmkv
from shmkv._memoize import call_key

WORKERS = 4
DEAD_LOCK_TTL = 0.5

# What expensive() reports to and waits for, set by each process that calls it.
_STATE: dict[str, Any] = {}


def expensive(n: int) -> dict[str, int]:
    """The memoized function of the multi-process tests: counts its calls in the table,
    says it is computing, then waits for the test's go (or dies, when told to)."""
    _STATE["table"].incr(b"calls")
    if _STATE.get("die"):  # an Event, not the queue: a queue's feeder thread dies with us
        _STATE["dying"].set()
        os._exit(3)
    _STATE["queue"].put(("computing", os.getpid()))
    assert _STATE["go"].wait(JOIN_TIMEOUT)
    return {"square": n * n, "by": os.getpid()}


def call_together(name: str, barrier, queue, go, lock_ttl: float) -> None:
    t = shmkv.attach(name)
    _STATE.update(table=t, queue=queue, go=go)
    square = shmkv.memoize(t, lock_ttl=lock_ttl)(expensive)
    barrier.wait(JOIN_TIMEOUT)
    queue.put(("calling", os.getpid()))
    queue.put(("result", square(7)))
    t.close()


def test_one_computation_for_every_process(mp_context, make_name) -> None:
    name = make_name()
    with shmkv.create(name, capacity=16, key_size=64, value_size=256) as t:
        barrier, queue, go = mp_context.Barrier(WORKERS), mp_context.Queue(), mp_context.Event()
        procs = [mp_context.Process(target=call_together,
                                    args=(name, barrier, queue, go, JOIN_TIMEOUT))
                 for _ in range(WORKERS)]
        for p in procs:
            p.start()
        # The computation goes on until every process has called: they all miss it.
        messages = [queue.get(timeout=JOIN_TIMEOUT) for _ in range(WORKERS + 1)]
        assert sorted(kind for kind, _ in messages) == ["calling"] * WORKERS + ["computing"]
        go.set()
        results = [queue.get(timeout=JOIN_TIMEOUT) for _ in range(WORKERS)]
        assert join_all(procs) == [0] * WORKERS
        computer = next(pid for kind, pid in messages if kind == "computing")
        assert results == [("result", {"square": 49, "by": computer})] * WORKERS
        assert t.incr(b"calls", 0) == 1
        key = expensive_key(t)
        assert [k for k in t if k != b"calls"] == [key]  # the lock is gone
        t.check()


def expensive_key(t: shmkv.Table) -> bytes:
    return shmkv.memoize(t)(expensive).cache_key(7)  # type: ignore[attr-defined]


def die_computing(name: str, dying, lock_ttl: float) -> None:
    t = shmkv.attach(name)
    _STATE.update(table=t, dying=dying, die=True)
    shmkv.memoize(t, lock_ttl=lock_ttl)(expensive)(7)


def test_a_dead_computer_blocks_the_others_for_lock_ttl_at_most(mp_context, make_name,
                                                                 monkeypatch) -> None:
    name = make_name()
    with shmkv.create(name, capacity=16, key_size=64, value_size=256) as t:
        dying, queue, go = mp_context.Event(), mp_context.Queue(), mp_context.Event()
        child = mp_context.Process(target=die_computing, args=(name, dying, DEAD_LOCK_TTL))
        child.start()
        assert dying.wait(JOIN_TIMEOUT)
        assert join_all([child]) == [3]
        go.set()
        monkeypatch.setattr("test_memoize._STATE", {"table": t, "queue": queue, "go": go})
        square = shmkv.memoize(t, lock_ttl=DEAD_LOCK_TTL)(expensive)
        lock = square.cache_key(7).replace(b"memo:", b"memo!", 1)  # type: ignore[attr-defined]
        left = t.ttl(lock)  # the dead computer's lock, still held
        assert left is not None and 0 < left <= DEAD_LOCK_TTL
        start = time.monotonic()
        assert square(7) == {"square": 49, "by": os.getpid()}  # after the lock expired
        waited = time.monotonic() - start
        assert left - 0.05 <= waited < DEAD_LOCK_TTL + 2
        assert t.incr(b"calls", 0) == 2
        assert lock not in t
        t.check()


def key_in_child(queue) -> None:
    queue.put(call_key(expensive, ({"b", "a", "c", "dd"}, {"y": 2, "x": [1, 2.0]}),
                       {"z": frozenset({"q", "r"}), "a": None}))


def test_keys_are_the_same_in_every_process(make_name) -> None:
    import multiprocessing

    # A spawned interpreter hashes str with another seed: set and dict orders differ.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=key_in_child, args=(queue,))
    p.start()
    theirs = queue.get(timeout=JOIN_TIMEOUT)
    assert join_all([p]) == [0]
    ours = call_key(expensive, ({"dd", "c", "b", "a"}, {"x": [1, 2.0], "y": 2}),
                    {"a": None, "z": frozenset({"r", "q"})})
    assert theirs == ours
    assert ours.startswith("expensive:") and len(ours) == len("expensive:") + 32
    # Arguments of other types or values are other keys.
    assert call_key(expensive, (1,), {}) != call_key(expensive, (1.0,), {})
    assert call_key(expensive, (1,), {}) != call_key(expensive, (), {"n": 1})


def test_results_exceptions_and_limits(make_name) -> None:
    with shmkv.create(make_name(), capacity=16, key_size=64, value_size=128) as t:
        calls: list[Any] = []

        @shmkv.memoize(t, ttl=60)
        def f(x: Any) -> Any:
            calls.append(x)
            if x == "boom":
                raise RuntimeError("not cached")
            return "y" * 500 if x == "big" else None

        assert f(1) is None and f(1) is None  # None is a result like any other
        assert calls == [1]
        assert 55 < t.ttl(f.cache_key(1)) <= 60  # type: ignore[attr-defined]
        for _ in range(2):
            with pytest.raises(RuntimeError):
                f("boom")
        assert f("big") == "y" * 500 and f("big") == "y" * 500  # too large: uncached
        assert calls == [1, "boom", "boom", "big", "big"]
        assert list(t) == [f.cache_key(1)]  # type: ignore[attr-defined]  # no lock left
        with pytest.raises(ValueError, match="lock_ttl"):
            shmkv.memoize(t, lock_ttl=0)


def test_on_redis(cache_url: str) -> None:
    t = shmkv.connect(cache_url)

    @shmkv.memoize(t, codec="json")
    def add(a: int, b: int) -> list[int]:
        return [a + b]

    assert add(2, 3) == add(2, 3) == [5]
    assert t[add.cache_key(2, 3)] == b"[5]"  # type: ignore[attr-defined]
    t.close()
