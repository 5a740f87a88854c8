"""Values of any size: room taken by real lengths, memory= caps the segment, TableFull says
whether keys or bytes ran out, freed room serves every size (coalescing, compaction), and
nothing a write refuses changes the table."""

from __future__ import annotations

import random

import pytest
from shmkv._core import ffi, lib

import shmkv


def geometry(capacity: int, key_size: int, value_size: int, memory: int = 0) -> object:
    g = ffi.new("struct shmkv_geometry *")
    lib.shmkv_layout(capacity, key_size, value_size, memory, g)
    return g


def block(klen: int, vlen: int) -> int:
    """Bytes an entry takes in the data area: a 32-byte header, the key padded to 8, the
    value, the whole rounded up to 16."""
    return (32 + (klen + 7) // 8 * 8 + vlen + 15) // 16 * 16


@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("48MiB", 48 * 2**20), ("2GB", 2 * 10**9),
    ("64k", 64_000), ("1.5 KiB", 1536), ("10 mb", 10**7), ("1TiB", 2**40), ("7B", 7),
])
def test_parse_size(text: object, expected: int) -> None:
    assert shmkv.parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-5", "0", "1e3", "0.1", "1,000"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        shmkv.parse_size(text)


@pytest.mark.parametrize("value", [None, 1.5, True, [1]])
def test_parse_size_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        shmkv.parse_size(value)  # type: ignore[arg-type]


def test_memory_caps_the_segment_and_values_take_their_real_size(make_name) -> None:
    """The README's session table asked for values up to 64 KiB: 100,000 fixed slots of that
    size would take 6.5 GB; with memory="16MiB" the file is 16 MiB, and sessions of 300
    bytes take about 380 bytes each, while a 64 KiB value still fits."""
    with shmkv.create(make_name(), capacity=100_000, key_size=64, value_size=65536,
                      memory="16MiB", reserve=False) as t:
        stats = t.stats()
        assert stats["segment_size"] <= 16 * 2**20 == t.memory == stats["memory"]
        session = bytes(300)
        for i in range(20_000):
            t[b"session:%032d" % i] = session
        t[b"big"] = bytes(65536)
        stats = t.stats()
        assert stats["bytes_stored"] == 20_000 * (8 + 32 + 300) + 3 + 65536
        assert stats["bytes_used"] == 20_000 * block(40, 300) + block(3, 65536)
        assert stats["bytes_used"] + stats["bytes_free"] == stats["data_size"]
        t.check()
        t.unlink()


def test_without_memory_the_table_is_sized_for_capacity_entries_of_the_largest_size(
        make_name) -> None:
    """Existing code keeps its guarantee: after any churn of mixed sizes, capacity keys of
    the largest size still fit (compaction gathers the room wherever it lies)."""
    rng = random.Random(7)
    with shmkv.create(make_name(), capacity=20, key_size=8, value_size=1000) as t:
        assert t.memory is None
        for _ in range(3000):
            key = b"k%d" % rng.randrange(40)
            if rng.random() < 0.3:
                t.pop(key, None)
            elif len(t) < 20 or key in t:
                t[key] = bytes(rng.choice((1, 10, 100, 333, 1000)))
        t.check()
        t.clear()
        for i in range(20):
            t[b"full%02d" % i] = bytes(1000)
        for i in range(20):  # and each can be overwritten when the table is full
            t[b"full%02d" % i] = b"x" * 1000
        t.check()
        t.unlink()


def test_memory_too_small_names_the_minimum(make_name) -> None:
    g = geometry(1000, 64, 4096)
    minimum = g.data_offset + 1000 * 32 + 2 * block(64, 4096)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=f"at least {minimum:,} bytes"):
        shmkv.create(make_name(), capacity=1000, key_size=64, value_size=4096,
                     memory=minimum - 1)
    with shmkv.create(make_name(), capacity=1000, key_size=64, value_size=4096,
                      memory=minimum) as t:
        t[b"k" * 64] = bytes(4096)  # the smallest table still takes a largest entry
        t[b"k" * 64] = b"x" * 4096  # and its overwrite by another
        t.unlink()


def test_memory_too_large_is_refused(make_name) -> None:
    with pytest.raises(ValueError, match="too large"):
        shmkv.create(make_name(), capacity=10, memory="100TiB")
    with pytest.raises(TypeError):
        shmkv.create(make_name(), capacity=10, memory=1.5)  # type: ignore[arg-type]


