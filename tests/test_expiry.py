"""Expiry and eviction: TTLs, sliding expiry, reclaiming expired room, CLOCK eviction, their
counters, and what a second process sees.

Most tests stop the clock of deadlines (Table._set_clock_for_testing) and move it by hand, so
that they are exact and need no sleep. The tests named *_real_time wait on the real clock, as
a user's process would: each wait is short, and every assertion about "not expired yet" is
guarded by the time actually measured, so a loaded machine cannot make them fail."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator
from datetime import timedelta
from fractions import Fraction

import pytest
from conftest import JOIN_TIMEOUT, join_all, sleep_past
from shmkv._core import lib

import shmkv
from shmkv import _segment


@pytest.fixture
def evicting(make_name) -> Iterator[shmkv.Table]:
    t = shmkv.create(make_name(), capacity=8, key_size=16, value_size=32, on_full="evict")
    yield t
    t.unlink()
    t.close()


def keys(n: int, prefix: bytes = b"k") -> list[bytes]:
    return [prefix + b"%02d" % i for i in range(n)]


# ---------------------------------------------------------------------- TTL semantics


def test_an_expired_key_is_invisible_at_once_to_everything(table, clock) -> None:
    table.set(b"session", b"alice", ttl=10)
    table[b"forever"] = b"x"
    assert table.ttl(b"session") == 10.0 and table.ttl(b"forever") is None
    clock.advance(9.999)
    assert table[b"session"] == b"alice" and math.isclose(table.ttl(b"session"), 0.001)
    clock.advance(0.001)  # the deadline itself is expired
    assert table.get(b"session") is None
    assert b"session" not in table
    with pytest.raises(KeyError):
        table[b"session"]
    with pytest.raises(KeyError):
        table.ttl(b"session")
    assert table.get_many([b"session", b"forever"]) == {b"forever": b"x"}
    assert [key for key in table] == [b"forever"]
    assert table.stats()["len"] == 2  # reading reclaims nothing...
    assert len(table) == 1  # ...len() reclaims first
    assert list(table) == [b"forever"] and dict(table.items()) == {b"forever": b"x"}
    assert list(table.values()) == [b"x"]
    stats = table.stats()
    assert stats["len"] == 1 and stats["expirations"] == 1
    table.check()


def test_writes_see_an_expired_key_as_absent(table, clock) -> None:
    for key in (b"add", b"incr", b"pop", b"setdefault", b"cas", b"touch", b"expire"):
        table.set(key, b"old-value", ttl=1)
    clock.advance(1)
    assert table.add(b"add", b"new") is True and table.ttl(b"add") is None
    assert table.incr(b"incr", 5, initial=10) == 15
    assert table.pop(b"pop", b"default") == b"default"
    assert table.setdefault(b"setdefault", b"fresh") == b"fresh"
    assert table.compare_and_swap(b"cas", b"old-value", b"new") is False
    assert table.touch(b"touch", 10) is False and b"touch" not in table
    assert table.expire(b"expire", 10) is False
    assert table.stats()["expirations"] == 7  # each write reclaimed what it met
    table.check()


def test_ttl_arguments(table, clock) -> None:
    table.set(b"a", b"1", ttl=timedelta(minutes=2))
    assert table.ttl(b"a") == 120.0
    table.set(b"f", b"1", ttl=Fraction(3, 2))  # any real number
    assert table.ttl(b"f") == 1.5
    table.set(b"b", b"1", ttl=1e-9)  # one nanosecond: valid, expired at the next tick
    assert table.ttl(b"b") == 1e-9
    for bad in (0, -1, float("nan"), float("inf"), 2**62, timedelta(0)):
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            table.set(b"c", b"1", ttl=bad)
    for bad in ("10", True, b"1"):
        with pytest.raises(TypeError, match="ttl must be seconds"):
            table.add(b"c", b"1", ttl=bad)
    with pytest.raises(ValueError, match="either ttl or keep_ttl"):
        table.set(b"a", b"2", ttl=5, keep_ttl=True)
    with pytest.raises(ValueError):
        table.incr(b"n", ttl=-5)
    with pytest.raises(ValueError):
        table.touch(b"a", 0)
    assert b"c" not in table and b"n" not in table and table[b"a"] == b"1"


def test_set_replaces_the_deadline_unless_told_to_keep_it(table, clock) -> None:
    table.set(b"k", b"v1", ttl=10)
    table.set(b"k", b"v2")  # as Redis's SET: a plain overwrite never expires
    assert table.ttl(b"k") is None
    table.set(b"k", b"v3", ttl=10)
    clock.advance(4)
    table.set(b"k", b"v4", keep_ttl=True)
    assert table[b"k"] == b"v4" and table.ttl(b"k") == 6.0
    table[b"k"] = b"v5"
    assert table.ttl(b"k") is None
    table.set(b"new", b"v", keep_ttl=True)  # nothing to keep: never expires
    assert table.ttl(b"new") is None


def test_compare_and_swap_sets_or_keeps_the_deadline(table, clock) -> None:
    table.set(b"k", b"a", ttl=10)
    assert table.compare_and_swap(b"k", b"a", b"b", keep_ttl=True)
    assert table.ttl(b"k") == 10.0
    assert table.compare_and_swap(b"k", b"b", b"c", ttl=3)
    assert table.ttl(b"k") == 3.0
    assert table.compare_and_swap(b"k", b"c", b"d")
    assert table.ttl(b"k") is None
    assert table.compare_and_swap(b"absent", None, b"x", ttl=7)  # None: add
    assert table.ttl(b"absent") == 7.0


def test_incr_ttl_starts_with_the_counter_fixed_window(table, clock) -> None:
    """The rate-limit pattern: the first hit of a window creates the counter with the
    window's ttl; later hits count without moving the deadline; then a new window starts."""
    assert [table.incr(b"hits", ttl=60) for _ in range(3)] == [1, 2, 3]
    assert table.ttl(b"hits") == 60.0
    clock.advance(59)
    assert table.incr(b"hits", ttl=60) == 4 and table.ttl(b"hits") == 1.0
    clock.advance(1)
    assert table.incr(b"hits", ttl=60) == 1 and table.ttl(b"hits") == 60.0


