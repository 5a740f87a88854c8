"""Single-process behaviour of Table: everything a dict of bytes does, and the extras."""

from __future__ import annotations

import pytest

import shmkv


def test_behaves_like_a_dict(table: shmkv.Table) -> None:
    """A sequence of dict operations gives the same results on a Table and on a dict."""
    model: dict[bytes, bytes] = {}
    for t in (table, model):
        t[b"a"] = b"1"
        t[b"b"] = b"2"
        t[b"a"] = b"3"
        del t[b"b"]
        t.update({b"c": b"4", b"d": b"5"})
    assert dict(table) == model
    assert len(table) == len(model) == 3
    assert sorted(table) == sorted(model)
    assert sorted(table.keys()) == sorted(model.keys())
    assert sorted(table.values()) == sorted(model.values())
    assert sorted(table.items()) == sorted(model.items())
    assert table == model
    assert (b"a", b"3") in table.items()
    assert b"3" in table.values()
    assert b"a" in table and b"zz" not in table
    assert table.get(b"a") == b"3" and table.get(b"zz") is None and table.get(b"zz", 7) == 7
    assert table.pop(b"a") == model.pop(b"a")
    assert table.pop(b"a", b"gone") == b"gone"
    assert table.setdefault(b"e", b"6") == model.setdefault(b"e", b"6")
    assert table.setdefault(b"e", b"7") == b"6"
    key, value = table.popitem()
    assert model.pop(key) == value
    assert dict(table) == model
    table.clear()
    assert len(table) == 0 and list(table) == [] and dict(table) == {}


def test_missing_keys_raise_keyerror(table: shmkv.Table) -> None:
    with pytest.raises(KeyError):
        table[b"nope"]
    with pytest.raises(KeyError):
        del table[b"nope"]
    with pytest.raises(KeyError):
        table.pop(b"nope")
    table.clear()
    with pytest.raises(KeyError):
        table.popitem()


def test_empty_key_and_empty_value(table: shmkv.Table) -> None:
    table[b""] = b""
    assert table[b""] == b"" and b"" in table and len(table) == 1


def test_values_and_keys_of_every_length(table: shmkv.Table) -> None:
    for n in range(table.key_size + 1):
        key = bytes(range(n))
        value = bytes([n]) * min(n * 2, table.value_size)
        table[key] = value
    for n in range(table.key_size + 1):
        assert table[bytes(range(n))] == bytes([n]) * min(n * 2, table.value_size)
    table.check()


def test_bytes_like_arguments(table: shmkv.Table) -> None:
    table[bytearray(b"k1")] = memoryview(b"v1")
    table[memoryview(b"k2")] = bytearray(b"v2")
    assert table[b"k1"] == b"v1" and table[bytearray(b"k2")] == b"v2"
    assert memoryview(b"k1") in table
    assert isinstance(table[b"k1"], bytes)


def test_add(table: shmkv.Table) -> None:
    assert table.add(b"k", b"first") is True
    assert table.add(b"k", b"second") is False
    assert table[b"k"] == b"first"


def test_incr(table: shmkv.Table) -> None:
    assert table.incr(b"n") == 1
    assert table.incr(b"n", 10) == 11
    assert table.incr(b"n", -20) == -9
    assert table.incr(b"m", 5, initial=100) == 105
    assert int.from_bytes(table[b"n"], "little", signed=True) == -9
    table[b"s"] = b"text"
    with pytest.raises(shmkv.NotACounter):
        table.incr(b"s")
    assert table[b"s"] == b"text"
    table[b"big"] = (2**63 - 1).to_bytes(8, "little", signed=True)
    with pytest.raises(shmkv.CounterOverflow):
        table.incr(b"big")
    assert table.incr(b"big", 0) == 2**63 - 1
    with pytest.raises(OverflowError):
        table.incr(b"n", 2**63)
    with pytest.raises(TypeError):
        table.incr(b"n", 1.5)  # type: ignore[arg-type]
    assert table.incr(b"n", 0) == -9


def test_compare_and_swap(table: shmkv.Table) -> None:
    assert table.compare_and_swap(b"k", b"x", b"y") is False
    assert b"k" not in table
    assert table.compare_and_swap(b"k", None, b"v1") is True
    assert table.compare_and_swap(b"k", None, b"v2") is False
    assert table.compare_and_swap(b"k", b"wrong", b"v2") is False
    assert table.compare_and_swap(b"k", b"v1", b"v2") is True
    assert table[b"k"] == b"v2"


def test_get_many_and_set_many(table: shmkv.Table) -> None:
    table.set_many({b"a": b"1", b"b": b"2"})
    table.set_many([(b"c", b"3"), (bytearray(b"a"), b"11")])
    assert table.get_many([b"a", b"b", b"c", b"missing"]) == {b"a": b"11", b"b": b"2", b"c": b"3"}
    assert table.get_many([]) == {}
    table.set_many({})
    hits = table.stats()["hits"]
    table.get_many([b"a", b"nope"])
    assert table.stats()["hits"] == hits + 1


