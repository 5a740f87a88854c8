"""Crash safety: a process killed at any instruction of any mutation blocks nobody, tears no
value and leaks no room.

The C core has a crash point before every store that matters (layout.h); a test process arms
it to die, lock held, at the n-th point from now, exactly as kill -9 there would leave things.
For every mutation and every n until the mutation completes, a child dies at point n and the
parent's next operation must find: the table recovered (recoveries + 1), its invariant check
passing, and every key holding its old or its new value. Then a torture test SIGKILLs workers
at random moments while they hammer the table with self-checking values."""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib
from typing import Any, Callable

import pytest
from conftest import JOIN_TIMEOUT, Clock, hold_lock, join_all
from shmkv._core import ffi, lib

import shmkv
from shmkv import _segment

FAULT_EXIT = lib.SHMKV_FAULT_EXIT
MAX_POINTS = 400  # far more crash points than any single mutation has

BEFORE = {b"a": b"old-a", b"b": b"old-b", b"c": b"old-c", b"n": (5).to_bytes(8, "little")}

# Every case runs on a stopped clock (conftest.Clock), started where the real boot clock
# stands: the keys are set, then the clock moves on by LATER seconds, and the child that
# mutates the table is handed the clock's reading, since a spawned child does not inherit a
# stopped clock (on the real one, touch's deadline could lie before the parent's clock).
LATER = 1000


def with_expired(t: shmkv.Table) -> None:
    """BEFORE, plus two keys that have expired LATER seconds on (invisible, but still
    holding room)."""
    t.update(BEFORE)
    t.set(b"gone1", b"expired", ttl=1)
    t.set(b"gone2", b"expired", ttl=2)


class Case:
    """A mutation to crash in, the table it starts from (made by setup, holding `before`)
    and the one it should leave. data: the data area's bytes (None: sized for capacity)."""

    def __init__(self, mutate: Callable[[shmkv.Table], Any], after: dict[bytes, bytes], *,
                 setup: Callable[[shmkv.Table], None] = lambda t: t.update(BEFORE),
                 before: dict[bytes, bytes] = BEFORE, capacity: int = 7,
                 on_full: str = "error", value_size: int = 16, data: int | None = None) -> None:
        self.mutate, self.after, self.setup, self.before = mutate, after, setup, before
        self.capacity, self.on_full, self.value_size = capacity, on_full, value_size
        self.memory = None if data is None else data_offset(capacity, 8, value_size) + data


def data_offset(capacity: int, key_size: int, value_size: int) -> int:
    """Where the data area of such a table starts: memory = this + the data area's bytes."""
    g = ffi.new("struct shmkv_geometry *")
    assert lib.shmkv_layout(capacity, key_size, value_size, 0, g) == 0
    return int(g.data_offset)


# Five keys of 40-byte values take 400 bytes: 5 blocks of 80 (a 32-byte header, the key padded
# to 8, the value), and a filler f the last 144 of a 544-byte data area (the smallest for 8
# keys of up to 104 bytes). Without b and d, 160 bytes are free in two holes of 80, so that a
# 128-byte block (an 88-byte value) fits only after compaction slides c down.
FILLER = {b"f": b"f" * 104}
FIVE = {**{k: k * 40 for k in (b"a", b"b", b"c", b"d", b"e")}, **FILLER}
HOLEY = {k: v for k, v in FIVE.items() if k not in (b"b", b"d")}
BIG = b"B" * 88
TIGHT = dict(data=544, capacity=8, value_size=104)


def holey(t: shmkv.Table) -> None:
    t.update(FIVE)
    del t[b"b"], t[b"d"]


# The same 544 bytes: a (5 units of 16), s (3), X (8), s2 (3), e (6), f (9). Without s and s2
# the two 48-byte holes can only hold a 96-byte block once X, 128 bytes, has slid down over
# the first hole: a move in three chunks of at most 48 bytes, so that no chunk overwrites
# what is left to copy.
SPREAD = {b"a": b"a" * 40, b"s": b"s" * 8, b"X": BIG, b"s2": b"t" * 8, b"e": b"e" * 48,
          **FILLER}
SPREAD_HOLEY = {k: v for k, v in SPREAD.items() if k not in (b"s", b"s2")}


def spread_holey(t: shmkv.Table) -> None:
    t.update(SPREAD)
    del t[b"s"], t[b"s2"]


