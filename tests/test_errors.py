"""Bad input gets a clear error and changes nothing; every C status code has its exception."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from shmkv._core import lib

import shmkv
from shmkv.errors import _ERRORS, error_for

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "shmkv_api.h"


def test_every_error_code_has_its_exception() -> None:
    codes = dict(re.findall(r"#define (SHMKV_E\w+) (-\d+)", HEADER.read_text()))
    codes.pop("SHMKV_ELAST")
    assert len(codes) == -lib.SHMKV_ELAST - 1
    for name, value in codes.items():
        assert int(value) in _ERRORS, f"{name} has no exception"
        exc = error_for(int(value))
        text = str(exc)
        assert text and "unknown" not in text, name
        if isinstance(exc, shmkv.Error):
            assert exc.code_name == name


def test_exceptions_are_also_builtins() -> None:
    assert issubclass(shmkv.KeyTooLarge, ValueError) and issubclass(shmkv.KeyTooLarge, shmkv.Error)
    assert issubclass(shmkv.ValueTooLarge, ValueError)
    assert issubclass(shmkv.LockTimeout, TimeoutError)
    assert issubclass(shmkv.TableClosed, ValueError)
    assert issubclass(shmkv.CounterOverflow, OverflowError)
    for cls in (shmkv.TableFull, shmkv.IncompatibleTable, shmkv.CorruptTable):
        assert issubclass(cls, shmkv.Error)


@pytest.mark.parametrize("bad", ["text", 42, 1.5, None, ["a"], object()])
def test_non_bytes_keys_and_values_are_typeerrors(table: shmkv.Table, bad: object) -> None:
    table[b"k"] = b"v"
    for op in (
        lambda: table[bad],
        lambda: table.get(bad),
        lambda: table.__setitem__(bad, b"v"),
        lambda: table.__setitem__(b"k", bad),
        lambda: table.add(b"new", bad),
        lambda: table.__delitem__(bad),
        lambda: bad in table,
        lambda: table.pop(bad),
        lambda: table.incr(bad),
        lambda: table.setdefault(b"new", bad),
        lambda: table.compare_and_swap(b"k", b"v", bad),
        lambda: table.get_many([b"k", bad]),
        lambda: table.set_many({b"new": bad}),
    ):
        with pytest.raises(TypeError) as info:
            op()
        assert "bytes" in str(info.value)
    assert dict(table) == {b"k": b"v"}


def test_oversize_keys_and_values_name_the_limit(table: shmkv.Table) -> None:
    table[b"k"] = b"v"
    long_key = b"x" * (table.key_size + 1)
    long_value = b"y" * (table.value_size + 1)
    for op, cls, limit in (
        (lambda: table.__setitem__(long_key, b"v"), shmkv.KeyTooLarge, "key_size=32"),
        (lambda: table.__setitem__(b"k", long_value), shmkv.ValueTooLarge, "value_size=64"),
        (lambda: table.add(b"n", long_value), shmkv.ValueTooLarge, "value_size=64"),
        (lambda: table[long_key], shmkv.KeyTooLarge, "key_size=32"),
        (lambda: table.compare_and_swap(b"k", b"v", long_value), shmkv.ValueTooLarge,
         "value_size=64"),
        (lambda: table.setdefault(b"n", long_value), shmkv.ValueTooLarge, "value_size=64"),
        (lambda: table.set_many({b"a": b"1", long_key: b"2"}), shmkv.KeyTooLarge, "key_size=32"),
        (lambda: table.get_many([long_key]), shmkv.KeyTooLarge, "key_size=32"),
    ):
        with pytest.raises(cls) as info:
            op()
        assert limit in str(info.value)
        assert str(table.key_size + 1) in str(info.value) or str(table.value_size + 1) in str(
            info.value
        )
        # Each thing once: the limit is named once, and the table by its name.
        what = limit.split("=")[0]
        assert str(info.value).count(what) == 1, str(info.value)
        assert repr(table.name) in str(info.value)
        assert info.value.code_name == ("SHMKV_EKEYSIZE" if cls is shmkv.KeyTooLarge
                                        else "SHMKV_EVALUESIZE")
    assert dict(table) == {b"k": b"v"}
    table.check()


def test_a_closed_table_says_so_once(name: str) -> None:
    t = shmkv.create(name, capacity=4, key_size=8, value_size=8)
    t.unlink()
    t.close()
    for op in (lambda: t[b"k"], lambda: t.set(b"k", b"v"), lambda: len(t)):
        with pytest.raises(shmkv.TableClosed) as info:
            op()
        assert str(info.value) == f"table {name!r} is closed"
        assert info.value.code_name == "SHMKV_ECLOSED"


@pytest.mark.parametrize("bad", [[1, 2, 3], [(b"k", b"v"), b"abc"], [(b"k",)], 5, None])
def test_set_many_says_what_it_takes(table: shmkv.Table, bad: object) -> None:
    with pytest.raises(TypeError, match=r"set_many\(\) takes a mapping or an iterable of "
                                        r"\(key, value\) pairs"):
        table.set_many(bad)  # type: ignore[arg-type]
    assert dict(table) == {}


BAD_TIMEOUTS = [float("inf"), float("-inf"), float("nan"), 1e10, 2e9, 0, 0.0, -1, -1e-10,
                True, "1", None]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_bad_lock_timeouts_are_refused_before_anything_exists(name: str, bad) -> None:
    """Not finite, not above 0, above MAX_LOCK_TIMEOUT (whose ns must fit the C core's
    int64), or not a number: a ValueError from create() that leaves nothing behind, so the
    same name can be created at once; the same from attach() and the setter."""
    with pytest.raises(ValueError, match="lock_timeout must be a number of seconds above 0"):
        shmkv.create(name, capacity=4, key_size=8, value_size=8, lock_timeout=bad)
    assert not (Path("/dev/shm") / name).exists()
    with shmkv.create(name, capacity=4, key_size=8, value_size=8) as t:
        with pytest.raises(ValueError, match="lock_timeout"):
            shmkv.attach(name, lock_timeout=bad)
        with pytest.raises(ValueError, match="lock_timeout"):
            t.lock_timeout = bad
        assert t.lock_timeout == 5.0
        t.unlink()


def test_the_largest_lock_timeout_and_a_tiny_one_are_kept(mp_context, name: str) -> None:
    """MAX_LOCK_TIMEOUT is accepted; a tiny positive timeout becomes 1 ns in C, not 0 (which
    C reads as the 5 s default), and is reported as given."""
    from conftest import JOIN_TIMEOUT, hold_lock, join_all

    from shmkv._table import MAX_LOCK_TIMEOUT, _timeout_ns

    assert _timeout_ns(1e-10) == 1 and _timeout_ns(MAX_LOCK_TIMEOUT) == 10**18 < 2**63
    with shmkv.create(name, capacity=4, key_size=8, value_size=8,
                      lock_timeout=MAX_LOCK_TIMEOUT) as t:
        t.lock_timeout = 1e-10
        ready, done = mp_context.Event(), mp_context.Event()
        holder = mp_context.Process(target=hold_lock, args=(name, ready, done, False))
        holder.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            with pytest.raises(shmkv.LockTimeout, match="waited 1e-10 s"):
                t[b"k"] = b"v"
        finally:
            done.set()
        assert join_all([holder]) == [0]
        t.unlink()


def test_a_table_that_fails_to_open_releases_its_buffer(name: str) -> None:
    """Table() refusing a segment (a bad lock_timeout, or a segment that is no table)
    releases cffi's buffer and closes the segment: no BufferError, nothing half-open."""
    from shmkv import _segment
    from shmkv._table import Table

    t = shmkv.create(name, capacity=4, key_size=8, value_size=8)
    for bad_timeout in (float("inf"), 1e10):
        segment = _segment.open_segment(name, create=False, track=False)
        with pytest.raises(ValueError):
            Table(segment, name, tracked=False, lock_timeout=bad_timeout)
        segment.close()  # already closed: no BufferError
    segment = _segment.open_segment(name, create=False, track=False)
    segment.buf[0:8] = b"NOTSHMKV"  # a foreign magic
    with pytest.raises(shmkv.IncompatibleTable):
        Table(segment, name, tracked=False)
    segment.close()
    t.unlink()
    t.close()