def test_touch_slides_and_expire_sets_or_drops_the_deadline(table, clock) -> None:
    table.set(b"session", b"s", ttl=30)
    for _ in range(10):  # used every 20 s: it outlives its first 30 s many times over
        clock.advance(20)
        assert table.touch(b"session", 30) is True
    assert table[b"session"] == b"s" and table.ttl(b"session") == 30.0
    clock.advance(30)
    assert table.touch(b"session", 30) is False and b"session" not in table

    table[b"k"] = b"v"
    assert table.expire(b"k", 5) is True and table.ttl(b"k") == 5.0
    assert table.expire(b"k", None) is True and table.ttl(b"k") is None  # Redis's PERSIST
    assert table.expire(b"absent", 5) is False and b"absent" not in table
    table.check()


def test_set_many_ttl_and_get_many(table, clock) -> None:
    table.set_many({b"a": b"1", b"b": b"2"}, ttl=5)
    table.set_many({b"c": b"3"})
    assert table.ttl(b"a") == table.ttl(b"b") == 5.0 and table.ttl(b"c") is None
    clock.advance(5)
    assert table.get_many([b"a", b"b", b"c"]) == {b"c": b"3"}
    assert table.popitem() == (b"c", b"3")
    with pytest.raises(KeyError):
        table.popitem()


def test_purge_expired(table, clock) -> None:
    for i, key in enumerate(keys(10)):
        table.set(key, b"v", ttl=i + 1)
    table[b"keep"] = b"v"
    assert table.purge_expired() == 0
    clock.advance(4)
    assert table.purge_expired() == 4
    assert table.purge_expired() == 0
    stats = table.stats()
    assert stats["len"] == 7 and stats["expirations"] == 4
    assert sorted(table) == keys(10)[4:] + [b"keep"]
    table.check()