MUTATIONS: dict[str, Case] = {
    "insert": Case(lambda t: t.__setitem__(b"new", b"new-value"),
                   {**BEFORE, b"new": b"new-value"}),
    "replace": Case(lambda t: t.__setitem__(b"a", b"new-a"), {**BEFORE, b"a": b"new-a"}),
    "add": Case(lambda t: t.add(b"new", b"added"), {**BEFORE, b"new": b"added"}),
    "delete": Case(lambda t: t.__delitem__(b"b"), {k: v for k, v in BEFORE.items() if k != b"b"}),
    "pop": Case(lambda t: t.pop(b"a"), {k: v for k, v in BEFORE.items() if k != b"a"}),
    "incr-existing": Case(lambda t: t.incr(b"n", 10),
                          {**BEFORE, b"n": (15).to_bytes(8, "little")}),
    "incr-new": Case(lambda t: t.incr(b"m", 3), {**BEFORE, b"m": (3).to_bytes(8, "little")}),
    "compare-and-swap": Case(lambda t: t.compare_and_swap(b"c", b"old-c", b"cas-c"),
                             {**BEFORE, b"c": b"cas-c"}),
    "setdefault": Case(lambda t: t.setdefault(b"new", b"default"),
                       {**BEFORE, b"new": b"default"}),
    "clear": Case(lambda t: t.clear(), {}),
    "set-many": Case(lambda t: t.set_many({b"a": b"many-a", b"x": b"many-x", b"y": b"many-y"}),
                     {**BEFORE, b"a": b"many-a", b"x": b"many-x", b"y": b"many-y"}),
    "touch": Case(lambda t: t.touch(b"a", 60), BEFORE),
    # The table is full: the insert evicts b"a", the first cold key the clock hand meets.
    "insert-evicting": Case(lambda t: t.__setitem__(b"new", b"new-value"),
                            {**{k: v for k, v in BEFORE.items() if k != b"a"},
                             b"new": b"new-value"}, capacity=4, on_full="evict"),
    "set-many-evicting": Case(lambda t: t.set_many({b"b": b"many-b", b"x": b"many-x"}),
                              {b"b": b"many-b", b"n": BEFORE[b"n"], b"c": b"old-c",
                               b"x": b"many-x"}, capacity=4, on_full="evict"),
    # The table is full of live and expired keys: the insert reclaims the expired room.
    "insert-reclaiming-expired": Case(lambda t: t.__setitem__(b"new", b"new-value"),
                                      {**BEFORE, b"new": b"new-value"}, setup=with_expired,
                                      capacity=6),
    "insert-evicting-expired": Case(lambda t: t.__setitem__(b"new", b"new-value"),
                                    {**BEFORE, b"new": b"new-value"}, setup=with_expired,
                                    capacity=6, on_full="evict"),
    "replace-expired": Case(lambda t: t.__setitem__(b"gone1", b"back"),
                            {**BEFORE, b"gone1": b"back"}, setup=with_expired),
    "purge-expired": Case(lambda t: t.purge_expired(), BEFORE, setup=with_expired),
    # Values by size in a tight data area: splits, merges, compaction, eviction for bytes.
    "insert-compacting": Case(lambda t: t.__setitem__(b"new", BIG), {**HOLEY, b"new": BIG},
                              setup=holey, before=HOLEY, **TIGHT),
    "replace-compacting": Case(lambda t: t.__setitem__(b"a", BIG), {**HOLEY, b"a": BIG},
                               setup=holey, before=HOLEY, **TIGHT),
    "set-many-compacting": Case(lambda t: t.set_many({b"x": BIG}), {**HOLEY, b"x": BIG},
                                setup=holey, before=HOLEY, **TIGHT),
    "insert-compacting-in-chunks": Case(lambda t: t.__setitem__(b"new", b"n" * 56),
                                        {**SPREAD_HOLEY, b"new": b"n" * 56},
                                        setup=spread_holey, before=SPREAD_HOLEY, **TIGHT),
    "delete-merging": Case(lambda t: t.__delitem__(b"c"),
                           {k: v for k, v in HOLEY.items() if k != b"c"}, setup=holey,
                           before=HOLEY, **TIGHT),
    # The hand evicts a, then b (the first cold keys it meets) until 128 bytes are free.
    "insert-evicting-bytes": Case(lambda t: t.__setitem__(b"new", BIG),
                                  {**{k: v for k, v in FIVE.items() if k not in (b"a", b"b")},
                                   b"new": BIG}, setup=lambda t: t.update(FIVE), before=FIVE,
                                  on_full="evict", **TIGHT),
}


