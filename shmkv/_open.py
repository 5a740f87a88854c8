"""Opening tables: create() and attach(), the two ways a process gets a Table."""

from __future__ import annotations

import os
import time
from typing import Any

from . import _segment
from ._core import ffi, lib
from ._table import _ON_FULL, DEFAULT_LOCK_TIMEOUT, Table, _positive_int, _timeout
from .errors import IncompatibleTable, error_for


def create(
    name: str,
    capacity: int,
    key_size: int = 64,
    value_size: int = 1024,
    *,
    on_full: str = "error",
    exist_ok: bool = False,
    reserve: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Table:
    """Creates the table ``name`` holding up to ``capacity`` keys of at most ``key_size``
    bytes with values of at most ``value_size`` bytes, and returns it attached.

    When a new key finds the table full, expired keys are reclaimed first; if none are,
    ``on_full="error"`` raises TableFull, and ``on_full="evict"`` evicts an approximately
    least recently used key (CLOCK), as a cache would.

    The creating process owns the table: it is removed when that process's tree ends, unless
    ``unlink()`` removed it before. With ``exist_ok=True``, an existing table of that name is
    attached instead (its geometry is kept), and among many processes doing this at once,
    exactly one creates it; such a table has no owner and lives until ``unlink()``.
    ``reserve=True`` allocates all its memory now, so that a full /dev/shm raises OSError
    here rather than crashing a process later; ``reserve=False`` allocates pages as they are
    first used, for huge sparse tables.

    Raises ValueError or TypeError for bad parameters (before anything is created),
    FileExistsError if the name is taken and not exist_ok, OSError if memory runs out, and
    IncompatibleTable if an existing segment of that name is not a usable table.
    """
    name = _segment.check_name(name)
    capacity = _positive_int(capacity, "capacity", lib.SHMKV_MAX_CAPACITY)
    key_size = _positive_int(key_size, "key_size", lib.SHMKV_MAX_KEY_SIZE)
    value_size = _positive_int(value_size, "value_size", lib.SHMKV_MAX_VALUE_SIZE)
    if on_full not in _ON_FULL:
        raise ValueError(f"on_full must be 'error' or 'evict', not {on_full!r}")
    flags = _ON_FULL[on_full]
    timeout = _timeout(lock_timeout)
    geometry = ffi.new("struct shmkv_geometry *")
    rc = lib.shmkv_layout(capacity, key_size, value_size, geometry)
    if rc < 0:
        raise ValueError(f"a table of {capacity:,} entries of {key_size} + {value_size} bytes "
                         "is too large for this machine's address space")
    if not exist_ok:
        return _create(name, capacity, key_size, value_size, flags, geometry.total_size,
                       reserve, timeout, tracked=True)
    with _segment.CreationLock(name, timeout):
        try:
            return _create(name, capacity, key_size, value_size, flags, geometry.total_size,
                           reserve, timeout, tracked=False)
        except FileExistsError:
            table = attach(name, lock_timeout=timeout)
    asked = {"capacity": capacity, "key_size": key_size, "value_size": value_size,
             "on_full": on_full}
    found = {key: getattr(table, key) for key in asked}
    if found != asked:
        table.close()
        raise IncompatibleTable(
            f"table {name!r} exists with {_params(found)}, not {_params(asked)}; attach() it "
            "as it is, or unlink it"
        )
    return table


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _create(
    name: str,
    capacity: int,
    key_size: int,
    value_size: int,
    flags: int,
    size: int,
    reserve: bool,
    timeout: float,
    *,
    tracked: bool,
) -> Table:
    segment = _segment.open_segment(name, create=True, size=size, track=tracked)
    try:
        if reserve:
            _segment.reserve(segment, name)
        base = ffi.from_buffer("char[]", segment.buf, require_writable=True)
        try:
            rc = lib.shmkv_init(base, segment.size, capacity, key_size, value_size, flags,
                                os.urandom(16), os.getpid())
        finally:
            ffi.release(base)
        if rc < 0:
            raise error_for(rc, f"creating table {name!r}")
        return Table(segment, name, tracked=tracked, created=True, lock_timeout=timeout)
    except BaseException:
        segment.close()
        _segment.unlink_segment(name, tracked=tracked)
        raise


def attach(name: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Table:
    """Attaches to the existing table ``name``. A table still being created is waited for
    (up to lock_timeout seconds). Never removes the table, at exit or otherwise.

    Raises FileNotFoundError if there is no such segment, and IncompatibleTable if it is not
    a shmkv table this build can use (foreign, truncated, another format, never finished).
    """
    name = _segment.check_name(name)
    timeout = _timeout(lock_timeout)
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            segment = _segment.open_segment(name, create=False, track=False)
        except ValueError:
            # mmap of an empty file: the creator has not sized it yet.
            segment = None
        if segment is not None:
            try:
                return Table(segment, name, tracked=False, lock_timeout=timeout)
            except IncompatibleTable as exc:
                if exc.code_name != "SHMKV_ENOTREADY":
                    raise
        if time.monotonic() >= deadline:
            raise IncompatibleTable(
                f"table {name!r} was never finished by its creator (did it die while "
                "creating it?); unlink it and create it again"
            )
        _segment.back_off(attempt)
        attempt += 1