def test_set_many_is_all_or_nothing(make_name) -> None:
    with shmkv.create(make_name(), capacity=3, key_size=8, value_size=8) as t:
        t[b"a"] = b"1"
        with pytest.raises(shmkv.TableFull):
            t.set_many({b"a": b"x", b"b": b"2", b"c": b"3", b"d": b"4"})
        assert dict(t) == {b"a": b"1"}
        with pytest.raises(shmkv.ValueTooLarge):
            t.set_many({b"b": b"2", b"c": b"x" * 9})
        assert dict(t) == {b"a": b"1"}
        t.set_many({b"a": b"x", b"b": b"2", b"c": b"3"})
        assert dict(t) == {b"a": b"x", b"b": b"2", b"c": b"3"}
        t.check()
        t.unlink()


def test_iteration_is_a_snapshot(table: shmkv.Table) -> None:
    """Changing the table while iterating neither fails nor changes what is iterated."""
    for i in range(20):
        table[b"k%d" % i] = b"v"
    seen = []
    for key in table:
        seen.append(key)
        table.pop(b"k%d" % (19 - len(seen) + 1), None)
        table[b"new%d" % len(seen)] = b"v"
    assert sorted(seen) == sorted(b"k%d" % i for i in range(20))
    for key, value in table.items():
        del table[key]
        assert value == b"v"
    assert len(table) == 0


def test_snapshot_grows_its_buffer(make_name) -> None:
    with shmkv.create(make_name(), capacity=3000, key_size=64, value_size=64) as t:
        expected = {(b"%064d" % i): (b"%064d" % -i) for i in range(3000)}
        t.update(expected)
        assert dict(t.items()) == expected
        assert set(t) == set(expected)
        t.unlink()


def test_full_table_and_reuse_of_room(make_name) -> None:
    """Exactly capacity entries fit; overwrites still work when full; deleted room is
    reusable forever (many insert/delete cycles never exhaust the index or the pool)."""
    with shmkv.create(make_name(), capacity=10, key_size=16, value_size=16) as t:
        for i in range(10):
            t[b"k%d" % i] = b"v"
        with pytest.raises(shmkv.TableFull) as info:
            t[b"one-more"] = b"v"
        assert "capacity of 10" in str(info.value)
        with pytest.raises(shmkv.TableFull):
            t.add(b"one-more", b"v")
        with pytest.raises(shmkv.TableFull):
            t.incr(b"one-more")
        with pytest.raises(shmkv.TableFull):
            t.setdefault(b"one-more", b"v")
        assert b"one-more" not in t and len(t) == 10
        for i in range(10):
            t[b"k%d" % i] = b"overwritten %d" % i
            assert t.compare_and_swap(b"k%d" % i, b"overwritten %d" % i, b"cas")
        for cycle in range(2000):
            del t[b"k%d" % (cycle % 10)]
            t[b"x%d" % cycle] = b"v"
            t[b"k%d" % (cycle % 10)] = t.pop(b"x%d" % cycle)
        assert len(t) == 10
        t.check()
        stats = t.stats()
        assert stats["bytes_free"] + stats["bytes_used"] == stats["data_size"]
        # Ten keys of 2 bytes with 1-byte values, a 48-byte block each: nothing leaked.
        assert stats["bytes_used"] == 10 * 48 and stats["bytes_stored"] == 10 * 3
        t.unlink()


def test_stats_counters(table: shmkv.Table) -> None:
    table[b"a"] = b"1"
    table[b"a"] = b"2"
    table[b"a"]
    table.get(b"b")
    del table[b"a"]
    s = table.stats()
    assert (s["inserts"], s["updates"], s["hits"], s["misses"], s["deletes"]) == (1, 1, 1, 1, 1)
    assert s["capacity"] == 64 and s["len"] == 0 and s["recoveries"] == 0
    assert s["key_size"] == 32 and s["value_size"] == 64
    assert s["segment_size"] >= 64 * (32 + 64)
    assert s["name"] == table.name


def test_closed_table_raises(name: str) -> None:
    t = shmkv.create(name, capacity=4, key_size=8, value_size=8)
    t[b"k"] = b"v"
    t.unlink()
    with t:
        pass
    assert t.closed
    t.close()  # idempotent
    for op in (
        lambda: t[b"k"],
        lambda: t.get(b"k"),
        lambda: t.set(b"k", b"v"),
        lambda: b"k" in t,
        lambda: len(t),
        lambda: list(t),
        lambda: t.incr(b"n"),
        lambda: t.stats(),
        lambda: t.get_many([b"k"]),
        lambda: t.set_many({b"k": b"v"}),
        lambda: t.pop(b"k"),
        lambda: t.clear(),
        lambda: t.check(),
    ):
        with pytest.raises(shmkv.TableClosed):
            op()
    assert "closed" in repr(t)