def test_counters_need_eight_byte_values(make_name) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=8, value_size=4) as t:
        with pytest.raises(shmkv.ValueTooLarge):
            t.incr(b"n")
        assert len(t) == 0
        t.unlink()


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"capacity": 0}, ValueError),
        ({"capacity": -5}, ValueError),
        ({"capacity": 2**40}, ValueError),
        ({"capacity": 1.5}, TypeError),
        ({"capacity": "10"}, TypeError),
        ({"capacity": True}, TypeError),
        ({"key_size": 0}, ValueError),
        ({"key_size": 2**21}, ValueError),
        ({"value_size": 0}, ValueError),
        ({"value_size": None}, TypeError),
        ({"lock_timeout": 0}, ValueError),
        ({"lock_timeout": -1}, ValueError),
    ],
)
def test_bad_geometry_is_refused_before_anything_exists(name: str, kwargs, exc) -> None:
    params = {"capacity": 10, "key_size": 8, "value_size": 8, **kwargs}
    with pytest.raises(exc):
        shmkv.create(name, **params)
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)


@pytest.mark.parametrize("bad", ["", "/", "a/b", "x" * 300, "nul\0", 42, None])
def test_bad_names(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        shmkv.create(bad, capacity=1)
    with pytest.raises((ValueError, TypeError)):
        shmkv.attach(bad)


def test_a_table_larger_than_shared_memory_fails_at_create(name: str) -> None:
    """With reserve=True (the default), missing room is an OSError at create, not a SIGBUS
    later; the half-made segment is removed."""
    import shutil

    room = shutil.disk_usage("/dev/shm").total
    entries = room // (1 << 20) + 16
    with pytest.raises(OSError) as info:
        shmkv.create(name, capacity=entries, key_size=8, value_size=1 << 20)
    assert "reserve=False" in str(info.value)
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)