def crash_during(name: str, mutation: str, points: int, now_ns: int) -> None:
    case = MUTATIONS[mutation]
    Clock(now_ns)  # the parent's stopped clock, whatever the start method
    t = shmkv.attach(name)
    t._crash_after_for_testing(points)
    case.mutate(t)
    t._crash_after_for_testing(0)
    os._exit(0)


def assert_old_or_new(t: shmkv.Table, before: dict, after: dict) -> None:
    """Every key holds its value from before or after the mutation; nothing else exists."""
    now = dict(t.items())
    for key in set(before) | set(after) | set(now):
        assert now.get(key) in (before.get(key), after.get(key)), (key, now.get(key))
    assert len(t) == len(now)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_crash_at_every_point_of_every_mutation(mp_context, make_name, clock,
                                                mutation: str) -> None:
    case = MUTATIONS[mutation]
    crashes = 0
    for points in range(1, MAX_POINTS):
        name = make_name()
        # Capacity 7 with 4 keys (16 slots): room for set-many's two and the probe.
        with shmkv.create(name, capacity=case.capacity, key_size=8, value_size=case.value_size,
                          on_full=case.on_full, memory=case.memory) as t:
            case.setup(t)
            clock.advance(LATER)
            assert dict(t.items()) == case.before
            child = mp_context.Process(target=crash_during,
                                       args=(name, mutation, points, clock.ns))
            child.start()
            (code,) = join_all([child])
            if code == 0:  # the mutation finished before its points-th crash point
                assert dict(t.items()) == case.after
                assert t.stats()["recoveries"] == 0
                t.check()
                t.unlink()
                break
            assert code == FAULT_EXIT, f"child died with {code}"
            crashes += 1
            t.get(b"probe")  # the next operation recovers and goes on
            assert t.stats()["recoveries"] == 1
            t.check()
            assert_old_or_new(t, case.before, case.after)
            while True:  # and the table takes writes again (a tight one, once it has room)
                try:
                    t[b"probe"] = b"after-crash"
                    break
                except shmkv.TableFull:
                    del t[next(iter(t))]
            t.check()
            t.unlink()
    else:
        pytest.fail(f"{mutation} never completed")
    assert crashes >= 2, f"{mutation} has only {crashes} crash points"


def hold_and_die(name: str) -> None:
    t = shmkv.attach(name)
    t._hold_lock_for_testing()
    os._exit(3)


def recover_and_crash(name: str, points: int) -> None:
    # Armed before attaching: attach's first lock meets the dead owner and rebuilds.
    lib.shmkv_testing_crash_after(points)
    t = shmkv.attach(name)
    t.get(b"a")
    lib.shmkv_testing_crash_after(0)
    os._exit(0)


def test_a_recoverer_killed_while_rebuilding_is_recovered_in_turn(mp_context, make_name) -> None:
    crashes = 0
    for points in range(1, MAX_POINTS):
        name = make_name()
        with shmkv.create(name, capacity=5, key_size=8, value_size=16) as t:
            t.update(BEFORE)
            dead = mp_context.Process(target=hold_and_die, args=(name,))
            dead.start()
            assert join_all([dead]) == [3]
            child = mp_context.Process(target=recover_and_crash, args=(name, points))
            child.start()
            (code,) = join_all([child])
            assert code in (0, FAULT_EXIT)
            assert t[b"a"] == b"old-a"
            assert dict(t.items()) == BEFORE
            t.check()
            assert t.stats()["recoveries"] in (1, 2)
            t.unlink()
            if code == 0:
                break
            crashes += 1
    assert crashes >= 10