def test_next_expiry_set_too_low_costs_a_walk_not_an_error(table, clock) -> None:
    """Deleting the key with the earliest deadline leaves the header's lower bound behind;
    a purge then finds nothing, says so, and sets the bound right."""
    table.set(b"early", b"v", ttl=1)
    table.set(b"late", b"v", ttl=100)
    del table[b"early"]
    clock.advance(2)
    assert table.purge_expired() == 0 and len(table) == 1
    table.check()


def test_a_next_expiry_above_a_deadline_fails_the_check(table, clock) -> None:
    table.set(b"k", b"v", ttl=10)
    raw = _segment.open_segment(table.name, create=False, track=False)
    try:
        struct.pack_into("=Q", raw.buf, lib.shmkv_testing_offset(b"next_expiry"), 0)
        with pytest.raises(shmkv.CheckFailed, match="invariant 11") as info:
            table.check()
        assert info.value.invariant == 11
    finally:
        raw.close()


# ---------------------------------------------------------------------- a full table


def test_a_full_table_reclaims_expired_room_before_refusing(make_name, clock) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=8, value_size=8) as t:
        t.set(b"short", b"v", ttl=1)
        t.set_many({b"a": b"v", b"b": b"v", b"c": b"v"})
        with pytest.raises(shmkv.TableFull):
            t[b"new"] = b"v"
        clock.advance(1)
        t[b"new"] = b"v"  # the expired key's room
        assert sorted(t) == [b"a", b"b", b"c", b"new"]
        assert t.stats()["expirations"] == 1 and t.stats()["evictions"] == 0
        with pytest.raises(shmkv.TableFull):
            t[b"more"] = b"v"
        t.check()
        t.unlink()


def test_a_big_full_table_finds_expired_room_behind_and_ahead_of_the_purge(make_name,
                                                                           clock) -> None:
    """The purge walks a big pool in rounds and turns (csrc/table.c, EXPIRY): an insert finds
    expired room ahead of where the last one stopped, and behind it, in the next turn."""
    n = 10_000  # more than two rounds of the walk
    with shmkv.create(make_name(), capacity=n, key_size=8, value_size=8, reserve=False) as t:
        t.set(b"behind", b"v", ttl=3)  # entry 0
        t.set_many({b"%07d" % i: b"v" for i in range(1, 100)})
        t.set(b"early", b"v", ttl=1)  # entry 100
        t.set_many({b"%07d" % i: b"v" for i in range(101, n)})
        clock.advance(1)
        t[b"x"] = b"v"  # reclaims "early"; the walk stops a round later
        t.check()
        clock.advance(2.5)  # "behind" expires behind the walk: the turn ends, another starts
        t[b"y"] = b"v"
        assert b"behind" not in t and b"early" not in t and len(t) == n
        assert t.stats()["expirations"] == 2
        with pytest.raises(shmkv.TableFull):
            t[b"z"] = b"v"
        t.check()
        t.unlink()


def test_set_many_reclaims_expired_room_too(make_name, clock) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=8, value_size=8) as t:
        t.set_many({b"a": b"v", b"b": b"v"}, ttl=1)
        t.set_many({b"c": b"v", b"d": b"v"})
        clock.advance(1)
        t.set_many({b"e": b"v", b"f": b"v"})
        assert sorted(t) == [b"c", b"d", b"e", b"f"]
        t.check()
        t.unlink()


def test_eviction_keeps_recently_read_keys_and_evicts_cold_ones(evicting) -> None:
    t = evicting
    old = keys(8)
    for key in old:
        t[key] = b"value of " + key
    hot = old[::2]
    for key in hot:
        assert t[key] == b"value of " + key
    new = keys(4, b"n")
    assert [t.set(key, b"new") for key in new] == [True] * 4  # each evicted a live key
    assert sorted(t) == sorted(hot + new)
    stats = t.stats()
    assert stats["evictions"] == 4 and stats["len"] == 8 and stats["on_full"] == "evict"
    assert t.set(b"n00", b"overwrite") is False  # an overwrite needs no room
    t.check()


