"""The table contract, on both backends: every test here runs once on a shared-memory Table
and once on a RedisTable against a real redis-server (the `store` fixture), so that code
moves from one to the other by changing a URL. What only one backend has (capacity,
eviction, the invariant check, crash recovery) is tested elsewhere."""

from __future__ import annotations

import pickle
import time

import pytest
from conftest import JOIN_TIMEOUT, join_all, sleep_past

import shmkv

I64_MAX = 2**63 - 1


def counter(t, key: bytes) -> int:
    return t.incr(key, 0)


# ---------------------------------------------------------------------- a mapping of bytes


def test_a_store_is_a_mapping_of_bytes(store) -> None:
    store[b"a"] = b"1"
    store[bytearray(b"b")] = memoryview(b"2")
    assert store[b"a"] == b"1" and store.get(b"b") == b"2"
    assert store.get(b"missing") is None and store.get(b"missing", 7) == 7
    assert b"a" in store and b"missing" not in store
    assert len(store) == 2 and sorted(store) == [b"a", b"b"]
    assert dict(store.items()) == {b"a": b"1", b"b": b"2"} == store
    assert sorted(store.values()) == [b"1", b"2"]
    with pytest.raises(KeyError):
        store[b"missing"]
    del store[b"a"]
    with pytest.raises(KeyError):
        del store[b"a"]
    assert list(store) == [b"b"]
    store[b""] = b""  # empty keys and values are keys and values
    assert store[b""] == b""


def test_set_add_pop_setdefault(store) -> None:
    assert store.set(b"k", b"v") is False  # nothing was evicted
    assert store.add(b"k", b"other") is False and store[b"k"] == b"v"
    assert store.add(b"new", b"n") is True and store[b"new"] == b"n"
    assert store.pop(b"k") == b"v" and b"k" not in store
    assert store.pop(b"k", None) is None
    with pytest.raises(KeyError):
        store.pop(b"k")
    assert store.setdefault(b"s", b"first") == b"first"
    assert store.setdefault(b"s", b"second") == b"first"


def test_whole_table_calls(store) -> None:
    store.update({b"a": b"1", b"b": b"2"})
    store.update([(b"c", b"3")])
    key, value = store.popitem()
    assert {key: value}.items() <= {b"a": b"1", b"b": b"2", b"c": b"3"}.items()
    assert len(store) == 2
    store.clear()
    assert len(store) == 0 and list(store) == []
    with pytest.raises(KeyError):
        store.popitem()
    with pytest.raises(TypeError):
        store.update(a=b"1")


def test_get_many_and_set_many(store) -> None:
    store.set_many({b"a": b"1", b"b": b"2"})
    store.set_many([(b"c", b"3")], ttl=100)
    assert store.get_many([b"a", b"c", b"missing"]) == {b"a": b"1", b"c": b"3"}
    assert store.get_many([]) == {}
    assert 0 < store.ttl(b"c") <= 100 and store.ttl(b"a") is None


def test_bad_arguments_raise_and_change_nothing(store) -> None:
    store[b"k"] = b"v"
    with pytest.raises(shmkv.KeyTooLarge) as info:
        store[b"x" * 33] = b"v"
    assert info.value.code_name == "SHMKV_EKEYSIZE" and "key_size=32" in str(info.value)
    with pytest.raises(shmkv.ValueTooLarge, match="value_size=64"):
        store.set(b"k", b"v" * 65)
    with pytest.raises(ValueError):  # both are ValueErrors too
        store.add(b"x" * 33, b"v")
    with pytest.raises(shmkv.ValueTooLarge):  # all or nothing
        store.set_many({b"a": b"1", b"b": b"v" * 65})
    with pytest.raises(TypeError, match="bytes-like"):
        store["str key"] = b"v"
    with pytest.raises(TypeError):
        store.get(42)
    assert dict(store.items()) == {b"k": b"v"}


def test_a_closed_store_says_so(store_url: str) -> None:
    t = shmkv.connect(store_url)
    t[b"k"] = b"v"
    t.close()
    t.close()  # idempotent
    assert t.closed
    for call in (lambda: t[b"k"], lambda: t.set(b"k", b"v"), lambda: len(t),
                 lambda: t.incr(b"n"), lambda: t.get_many([]), lambda: t.set_many({})):
        with pytest.raises(shmkv.TableClosed):
            call()
    with shmkv.connect(store_url) as again:
        assert again[b"k"] == b"v"  # the data outlives a handle