def test_memory_in_a_url(make_name) -> None:
    name = make_name()
    t = shmkv.connect(f"shm://{name}?capacity=1000&value_size=65536&memory=2MiB")
    assert isinstance(t, shmkv.Table)
    assert t.memory == 2 * 2**20 and t.stats()["segment_size"] <= 2 * 2**20
    again = shmkv.connect(f"shm://{name}?capacity=1000&value_size=65536&memory=2MiB")
    assert again.memory == t.memory
    with pytest.raises(shmkv.IncompatibleTable, match="memory"):
        shmkv.connect(f"shm://{name}?capacity=1000&value_size=65536&memory=3MiB")
    with pytest.raises(ValueError, match="memory"):
        shmkv.connect(f"shm://{name}?memory=3MiB")  # creating options need capacity
    again.close()
    t.unlink()
    t.close()


def tight(make_name, data: int, capacity: int = 10, value_size: int = 4096,
          **options: object) -> shmkv.Table:
    """A table whose data area has `data` bytes (at least capacity x 32 + two largest
    entries, the smallest there is)."""
    g = geometry(capacity, 16, value_size)
    return shmkv.create(make_name(), capacity=capacity, key_size=16, value_size=value_size,
                        memory=g.data_offset + data, **options)  # type: ignore[attr-defined]


def test_table_full_says_whether_keys_or_bytes_ran_out(make_name) -> None:
    with shmkv.create(make_name(), capacity=2, key_size=8, value_size=64) as t:
        t[b"a"], t[b"b"] = b"1", b"2"
        with pytest.raises(shmkv.TableFull, match="capacity of 2 keys") as keys:
            t[b"c"] = b"3"
        assert keys.value.kind == "keys" and keys.value.code_name == "SHMKV_EFULL"
        t.unlink()
    with tight(make_name, 8704) as t:
        t[b"a"], t[b"A"] = bytes(4096), bytes(4096)  # 8,288 bytes: 416 left
        with pytest.raises(shmkv.TableFull, match="no more bytes") as room:
            t[b"b"] = bytes(500)
        assert room.value.kind == "bytes" and room.value.code_name == "SHMKV_ENOROOM"
        assert "8,704-byte data area" in str(room.value)
        t.unlink()


def test_a_refused_write_changes_nothing(make_name) -> None:
    """Inserts, overwrites, batches and counters that find no bytes leave every key as it
    was, the old value of an overwritten key included."""
    with tight(make_name, 8704) as t:
        t.update({b"a": bytes(1500), b"b": bytes(1500), b"c": b"c" * 1000,
                  b"big": bytes(4096)})  # 400 bytes left
        before = dict(t.items())
        for write in (lambda: t.__setitem__(b"d", bytes(1000)),
                      lambda: t.__setitem__(b"c", bytes(1200)),
                      lambda: t.set_many({b"x": bytes(300), b"y": bytes(300), b"z": bytes(300)}),
                      lambda: t.setdefault(b"d", bytes(1000)),
                      lambda: t.compare_and_swap(b"c", b"c" * 1000, bytes(1200))):
            with pytest.raises(shmkv.TableFull) as info:
                write()
            assert info.value.kind == "bytes"
            assert dict(t.items()) == before
            t.check()
        t.unlink()


def test_freed_room_serves_every_size(make_name) -> None:
    """No calcification: room freed by small values holds a large one and the other way
    round, however scattered it was (coalescing, then compaction)."""
    with tight(make_name, 16 * 1024, capacity=120) as t:
        smalls = {b"s%03d" % i: bytes(100) for i in range(100)}
        t.update(smalls)
        for i in range(0, 100, 2):  # free every other one: 50 holes of 160 bytes
            del t[b"s%03d" % i]
        free = t.stats()["bytes_free"]
        assert t.stats()["largest_free"] < 4096 < free
        t[b"large"] = bytes(4096)  # fits only once the holes are gathered
        stats = t.stats()
        assert stats["compactions"] >= 1 and stats["moved_bytes"] > 0
        assert all(t[b"s%03d" % i] == bytes(100) for i in range(1, 100, 2))
        t.check()
        del t[b"large"]
        for i in range(0, 100, 2):  # and the large one's room takes small ones again
            t[b"s%03d" % i] = bytes(100)
        assert len(t) == 100
        t.check()
        t.unlink()