def test_a_table_that_recovery_cannot_mend_is_broken_not_hung(mp_context, make_name) -> None:
    """Damage no rebuild can undo (here: the header's geometry) marks the table broken on its
    next recovery; then every operation raises TableBroken at once."""
    name = make_name()
    with shmkv.create(name, capacity=5, key_size=8, value_size=16) as t:
        t.update(BEFORE)
        ready, done = mp_context.Event(), mp_context.Event()
        dead = mp_context.Process(target=hold_lock, args=(name, ready, done, True))
        dead.start()
        assert ready.wait(JOIN_TIMEOUT)
        raw = _segment.open_segment(name, create=False, track=False)
        struct.pack_into("=Q", raw.buf, 48, 4096)  # nslots: csrc/layout.h
        raw.close()
        done.set()  # the holder exits, lock held
        assert join_all([dead]) == [0]
        for op in (lambda: t[b"a"], lambda: t.set(b"a", b"x"), lambda: len(t), t.clear,
                   lambda: t.incr(b"n")):
            with pytest.raises(shmkv.TableBroken) as info:
                op()
            assert "create it again" in str(info.value)
        stats = t.stats()
        assert stats["broken"] is True and stats["recoveries"] == 1
        with pytest.raises(shmkv.CheckFailed):
            t.check()
        t.unlink()


def test_lock_timeout_names_the_holder(mp_context, make_name) -> None:
    name = make_name()
    with shmkv.create(name, capacity=5, key_size=8, value_size=16, lock_timeout=0.2) as t:
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, True))
        holder.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            with pytest.raises(shmkv.LockTimeout) as info:
                t[b"k"] = b"v"
            assert f"held by process {holder.pid} (alive)" in str(info.value)
            assert "0.2 s" in str(info.value)
            os.kill(holder.pid, signal.SIGSTOP)
            with pytest.raises(shmkv.LockTimeout) as info:
                t.get(b"k")
            assert f"held by process {holder.pid} (alive and stopped)" in str(info.value)
        finally:
            os.kill(holder.pid, signal.SIGCONT)
            done.set()
        assert join_all([holder]) == [0]
        t[b"k"] = b"v"  # the holder exited holding it: recovered
        assert t.stats()["lock_timeouts"] == 2 and t.stats()["recoveries"] == 1
        assert isinstance(info.value, TimeoutError)
        t.unlink()


def test_a_nonsense_lock_word_is_an_error_not_a_hang(make_name) -> None:
    """A lock word naming a thread that does not exist: a timeout that says so."""
    name = make_name()
    with shmkv.create(name, capacity=5, key_size=8, value_size=16, lock_timeout=0.2) as t:
        raw = _segment.open_segment(name, create=False, track=False)
        futex = lib.shmkv_testing_offset(b"lock")  # glibc's futex word starts the mutex
        struct.pack_into("=I", raw.buf, futex, 0x3FFFFFF0)
        with pytest.raises(shmkv.LockTimeout) as info:
            t[b"k"] = b"v"
        assert "does not exist" in str(info.value)
        struct.pack_into("=I", raw.buf, futex, 0)
        raw.close()
        t[b"k"] = b"v"
        t.unlink()


# ---------------------------------------------------------------------- torture