def test_eviction_gives_every_key_a_second_chance_then_goes_round(evicting) -> None:
    """With every key read, the hand clears every bit and then evicts in pool order; it
    goes on from where it stopped, so a run of inserts evicts a run of old keys."""
    t = evicting
    old = keys(8)
    for key in old:
        t[key] = b"v"
    t.get_many(old)
    for i, key in enumerate(keys(8, b"n")):
        assert t.set(key, b"v") is True
        assert sorted(t) == sorted(old[i + 1:] + keys(i + 1, b"n"))
    assert t.stats()["evictions"] == 8
    t.check()


def test_eviction_takes_expired_keys_first(evicting, clock) -> None:
    t = evicting
    for key in keys(8):
        t.set(key, b"v", ttl=None if key != b"k05" else 1)
    clock.advance(1)
    assert t.set(b"new", b"v") is False  # room from the expired key: nothing live evicted
    assert b"k05" not in t and len(t) == 8
    stats = t.stats()
    assert stats["evictions"] == 0 and stats["expirations"] == 1


@pytest.mark.parametrize("use", ["touch", "incr", "overwrite", "setdefault"])
def test_other_uses_count_for_eviction(evicting, use: str) -> None:
    t = evicting
    for key in keys(8):
        t[key] = (0).to_bytes(8, "little")
    {"touch": lambda: t.touch(b"k00", 60), "incr": lambda: t.incr(b"k00"),
     "overwrite": lambda: t.set(b"k00", b"again"),
     "setdefault": lambda: t.setdefault(b"k00", b"x")}[use]()
    t[b"new"] = b"v"
    assert b"k00" in t and b"k01" not in t


def test_every_insert_can_evict(evicting) -> None:
    t = evicting
    for key in keys(8):
        t[key] = b"v"
    assert t.add(b"added", b"v") is True
    assert t.incr(b"counter") == 1
    assert t.setdefault(b"default", b"d") == b"d"
    assert t.compare_and_swap(b"cas", None, b"v") is True
    assert len(t) == 8 and t.stats()["evictions"] == 4
    for key in (b"added", b"counter", b"default", b"cas"):
        assert key in t
    t.check()


def test_set_many_never_evicts_its_own_keys(evicting) -> None:
    t = evicting
    for key in keys(8):
        t[key] = b"v"
    t.get_many(keys(8))  # every bit set: the hand will go all the way round
    batch = {key: b"batch" for key in keys(3)[1:] + keys(6, b"n")}
    t.set_many(batch)
    assert {k: t[k] for k in batch} == batch and len(t) == 8
    t.check()
    with pytest.raises(shmkv.TableFull):  # more keys than the table holds: all or nothing
        t.set_many({key: b"x" for key in keys(9, b"z")})
    assert {k: t[k] for k in batch} == batch


def test_a_one_entry_table_evicts_its_only_key(make_name) -> None:
    with shmkv.create(make_name(), capacity=1, key_size=4, value_size=4, on_full="evict") as t:
        for i in range(20):
            t[b"%d" % i] = b"v"
            assert list(t) == [b"%d" % i]
        t.check()
        t.unlink()


def test_on_full_is_checked_and_seen_by_attachers(make_name, evicting) -> None:
    with pytest.raises(ValueError, match="on_full must be"):
        shmkv.create(make_name(), capacity=4, on_full="lru")
    with shmkv.attach(evicting.name) as other:
        assert other.on_full == "evict" and other.stats()["on_full"] == "evict"
        for key in keys(9):
            other[key] = b"v"  # the attacher evicts too
    assert len(evicting) == 8


# ---------------------------------------------------------------------- the real clock


def test_expiry_real_time(table) -> None:
    ttl = 0.5
    before = time.monotonic()
    table.set(b"k", b"v", ttl=ttl)
    after = time.monotonic()
    table[b"forever"] = b"x"
    left = table.ttl(b"k")
    seen = time.monotonic()
    if seen < before + ttl:  # not yet expired, whatever the machine's load
        assert left is not None and 0 < left <= ttl
    sleep_past(after + ttl)
    assert table.get(b"k") is None and b"k" not in table
    assert list(table) == [b"forever"] and len(table) == 1
    assert table.stats()["expirations"] == 1