def test_eviction_makes_room_for_bytes(make_name) -> None:
    """An evicting table evicts cold keys until the new item fits, never one that was just
    read, nor the key being overwritten, nor a key of the same batch."""
    with tight(make_name, 12 * 1024, capacity=60, on_full="evict") as t:
        for i in range(59):
            t[b"k%02d" % i] = bytes(150)  # 59 blocks of 208 bytes: 16 bytes are left
        t[b"k39"]  # used: the hand passes over it once
        t[b"large"] = bytes(3000)
        stats = t.stats()
        assert 10 <= stats["evictions"] <= 20 and b"k39" in t and t[b"large"] == bytes(3000)
        t[b"k39"] = bytes(4000)  # an overwrite that needs room evicts others, not itself
        assert t[b"k39"] == bytes(4000)
        batch = {b"b%d" % i: bytes(1000) for i in range(6)}
        t.set_many(batch)
        assert all(t[k] == v for k, v in batch.items())
        t.check()
        with pytest.raises(shmkv.TableFull) as info:  # a batch larger than the whole area
            t.set_many({b"c%d" % i: bytes(4096) for i in range(3)})
        assert info.value.kind == "bytes"
        t.check()
        t.unlink()


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_a_dict(make_name, seed: int) -> None:
    """Random writes of random sizes against a dict model, with the invariant check (which
    covers the allocator: blocks tile the area, free lists, byte counts) after each step."""
    rng = random.Random(seed)
    model: dict[bytes, bytes] = {}
    evict = seed % 2 == 1
    with tight(make_name, 10 * 1024, capacity=40, on_full="evict" if evict else "error") as t:
        for step in range(600):
            key = b"k%02d" % rng.randrange(30)
            size = rng.choice((0, 1, 8, 50, 200, 700, 2000, 4096))
            action = rng.random()
            batch = action >= 0.7 and action < 0.8
            try:
                if action < 0.5:
                    t[key] = bytes([step % 256]) * size
                    model[key] = bytes([step % 256]) * size
                elif action < 0.7:
                    assert t.pop(key, None) == model.pop(key, None)
                elif action < 0.8:
                    batch = {b"m%d" % rng.randrange(5): bytes(size) for _ in range(3)}
                    t.set_many(batch)
                    model.update(batch)
                elif action < 0.85:
                    t.incr(b"counter")
                    model[b"counter"] = (int.from_bytes(model.get(b"counter", bytes(8)),
                                                        "little", signed=True) + 1
                                         ).to_bytes(8, "little", signed=True)
                else:
                    assert t.get(key) in (model.get(key), None if evict else model.get(key))
            except shmkv.TableFull as exc:
                # An evicting table takes any single write; only a batch can be too large.
                assert exc.kind == "bytes" and (batch or not evict)
            if evict:  # evictions remove keys from the table, not from the model
                model = {k: v for k, v in model.items() if k in t}
            assert dict(t.items()) == model
            if step % 10 == 0:
                t.check()
        t.check()
        t.unlink()


def test_stats_and_inspect_show_the_room(make_name) -> None:
    from shmkv import cli

    with tight(make_name, 4096, value_size=1024) as t:
        t[b"a"] = bytes(1000)
        t[b"b"] = bytes(1000)
        del t[b"a"]
        stats = t.stats()
        assert stats["bytes_stored"] == 1001
        assert stats["bytes_free"] == 4096 - block(1, 1000)
        assert stats["free_blocks"] == 2 and stats["largest_free"] == 4096 - 2 * block(1, 1000)
        assert stats["largest_item"] == stats["bytes_free"] - 32
        assert stats["fragmentation"] == pytest.approx(
            1 - stats["largest_free"] / stats["bytes_free"])
        text = cli.format_table({**cli.describe(t), "probe_lengths": [1]})
        assert "1,001 B of keys and values" in text
        assert "2 free blocks" in text and "fragmented" in text
        t.unlink()


def test_the_gunicorn_hooks_default_table_fits_dockers_dev_shm(make_name) -> None:
    """Docker gives a container 64 MB of /dev/shm: the default table takes at most that and
    holds 50,000 sessions of 300 bytes, and still accepts a 64 KiB one, evicting nothing."""
    from shmkv.contrib.gunicorn_conf import DEFAULT_OPTIONS

    t = shmkv.connect(f"shm://{make_name()}?{DEFAULT_OPTIONS}")
    assert isinstance(t, shmkv.Table)
    try:
        assert t.stats()["segment_size"] <= 48 * 2**20 < 64 * 10**6
        session = bytes(300)
        t.set_many({b"session:%035d" % i: session for i in range(50_000)})
        t[b"session:large"] = bytes(65536)
        stats = t.stats()
        assert stats["len"] == 50_001 and stats["evictions"] == 0
        t.check()
    finally:
        t.unlink()
        t.close()