def test_reserve_false_makes_a_sparse_table(name: str) -> None:
    import os

    t = shmkv.create(name, capacity=100_000, key_size=64, value_size=4096, reserve=False)
    try:
        t[b"k"] = b"v"
        assert t[b"k"] == b"v"
        used = os.stat(f"/dev/shm/{name}").st_blocks * 512
        assert used < t.stats()["segment_size"] // 10
    finally:
        t.unlink()
        t.close()


def test_reserve_true_allocates_the_segment(name: str) -> None:
    import os

    t = shmkv.create(name, capacity=1000, key_size=64, value_size=4096)
    try:
        used = os.stat(f"/dev/shm/{name}").st_blocks * 512
        assert used >= t.stats()["segment_size"]
    finally:
        t.unlink()
        t.close()


def test_every_c_call_refuses_a_closed_handle() -> None:
    """The C core answers SHMKV_ECLOSED, not a crash, for a NULL (closed) handle."""
    from shmkv._core import ffi

    closed = lib.SHMKV_ECLOSED
    out = ffi.new("char[]", 8)
    n64 = ffi.new("int64_t[]", 1)
    u32 = ffi.new("uint32_t[]", [1])
    u64 = ffi.new("uint64_t[]", 1)
    null = ffi.NULL
    assert lib.shmkv_get(null, b"k", 1, out, 8) == closed
    assert lib.shmkv_put(null, b"k", 1, b"v", 1, 0, 0) == closed
    assert lib.shmkv_setdefault(null, b"k", 1, b"v", 1, out, 8) == closed
    assert lib.shmkv_pop(null, b"k", 1, out, 8) == closed
    assert lib.shmkv_incr(null, b"k", 1, 1, 0, 0, n64) == closed
    assert lib.shmkv_compare_and_swap(null, b"k", 1, b"v", 1, b"w", 1, 0, 0) == closed
    assert lib.shmkv_expire(null, b"k", 1, 0, 0) == closed
    assert lib.shmkv_ttl(null, b"k", 1, u64) == closed
    assert lib.shmkv_purge_expired(null) == closed
    assert lib.shmkv_table_flags(null) == closed
    assert lib.shmkv_clear(null) == closed
    assert lib.shmkv_len(null) == closed
    assert lib.shmkv_get_many(null, 1, b"k", u32, out, 8, n64, u64) == closed
    assert lib.shmkv_set_many(null, 1, b"k", u32, b"v", u32, 0, u64) == closed
    assert lib.shmkv_snapshot(null, 1, out, 8, u64) == closed
    assert lib.shmkv_stats(null, ffi.new("struct shmkv_stats *")) == closed
    assert lib.shmkv_check(null, ffi.new("int *")) == closed
    assert lib.shmkv_testing_hold_lock(null, 1) == closed