TORTURE_SECONDS = 5.0
TORTURE_KILLS = 5  # at least, however slow the machine: it runs on until it has them
TORTURE_WORKERS = 3
KEYS = 200
VALUE_SIZE = 2048
# The second policy: an evicting table with room for half the keys, values that expire
# within milliseconds, and sliding touches, so that evictions and expiry reclaims are
# killed in the middle as often as the other writes. The third: room for all the keys but
# 48 KB for their values, so that bytes run out first: inserts evict for room, and free room
# scattered between values is gathered by compaction, which is killed in the middle too.
POLICIES = {"plain": {"capacity": 2 * KEYS + 8},
            "evict+ttl": {"capacity": KEYS // 2, "on_full": "evict"},
            "bytes": {"capacity": 2 * KEYS + 8, "on_full": "evict", "data": 48_000}}


def make_value(key: bytes, n: int) -> bytes:
    """A value that proves itself whole: its key, a sequence number, padding, a CRC. Mostly
    short, one in ten up to 1,500 bytes: values change size as they are rewritten."""
    padding = (n * 7919) % 1500 if n % 10 == 0 else n % 40
    body = key + b"|" + str(n).encode() + b"|" + bytes([n % 251]) * padding
    return body + struct.pack("=I", zlib.crc32(body))


def value_is_whole(key: bytes, value: bytes) -> bool:
    body, crc = value[:-4], value[-4:]
    return body.startswith(key + b"|") and struct.unpack("=I", crc)[0] == zlib.crc32(body)


def hammer(name: str, seed: int, slot: int, stop, progress, churn: bool) -> None:
    t = shmkv.attach(name)
    rng = random.Random(seed)
    n = 0
    deadline = time.monotonic() + JOIN_TIMEOUT  # never outlive a test that died
    while not stop.value and time.monotonic() < deadline:
        key = b"k%03d" % rng.randrange(KEYS)
        action = rng.random()
        n += 1
        progress[slot] = n
        if churn and action < 0.1:
            t.touch(key, rng.choice((0.001, 0.01, 1.0)))
        elif churn and action < 0.3:
            t.set(key, make_value(key, n), ttl=rng.choice((None, 0.001, 0.01, 0.1)))
        elif churn and action < 0.32:
            t.purge_expired()
        elif action < 0.45:
            t[key] = make_value(key, n)
        elif action < 0.6:
            t.pop(key, None)
        elif action < 0.7:
            t.incr(b"counter:%d" % (seed % 4))
        elif action < 0.8:
            t.set_many({key: make_value(key, n), key + b"+": make_value(key + b"+", n)})
        else:
            value = t.get(key)
            if value is not None and not value_is_whole(key, value):
                os._exit(99)
    t.close()


@pytest.mark.parametrize("policy", list(POLICIES))
def test_torture_random_sigkills(mp_context, make_name, capsys, policy: str) -> None:
    """Workers hammer one table with self-checking values while the parent SIGKILLs random
    ones at random moments and restarts them. Nobody gets stuck, no value is torn, and the
    table passes its check. Prints a summary."""
    name = make_name()
    rng = random.Random(12345)
    churn = policy != "plain"
    options = dict(POLICIES[policy])
    if "data" in options:
        options["memory"] = (data_offset(options["capacity"], 16, VALUE_SIZE)
                             + options.pop("data"))
    with shmkv.create(name, key_size=16, value_size=VALUE_SIZE, lock_timeout=10,
                      **options) as t:
        # A plain shared byte, not an Event: an Event's lock dies held with a killed worker
        # and then blocks every other one (the reason shmkv's own lock is a robust mutex).
        stop = mp_context.RawValue("b", 0)
        progress = mp_context.RawArray("q", TORTURE_WORKERS)  # each worker's operation count
        seeds = iter(range(10**6))

        def start(slot: int) -> Any:
            progress[slot] = 0
            worker = mp_context.Process(target=hammer,
                                        args=(name, next(seeds), slot, stop, progress,
                                              churn))
            worker.start()
            return worker

        workers = [start(slot) for slot in range(TORTURE_WORKERS)]
        kills = checked = 0
        deadline = time.monotonic() + TORTURE_SECONDS
        give_up = time.monotonic() + JOIN_TIMEOUT
        try:
            while ((time.monotonic() < deadline or kills < TORTURE_KILLS)
                   and time.monotonic() < give_up):
                # The parent is a reader too; between its batches of reads, a worker that has
                # done a random number of operations since it started is killed.
                for _ in range(rng.randrange(50, 2000)):
                    key = b"k%03d" % rng.randrange(KEYS)
                    value = t.get(key)
                    if value is not None:
                        assert value_is_whole(key, value), (key, value)
                        checked += 1
                victim = rng.randrange(len(workers))
                if progress[victim] < rng.randrange(1, 3000):
                    continue
                assert workers[victim].exitcode is None, "a worker died on its own"
                os.kill(workers[victim].pid, signal.SIGKILL)
                workers[victim].join(JOIN_TIMEOUT)
                kills += 1
                workers[victim] = start(victim)
        finally:
            stop.value = 1  # even when an assertion fails: no worker outlives the test
        assert join_all(workers) == [0] * len(workers)
        for key, value in t.items():
            if key.startswith(b"k"):
                assert value_is_whole(key, value), (key, value)
                checked += 1
        t.check()
        stats = t.stats()
        with capsys.disabled():  # the summary belongs in every run's output, CI's included
            print(f"\ntorture ({policy}, {mp_context.get_start_method()}): {kills} SIGKILLs "
                  f"survived, {checked:,} values checked whole, {stats['recoveries']} "
                  f"recoveries, {stats['inserts'] + stats['updates'] + stats['deletes']:,} "
                  f"writes, {stats['evictions']:,} evictions, {stats['expirations']:,} "
                  f"expirations, {stats['compactions']:,} compactions, {len(t)} keys at "
                  "the end")
        assert kills >= TORTURE_KILLS
        t.unlink()
