"""Optimistic reads: a get takes no lock, yet never returns a torn value, never blocks behind
another reader, and never waits forever behind a writer that died.

Readers in several processes check a checksum inside every value they read while writers in
others rewrite those values with new lengths and contents, for a bounded number of reads."""

from __future__ import annotations

import os
import random
import struct
import time
import zlib

import pytest
from conftest import JOIN_TIMEOUT, hold_lock, join_all

import shmkv

KEYS = 64
READS = 40_000  # per reader
WRITERS = 2
READERS = 2


def make_value(key: bytes, n: int) -> bytes:
    """Its key, a sequence number, 0 to 900 bytes of padding, and a CRC of all that."""
    body = key + b"|%d|" % n + bytes([n % 251]) * (n * 37 % 901)
    return body + struct.pack("=I", zlib.crc32(body))


def whole(key: bytes, value: bytes) -> bool:
    body, crc = value[:-4], value[-4:]
    return body.startswith(key + b"|") and struct.unpack("=I", crc)[0] == zlib.crc32(body)


def write(name: str, seed: int, stop) -> None:
    t = shmkv.attach(name)
    rng = random.Random(seed)
    n = 0
    deadline = time.monotonic() + JOIN_TIMEOUT  # never outlive a test that died
    while not stop.value and time.monotonic() < deadline:
        n += 1
        key = b"k%02d" % rng.randrange(KEYS)
        if n % 7 == 0:
            t.pop(key, None)  # deletes move slots back: readers must notice that too
        else:
            t[key] = make_value(key, n)
    t.close()


def read(name: str, seed: int, results) -> None:
    t = shmkv.attach(name)
    rng = random.Random(seed)
    torn = found = 0
    for _ in range(READS):
        key = b"k%02d" % rng.randrange(KEYS)
        value = t.get(key)
        if value is not None:
            found += 1
            torn += not whole(key, value)
    results[seed] = torn * 10**9 + found
    t.close()


def test_readers_never_see_a_torn_value(mp_context, make_name) -> None:
    name = make_name()
    with shmkv.create(name, capacity=KEYS, key_size=8, value_size=1024) as t:
        t.update({b"k%02d" % i: make_value(b"k%02d" % i, 0) for i in range(KEYS)})
        stop = mp_context.RawValue("b", 0)
        results = mp_context.RawArray("q", READERS)
        writers = [mp_context.Process(target=write, args=(name, 100 + i, stop))
                   for i in range(WRITERS)]
        readers = [mp_context.Process(target=read, args=(name, i, results))
                   for i in range(READERS)]
        for p in writers + readers:
            p.start()
        try:
            assert join_all(readers) == [0] * READERS
        finally:
            stop.value = 1  # whatever happened, the writers stop (or join_all kills them)
            assert join_all(writers) == [0] * WRITERS
        for r in results:
            torn, found = divmod(r, 10**9)
            assert torn == 0, f"{torn} torn values"
            assert found > 0
        t.check()
        stats = t.stats()
        assert stats["hits"] + stats["misses"] == READERS * READS  # flushed at close
        t.unlink()


def test_a_reader_is_not_stuck_behind_a_dead_writer(mp_context, make_name) -> None:
    """A writer that dies leaves seq odd: readers stop trying optimistically, take the lock,
    and its recovery evens seq again."""
    name = make_name()
    with shmkv.create(name, capacity=8, key_size=8, value_size=16) as t:
        t[b"k"] = b"v"
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, True))
        holder.start()
        assert ready.wait(JOIN_TIMEOUT)
        done.set()
        assert join_all([holder]) == [0]  # dead, lock held, seq odd
        assert t[b"k"] == b"v"
        assert t.stats()["recoveries"] == 1
        t.check()
        t[b"k"] = b"w"  # and writers go on
        assert t[b"k"] == b"w"
        t.unlink()


def test_gets_do_not_wait_for_the_lock(mp_context, make_name) -> None:
    """While another process holds the lock as a reader does (leaving seq even), gets and
    membership tests answer at once; a write waits and times out; hits reach stats()."""
    name = make_name()
    with shmkv.create(name, capacity=8, key_size=8, value_size=16, lock_timeout=0.2) as t:
        t[b"k"] = b"v"
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, False, False))
        holder.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            for _ in range(3000):
                assert t.get(b"k") == b"v" and b"k" in t and t.get(b"nope") is None
            with pytest.raises(shmkv.LockTimeout):
                t[b"k"] = b"w"
        finally:
            done.set()
        assert join_all([holder]) == [0]
        stats = t.stats()
        assert (stats["hits"], stats["misses"]) == (3000, 3000)
        t.unlink()


def count_and_exit(name: str, gets: int) -> None:
    t = shmkv.attach(name)
    for _ in range(gets):
        t.get(b"k")
    t.close()
    os._exit(0)


def test_a_forked_child_does_not_count_its_parents_reads_again(make_name) -> None:
    """Hits are counted in the handle and added to the header in batches; a child forked
    with some pending counts its own reads only."""
    import multiprocessing

    name = make_name()
    with shmkv.create(name, capacity=8, key_size=8, value_size=16) as t:
        t[b"k"] = b"v"
        for _ in range(100):
            t.get(b"k")  # pending in this handle, inherited by the child
        child = multiprocessing.get_context("fork").Process(target=lambda: (t.close(),
                                                                            os._exit(0)))
        child.start()
        assert join_all([child]) == [0]
        worker = multiprocessing.get_context("fork").Process(target=count_and_exit,
                                                             args=(name, 50))
        worker.start()
        assert join_all([worker]) == [0]
        assert t.stats()["hits"] == 150
        t.unlink()