def test_repr_does_not_take_the_lock(mp_context, name: str) -> None:
    """repr() reads the count without the lock: it neither waits for nor fails on another
    process that holds it."""
    from conftest import JOIN_TIMEOUT, hold_lock, join_all

    with shmkv.create(name, capacity=4, key_size=8, value_size=8, lock_timeout=0.1) as t:
        t[b"k"] = b"v"
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, False))
        holder.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            assert repr(t) == (f"<shmkv.Table {name!r} 1/4 entries, key_size=8, "
                               "value_size=8>")
        finally:
            done.set()
        assert join_all([holder]) == [0]
        t.unlink()


def test_an_observer_changes_no_counter(mp_context, name: str) -> None:
    """After _make_observer(), a handle's gets, misses, get_many and lock timeouts add
    nothing to the table's counters, not even when it is closed (the flush)."""
    from conftest import JOIN_TIMEOUT, hold_lock, join_all

    with shmkv.create(name, capacity=8, key_size=8, value_size=8, on_full="evict") as t:
        t[b"k"] = b"v"
        before = t.stats()
        look = shmkv.attach(name, lock_timeout=0.1)
        look[b"k"]  # counted: not an observer yet
        look._make_observer()  # drops that pending hit too
        for _ in range(2000):  # past the 1,024 reads after which a handle flushes
            assert look[b"k"] == b"v" and look.get(b"nope") is None and b"k" in look
        assert look.get_many([b"k", b"nope"]) == {b"k": b"v"}
        assert look.stats()["hits"] == before["hits"]
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, False))
        holder.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            with pytest.raises(shmkv.LockTimeout):
                look[b"k"] = b"w"
        finally:
            done.set()
        assert join_all([holder]) == [0]
        look.close()
        after = t.stats()
        for counter in ("hits", "misses", "lock_timeouts"):
            assert after[counter] == before[counter], counter
        t.check()
        t.unlink()


def test_check_passes_on_a_busy_table(make_name) -> None:
    with shmkv.create(make_name(), capacity=300, key_size=16, value_size=16) as t:
        for i in range(1000):
            t[b"%d" % (i * 7 % 300)] = b"%d" % i
            if i % 3 == 0:
                t.pop(b"%d" % (i * 11 % 300), None)
        t.check()
        t.unlink()


def test_lock_timeout_setting(table: shmkv.Table) -> None:
    assert table.lock_timeout == 5.0
    table.lock_timeout = 0.5
    assert table.lock_timeout == 0.5
    with pytest.raises(ValueError):
        table.lock_timeout = 0


@pytest.mark.parametrize("capacity, key_size, value_size",
                         [(1, 1, 1), (10, 8, 8), (100_000, 64, 1024), (1000, 17, 99)])
def test_memory_formula_in_readme(make_name, capacity: int, key_size: int,
                                  value_size: int) -> None:
    """Without memory=: segment_size = 1664 + slots x 8 + (capacity + 1) x
    (32 + key_size^8 + value_size)^16, each entry's block of the largest size."""
    slots = 8
    while slots <= capacity * 3 // 2:
        slots *= 2
    up = lambda n, m: (n + m - 1) // m * m  # noqa: E731
    expected = 1664 + slots * 8 + (capacity + 1) * up(32 + up(key_size, 8) + value_size, 16)
    with shmkv.create(make_name(), capacity=capacity, key_size=key_size,
                      value_size=value_size, reserve=False) as t:
        stats = t.stats()
        assert stats["segment_size"] == expected
        assert stats["index_slots"] == slots
        if capacity >= 8:  # below that, the 8-slot minimum index dominates
            overhead = stats["segment_size"] - 1664 - capacity * (key_size + value_size)
            assert overhead <= 64 * capacity
        t.unlink()


def test_threads_share_a_table(make_name) -> None:
    """The C call releases the GIL: threads of one process must each get their own value,
    never one another's (the reused output buffer is taken by one call at a time)."""
    import threading

    with shmkv.create(make_name(), capacity=64, key_size=8, value_size=512) as t:
        for i in range(8):
            t[b"k%d" % i] = bytes([i]) * 500
        errors: list[str] = []

        def reader(i: int) -> None:
            for _ in range(3000):
                for value in (t[b"k%d" % i], t.get(b"k%d" % i), t.setdefault(b"k%d" % i, b"")):
                    if value != bytes([i]) * 500:
                        errors.append(f"thread {i} read another thread's value")
                        return

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads)
        assert errors == []
        t.unlink()
