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
from shmkv._core import ffi, lib

import shmkv

KEYS = 64
READS = 40_000  # per reader
WRITERS = 2
READERS = 2
# Per reader, after seq's flipped bit, against writers of batches: without the mend, some
# hundreds came back torn or another key's (the issue measured 158 in 1.86 M reads).
FLIPPED_READS = 100_000


def make_value(key: bytes, n: int) -> bytes:
    """Its key, a sequence number, 0 to 900 bytes of padding, and a CRC of all that."""
    body = key + b"|%d|" % n + bytes([n % 251]) * (n * 37 % 901)
    return body + struct.pack("=I", zlib.crc32(body))


def whole(key: bytes, value: bytes) -> bool:
    body, crc = value[:-4], value[-4:]
    return body.startswith(key + b"|") and struct.unpack("=I", crc)[0] == zlib.crc32(body)


def write(name: str, seed: int, stop, batch: int = 1) -> None:
    """Rewrites random keys (and deletes some) until stop; with batch > 1, set_many's of that
    many keys, whose replaced entries the same lock stretch hands out again."""
    t = shmkv.attach(name)
    rng = random.Random(seed)
    n = 0
    deadline = time.monotonic() + JOIN_TIMEOUT  # never outlive a test that died
    while not stop.value and time.monotonic() < deadline:
        n += 1
        key = b"k%02d" % rng.randrange(KEYS)
        if batch > 1:
            keys = {b"k%02d" % rng.randrange(KEYS) for _ in range(batch)}
            t.set_many({k: make_value(k, n) for k in keys})
        elif n % 7 == 0:
            t.pop(key, None)  # deletes move slots back: readers must notice that too
        else:
            t[key] = make_value(key, n)
    t.close()


def read(name: str, seed: int, results, reads: int = READS) -> None:
    t = shmkv.attach(name)
    rng = random.Random(seed)
    torn = found = 0
    for _ in range(reads):
        key = b"k%02d" % rng.randrange(KEYS)
        value = t.get(key)
        if value is not None:
            found += 1
            torn += not whole(key, value)
    results[seed] = torn * 10**9 + found
    t.close()


def readers_and_writers(mp_context, name: str, reads: int = READS,
                        batch: int = 1) -> list[tuple[int, int]]:
    """Runs WRITERS writers and READERS readers on table name; each reader's (torn, found)."""
    stop = mp_context.RawValue("b", 0)
    results = mp_context.RawArray("q", READERS)
    writers = [mp_context.Process(target=write, args=(name, 100 + i, stop, batch))
               for i in range(WRITERS)]
    readers = [mp_context.Process(target=read, args=(name, i, results, reads))
               for i in range(READERS)]
    for p in writers + readers:
        p.start()
    try:
        assert join_all(readers) == [0] * READERS
    finally:
        stop.value = 1  # whatever happened, the writers stop (or join_all kills them)
        assert join_all(writers) == [0] * WRITERS
    return [divmod(r, 10**9) for r in results]


@pytest.mark.parametrize("room", ["sized", "tight"])
def test_readers_never_see_a_torn_value(mp_context, make_name, room: str) -> None:
    """With room="tight", the data area holds about half of what the keys would take at
    once: writes evict for bytes, and free room scattered between values is gathered by
    compaction, which moves the values the readers are reading."""
    name = make_name()
    options: dict = {}
    if room == "tight":
        g = ffi.new("struct shmkv_geometry *")
        assert lib.shmkv_layout(KEYS, 8, 1024, 0, g) == 0
        options = {"on_full": "evict", "memory": g.data_offset + KEYS * 250}
    with shmkv.create(name, capacity=KEYS, key_size=8, value_size=1024, **options) as t:
        t.update({b"k%02d" % i: make_value(b"k%02d" % i, 0) for i in range(KEYS)})
        for torn, found in readers_and_writers(mp_context, name):
            assert torn == 0, f"{torn} torn values"
            assert found > 0
        t.check()
        stats = t.stats()
        assert stats["hits"] + stats["misses"] == READERS * READS  # flushed at close
        if room == "tight":
            assert stats["compactions"] > 0 and stats["moved_bytes"] > 0
            assert stats["evictions"] > 0
        t.unlink()


def test_a_reader_marking_a_moved_block_writes_no_data(make_name) -> None:
    """A lock-free reader of an evicting table marks the entry it read used after its read
    stood; by then a writer may have freed, merged or moved that block, and the reader's
    pointer may lie inside another entry's value. The mark must then write nothing: here
    zero bytes of a value stand where a block's CLOCK word would."""
    with shmkv.create(make_name(), capacity=4, key_size=8, value_size=256,
                      on_full="evict") as t:
        t[b"k"] = bytes(200)  # the first block: a 32-byte header, the key, value at 40..240
        for offset in range(48, 224, 16):  # every 16-byte boundary inside the value
            assert lib.shmkv_testing_mark_used_at(t._h, offset) == 0
        assert t[b"k"] == bytes(200)
        t.check()
        t.unlink()


def test_a_flipped_bit_in_seq_is_mended_by_the_next_locker(mp_context, make_name) -> None:
    """seq made odd while the lock is free (one flipped bit): the first writer to take the
    lock must not take it for its own odd stretch and even it, writing with seq even;
    readers then see no torn value, and the table passes its check. The writers write
    batches: a set_many hands the entries it frees to its own next keys, under one lock."""
    name = make_name()
    with shmkv.create(name, capacity=KEYS, key_size=8, value_size=1024) as t:
        t.update({b"k%02d" % i: make_value(b"k%02d" % i, 0) for i in range(KEYS)})
        assert lib.shmkv_testing_flip_seq(t._h) == 0
        for torn, found in readers_and_writers(mp_context, name, FLIPPED_READS, batch=32):
            assert torn == 0, f"{torn} torn values"
            assert found > 0
        t.check()
        t.unlink()


@pytest.mark.parametrize("first", ["write", "check", "get"])
def test_whoever_takes_the_lock_first_mends_an_odd_seq(name, first) -> None:
    """A write, a check (a reader holding the lock) or a get (which meets the odd seq, gives
    up on optimism and takes the lock) mends it; the check after it passes."""
    with shmkv.create(name, capacity=8, key_size=8, value_size=16) as t:
        t[b"k"] = b"v"
        assert lib.shmkv_testing_flip_seq(t._h) == 0
        if first == "write":
            t[b"k"] = b"w"
        elif first == "check":
            t.check()
        else:
            assert t[b"k"] == b"v"
        t.check()
        t[b"j"] = b"x"
        t.check()
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