def test_a_pickled_store_connects_anew(store) -> None:
    store[b"k"] = b"v"
    copy = pickle.loads(pickle.dumps(store))
    try:
        assert copy is not store and copy[b"k"] == b"v"
        copy[b"k2"] = b"v2"
        assert store[b"k2"] == b"v2"
    finally:
        copy.close()


# ---------------------------------------------------------------------- atomic read-modify-write


def test_incr(store) -> None:
    assert store.incr(b"n") == 1
    assert store.incr(b"n", 41) == 42
    assert store.incr(b"n", -50) == -8
    assert store.incr(b"fresh", 5, initial=100) == 105
    assert store.incr(b"big", 0, initial=I64_MAX) == I64_MAX  # 64 bits exact, no float
    assert store.incr(b"big", -I64_MAX) == 0
    with pytest.raises(TypeError):
        store.incr(b"n", True)
    with pytest.raises(OverflowError):
        store.incr(b"n", 2**63)


def test_incr_errors_change_nothing(store) -> None:
    store[b"text"] = b"hello"
    with pytest.raises(shmkv.NotACounter):
        store.incr(b"text")
    assert store[b"text"] == b"hello"
    store.incr(b"top", 0, initial=I64_MAX)
    with pytest.raises(shmkv.CounterOverflow):
        store.incr(b"top")
    assert counter(store, b"top") == I64_MAX
    with pytest.raises(shmkv.CounterOverflow):  # a counter it would create
        store.incr(b"absent", 1, initial=I64_MAX)
    assert b"absent" not in store


def test_incr_ttl_applies_when_it_creates_the_counter(store) -> None:
    store.incr(b"window", ttl=100)
    assert 0 < store.ttl(b"window") <= 100
    store.incr(b"window", ttl=1000)  # an existing counter keeps its deadline
    assert store.ttl(b"window") <= 100
    assert counter(store, b"window") == 2


def test_compare_and_swap(store) -> None:
    assert store.compare_and_swap(b"k", None, b"v1") is True
    assert store.compare_and_swap(b"k", None, b"v2") is False
    assert store.compare_and_swap(b"k", b"nope", b"v2") is False and store[b"k"] == b"v1"
    assert store.compare_and_swap(b"k", b"v1", b"v2") is True and store[b"k"] == b"v2"
    assert store.compare_and_swap(b"absent", b"v1", b"v2") is False
    assert b"absent" not in store
    assert store.compare_and_swap(b"k", b"v2", b"v3", ttl=100) is True
    assert 0 < store.ttl(b"k") <= 100
    assert store.compare_and_swap(b"k", b"v3", b"v4", keep_ttl=True) is True
    assert 0 < store.ttl(b"k") <= 100
    assert store.compare_and_swap(b"k", b"v4", b"v5") is True
    assert store.ttl(b"k") is None  # a plain swap drops the deadline, as set does
    with pytest.raises(ValueError):
        store.compare_and_swap(b"k", b"v5", b"v6", ttl=1, keep_ttl=True)


# ---------------------------------------------------------------------- expiry


def test_ttl_expire_touch(store) -> None:
    store[b"k"] = b"v"
    assert store.ttl(b"k") is None
    with pytest.raises(KeyError):
        store.ttl(b"absent")
    # Each new deadline is far beyond the last one's bound, whatever the machine's stalls.
    assert store.expire(b"k", 100) is True and 0 < store.ttl(b"k") <= 100
    assert store.touch(b"k", 10_000) is True and 100 < store.ttl(b"k") <= 10_000
    assert store.expire(b"k", None) is True and store.ttl(b"k") is None
    assert store.expire(b"absent", 10) is False and store.touch(b"absent", 10) is False
    assert b"absent" not in store
    store.set(b"k", b"v", ttl=100)
    store.set(b"k", b"v2", keep_ttl=True)
    assert 0 < store.ttl(b"k") <= 100
    store.set(b"k", b"v3")  # a plain set drops the deadline
    assert store.ttl(b"k") is None
    for bad in (0, -1, float("nan"), "10"):
        with pytest.raises((ValueError, TypeError)):
            store.set(b"k", b"v", ttl=bad)
    assert store[b"k"] == b"v3"
    assert store.purge_expired() >= 0


def test_keys_expire_in_real_time(store) -> None:
    ttl = 0.3
    store.set(b"short", b"v", ttl=ttl)
    store.add(b"added", b"v", ttl=ttl)
    store.set_many({b"many": b"v"}, ttl=ttl)
    store.incr(b"count", ttl=ttl)
    stored = time.monotonic()
    store[b"forever"] = b"x"
    sleep_past(stored + ttl + 0.01)
    for key in (b"short", b"added", b"many", b"count"):
        assert key not in store and store.get(key) is None
    assert list(store) == [b"forever"] and len(store) == 1
    assert store.add(b"short", b"again") is True  # an expired key is absent to writes too
    assert store.incr(b"count") == 1