def test_sliding_expiry_real_time(table) -> None:
    """A session touched every 0.1 s with a 0.4 s ttl lives for a second and more; left
    alone, it is gone 0.4 s after its last touch."""
    ttl = 0.4
    table.set(b"session", b"s", ttl=ttl)
    last = time.monotonic()
    started = last
    while time.monotonic() - started < 1.2:
        time.sleep(0.1)  # the time between two uses of a session: what this test is about
        before = time.monotonic()
        touched = table.touch(b"session", ttl)
        if before - last < ttl:  # the last touch's deadline had not passed
            assert touched
        if not touched:
            table.set(b"session", b"s", ttl=ttl)  # an overloaded machine slept too long
        last = time.monotonic()
    sleep_past(last + ttl)
    assert b"session" not in table


# ---------------------------------------------------------------------- a second process


def observe(name: str, deadline_bounds: tuple[float, float], conn) -> None:
    """In a child: report what the child sees of b"k" at a moment the parent chooses."""
    t = shmkv.attach(name)
    earliest, latest = deadline_bounds
    while conn.poll(JOIN_TIMEOUT):
        what = conn.recv()
        if what == "stop":
            break
        start = time.monotonic()
        value = t.get(b"k")
        end = time.monotonic()
        if what == "expiry":
            # Present only before the deadline, absent only after it.
            ok = (value == b"v" and start < latest) or (value is None and end >= earliest)
            conn.send((ok, value, t.get(b"forever")))
        else:  # "eviction": which keys survive
            conn.send(sorted(t))
    t.close()


def test_expiry_and_eviction_seen_alike_by_another_process(mp_context, make_name) -> None:
    name = make_name()
    with shmkv.create(name, capacity=4, key_size=8, value_size=8, on_full="evict") as t:
        t[b"forever"] = b"x"
        ttl = 0.5
        before = time.monotonic()
        t.set(b"k", b"v", ttl=ttl)
        after = time.monotonic()
        parent, child = mp_context.Pipe()
        p = mp_context.Process(target=observe, args=(name, (before + ttl, after + ttl), child))
        p.start()
        try:
            parent.send("expiry")
            assert parent.poll(JOIN_TIMEOUT)
            ok, _, forever = parent.recv()
            assert ok and forever == b"x"
            sleep_past(after + ttl)  # the child waits on the pipe, not on a clock
            parent.send("expiry")
            assert parent.poll(JOIN_TIMEOUT)
            assert parent.recv() == (True, None, b"x")
            # Eviction: the parent reads two keys and inserts two; the child sees the same.
            for key in (b"a", b"b", b"c"):
                t[key] = b"v"
            t.get(b"forever"), t.get(b"b")
            t[b"d"], t[b"e"] = b"v", b"v"
            parent.send("eviction")
            assert parent.poll(JOIN_TIMEOUT)
            assert parent.recv() == sorted(t) == [b"b", b"d", b"e", b"forever"]
            parent.send("stop")
        finally:
            assert join_all([p]) == [0]
        assert t.stats()["evictions"] == 2
        t.unlink()


def test_set_many_from_c_with_a_repeated_key_leaves_no_pin(make_name) -> None:
    """The C API asks for distinct keys (Python's set_many makes them so); a caller that
    repeats one gets a refusal or a store, never a key pinned for good."""
    from shmkv._core import ffi, lib

    with shmkv.create(make_name(), capacity=2, key_size=4, value_size=8,
                      on_full="evict") as t:
        t[b"K"], t[b"X"] = b"k", b"x"
        ones = ffi.new("uint32_t[]", [1, 1, 1])
        rc = lib.shmkv_set_many(t._h, 3, b"KKY", ones, b"abc", ones, 0,
                                ffi.new("uint64_t[]", 6))
        assert rc in (0, lib.SHMKV_EFULL)
        t.check()
        for i in range(4):
            t[b"n%d" % i] = b"v"
        assert len(t) == 2 and b"n3" in t and b"K" not in t  # K was evictable like any other
        t.unlink()