# ---------------------------------------------------------------------- SharedDict on top


def test_shared_dict_works_on_either(store) -> None:
    d = shmkv.SharedDict(store, codec="json")
    d["user"] = {"name": "ada", "roles": ["admin"]}
    assert d["user"] == {"name": "ada", "roles": ["admin"]}
    assert d.incr("visits") == 1 and d.incr("visits", 2) == 3
    assert d.compare_and_swap("visits", 3, 10) and d["visits"] == 10
    d.set("session", {"n": 1}, ttl=100)
    assert 0 < d.ttl("session") <= 100
    assert d.get_many(["user", "visits", "none"]) == {"user": {"name": "ada", "roles":
                                                               ["admin"]}, "visits": 10}
    assert sorted(d) == ["session", "user", "visits"]
    del d["session"]
    assert d.pop("visits") == 10 and len(d) == 1


# ---------------------------------------------------------------------- several processes


def count_up(url: str, key: bytes, n: int, start) -> None:
    with shmkv.connect(url) as t:
        start.wait(JOIN_TIMEOUT)
        for _ in range(n):
            t.incr(key)


def test_processes_share_a_store_by_its_url(store, store_url: str, mp_context) -> None:
    workers, n = 3, 200
    start = mp_context.Barrier(workers)
    procs = [mp_context.Process(target=count_up, args=(store_url, b"hits", n, start))
             for _ in range(workers)]
    for p in procs:
        p.start()
    assert join_all(procs) == [0] * workers
    assert counter(store, b"hits") == workers * n


# ---------------------------------------------------------------------- connect()


def test_connect_shm_creates_with_a_geometry_and_attaches_without(make_name) -> None:
    name = make_name()
    with pytest.raises(FileNotFoundError):
        shmkv.connect(f"shm://{name}")
    with shmkv.connect(f"shm://{name}?capacity=10&key_size=8&value_size=16&on_full=evict",
                       lock_timeout=2) as made:
        assert (made.capacity, made.key_size, made.value_size, made.on_full) == (
            10, 8, 16, "evict")
        assert made.lock_timeout == 2.0
        made[b"k"] = b"v"
        with shmkv.connect(f"shm://{name}") as attached:
            assert attached[b"k"] == b"v"
        with shmkv.connect(f"shm://{name}", capacity=10, key_size=8, value_size=16,
                           on_full="evict") as again:  # create-or-attach: attaches
            assert again[b"k"] == b"v"
        with pytest.raises(shmkv.IncompatibleTable):
            shmkv.connect(f"shm://{name}?capacity=11")


@pytest.mark.parametrize("url, message", [
    ("memcached://localhost", "must start with shm://"),
    ("shm://", "names no table"),
    ("shm://t?colour=red", "unknown option 'colour'"),
    ("shm://t?key_size=8", "needs capacity too"),
    ("shm://t?capacity=many", "must be numbers"),
    ("redis://localhost:6379/0", "names no table"),
    ("redis://localhost:6379/0?name=a*b", "invalid table name"),
    ("redis://localhost:6379/0?name=app:old", "without :"),
])
def test_connect_says_what_is_wrong_with_a_url(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shmkv.connect(url)


def test_connect_without_redis_py_says_how_to_install_it(monkeypatch) -> None:
    from shmkv import _redis

    monkeypatch.setattr(_redis, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'shmkv\[redis\]'"):
        shmkv.connect("redis://localhost:6379/0?name=t")


def test_a_redis_table_from_a_client_of_ones_own(redis_socket: str, make_name) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(unix_socket_path=redis_socket)
    t = shmkv.RedisTable(client, make_name())
    try:
        t[b"k"] = b"v"
        assert client.get(t.name.encode() + b":k") == b"v"  # NAME:key, readable by anyone
        assert t.incr(b"n", 42) == 42 and client.get(t.name + ":n") == b"42"
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(t)
        t.unlink()
        assert len(t) == 0 and not t.closed
    finally:
        t.close()


def test_a_redis_servers_own_errors_are_not_a_tables(redis_socket: str, make_name) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(unix_socket_path=redis_socket)
    with shmkv.RedisTable(client, make_name()) as t:
        client.rpush(t.name + ":list", "x")  # a key of another type, made by another client
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            t.incr(b"list")
        t.unlink()
