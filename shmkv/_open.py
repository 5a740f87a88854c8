"""Opening tables: create() and attach(), the two ways a process gets a Table.

Both open the segment's file first, check its owner with fstat (nothing else is read from a
segment that fails that), and serialise with creators through flock on that file: see
_segment's docstring for the protocol and why.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from typing import Any, NamedTuple

from . import _segment
from ._core import ffi, lib
from ._segment import Owner, UserId
from ._table import _ON_FULL, DEFAULT_LOCK_TIMEOUT, Table, _positive_int, _timeout
from .errors import IncompatibleTable, LockTimeout, error_for


class _Layout(NamedTuple):
    capacity: int
    key_size: int
    value_size: int
    memory: int | None  # None: sized so that capacity entries of the largest size fit
    on_full: str
    size: int  # bytes of the segment


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string with a unit: ``"48MiB"`` is 48 x 2**20 bytes, ``"2GB"``
    is 2 x 10**9, ``"64k"`` 64,000; a plain number is bytes. ValueError for anything else."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"a size is an int or a string such as '48MiB', "
                        f"not {type(size).__name__}")
    if isinstance(size, int):
        number = size
    else:
        match = _SIZE.fullmatch(size)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{size!r} is not a size: a number of bytes with an optional "
                             f"unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        number = int(float(match.group(1)) * _UNITS[unit])
    if number < 1:
        raise ValueError(f"a size must be at least 1 byte, not {size!r}")
    return number


def create(
    name: str,
    capacity: int,
    key_size: int = 64,
    value_size: int = 1024,
    *,
    memory: int | str | None = None,
    on_full: str = "error",
    exist_ok: bool = False,
    reserve: bool = True,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    user: UserId = None,
    group: UserId = None,
    mode: Any = 0o600,
) -> Table:
    """Creates the table ``name`` holding up to ``capacity`` keys of at most ``key_size``
    bytes with values of at most ``value_size`` bytes, and returns it attached.

    Each key and value takes room by its actual length (plus a 32-byte header). ``memory``
    caps the whole segment in bytes, as an int or a string with a unit (``"48MiB"``,
    ``"2GB"``): the file in /dev/shm never grows past it, and a write that finds no room left
    raises TableFull with ``kind == "bytes"`` (or evicts, with ``on_full="evict"``). Without
    ``memory``, the table is sized so that ``capacity`` entries of the largest size always
    fit. A ``memory`` too small for the index, ``capacity`` entry headers and two entries of
    the largest size (an overwrite holds the old and the new value at once) is a ValueError
    that names the minimum.

    When a new key finds the table full, expired keys are reclaimed first; if none are,
    ``on_full="error"`` raises TableFull, and ``on_full="evict"`` evicts an approximately
    least recently used key (CLOCK), as a cache would.

    The creating process owns the table: it is removed when that process's tree ends, unless
    ``unlink()`` removed it before. With ``exist_ok=True``, an existing table of that name is
    attached instead (its geometry is kept), and among many processes doing this at once,
    exactly one creates it; such a table has no owner and lives until ``unlink()``; one whose
    creator died while creating it is laid anew. ``reserve=True`` allocates all its memory
    now, so that a full /dev/shm raises OSError here rather than crashing a process later;
    ``reserve=False`` allocates pages as they are first used, for huge sparse tables.

    The table belongs to ``user`` (a uid or name; default: the caller) and ``group``, with
    permissions ``mode`` (default 0o600: that user alone). A root master hands a table to its
    workers' user with ``user=``; ``group=`` with ``mode=0o660`` shares it with a group.
    With exist_ok, an existing table must match these (see attach()).

    Raises ValueError or TypeError for bad parameters (before anything is created),
    FileExistsError if the name is taken and not exist_ok, OSError if memory runs out,
    PermissionError if the owner cannot be set, UntrustedTable if an existing table of that
    name belongs to someone else, and IncompatibleTable if it is not a usable table. A
    create() that raises leaves nothing behind.
    """
    name = _segment.check_name(name)
    capacity = _positive_int(capacity, "capacity", lib.SHMKV_MAX_CAPACITY)
    key_size = _positive_int(key_size, "key_size", lib.SHMKV_MAX_KEY_SIZE)
    value_size = _positive_int(value_size, "value_size", lib.SHMKV_MAX_VALUE_SIZE)
    if on_full not in _ON_FULL:
        raise ValueError(f"on_full must be 'error' or 'evict', not {on_full!r}")
    timeout = _timeout(lock_timeout)
    owner = Owner(user, group, mode)
    cap = None if memory is None else parse_size(memory)
    geometry = ffi.new("struct shmkv_geometry *")
    rc = lib.shmkv_layout(capacity, key_size, value_size, cap or 0, geometry)
    if rc < 0 and cap and geometry.min_memory and cap < geometry.min_memory:
        raise ValueError(f"memory={memory!r} is too small for {capacity:,} keys of up to "
                         f"{key_size} + {value_size} bytes: the index, {capacity:,} entry "
                         f"headers and two largest entries need at least "
                         f"{geometry.min_memory:,} bytes")
    if rc < 0:
        what = f"{cap:,} bytes" if cap else (f"{capacity:,} entries of {key_size} + "
                                             f"{value_size} bytes")
        raise ValueError(f"a table of {what} is too large: its data area may have at most "
                         f"{lib.SHMKV_MAX_DATA_SIZE:,} bytes (pass a smaller memory=)")
    layout = _Layout(capacity, key_size, value_size, cap, on_full, geometry.total_size)
    deadline = time.monotonic() + timeout
    if not exist_ok:
        fd = _segment.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        made = _in_new_file(name, fd, layout, owner, reserve, timeout, deadline, tracked=True)
        assert made is not None  # without exist_ok it lays the table or raises
        return made
    attempt = 0
    while True:
        try:
            fd = _segment.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            try:
                fd = _segment.shm_open(name, os.O_RDWR)
            except FileNotFoundError:
                continue  # removed meanwhile: try to create it again
        else:
            table = _in_new_file(name, fd, layout, owner, reserve, timeout, deadline,
                                 tracked=False, exist_ok=True)
            if table is not None:
                return table
            continue
        try:
            table = _in_existing_file(name, fd, layout, owner, reserve, timeout, deadline)
        finally:
            os.close(fd)  # and with it the flock
        if table is not None:
            return table
        _segment.back_off(attempt)
        attempt += 1


def _in_new_file(name: str, fd: int, layout: _Layout, owner: Owner, reserve: bool,
                 timeout: float, deadline: float, *, tracked: bool,
                 exist_ok: bool = False) -> Table | None:
    """Lays a table into the empty file this call created as fd, and closes fd. On any
    error the file is removed again, unless another process took it over meanwhile."""
    ours = True
    try:
        _segment.flock(fd, fcntl.LOCK_EX, deadline, name)
        if os.fstat(fd).st_size != 0:
            # This creator stalled between creating the file and locking it for longer than
            # a create(exist_ok=True) waits, which then laid the table: it is theirs now.
            ours = False
            if not exist_ok:
                raise FileExistsError(f"table {name!r} was created by another process "
                                      "while this one stalled")
            return _in_locked_file(name, fd, layout, reserve, timeout, deadline)
        owner.apply(fd)
        return _lay(name, fd, layout, reserve, timeout, tracked=tracked)
    except BaseException:
        if ours and _segment.names_file(name, fd):
            _segment.unlink_segment(name, tracked=False)
        raise
    finally:
        os.close(fd)


def _in_existing_file(name: str, fd: int, layout: _Layout, owner: Owner, reserve: bool,
                      timeout: float, deadline: float) -> Table | None:
    """create(exist_ok=True) of a name whose file fd another process created: the table
    attached if it is finished, laid anew if its creator died creating it; None to try
    again (the file was removed, or its creator has yet to lock it)."""
    owner.check(os.fstat(fd), name)
    _segment.flock(fd, fcntl.LOCK_EX, deadline, name)
    if not _segment.names_file(name, fd):
        return None
    return _in_locked_file(name, fd, layout, reserve, timeout, deadline)


def _in_locked_file(name: str, fd: int, layout: _Layout, reserve: bool, timeout: float,
                    deadline: float) -> Table | None:
    """_in_existing_file, once the flock is held exclusively."""
    if os.fstat(fd).st_size == 0:
        # Its creator is between creating the file and locking it, or died there: give it
        # until the deadline, then take the table over.
        if time.monotonic() < deadline:
            return None
        return _lay_over(name, fd, layout, reserve, timeout)
    try:
        table = _open(name, fd, timeout)
    except _Unfinished:
        return _lay_over(name, fd, layout, reserve, timeout)
    asked = layout._asdict()
    del asked["size"]
    found = {key: getattr(table, key) for key in asked}
    if found != asked:
        table.close()
        raise IncompatibleTable(
            f"table {name!r} exists with {_params(found)}, not {_params(asked)}; attach() it "
            "as it is, or unlink it"
        )
    return table


def _lay_over(name: str, fd: int, layout: _Layout, reserve: bool, timeout: float) -> Table:
    """Lays a table anew over what a creator that died left (we hold the flock it held);
    on error the file is left empty, unfinished as it was."""
    os.ftruncate(fd, 0)
    try:
        return _lay(name, fd, layout, reserve, timeout, tracked=False)
    except BaseException:
        os.ftruncate(fd, 0)
        raise


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _lay(name: str, fd: int, layout: _Layout, reserve: bool, timeout: float, *,
         tracked: bool) -> Table:
    """Sizes the file (fd, flock held exclusively), writes a fresh table into it and opens
    it; the ready flag goes last, so an attacher sees a whole table or none."""
    os.ftruncate(fd, layout.size)
    os.pwrite(fd, _segment.MAGIC, 0)  # an unfinished table is still known as shmkv's
    if reserve:
        _segment.reserve(fd, layout.size, name)
    segment = _segment.map_checked(name, fd, track=tracked)
    try:
        if tracked:
            _segment.track(name, segment)
        base = ffi.from_buffer("char[]", segment.buf, require_writable=True)
        try:
            rc = lib.shmkv_init(base, segment.size, layout.capacity, layout.key_size,
                                layout.value_size, layout.memory or 0, _ON_FULL[layout.on_full],
                                os.urandom(16), os.getpid())
        finally:
            ffi.release(base)
        if rc < 0:
            raise error_for(rc, f"creating table {name!r}")
        return Table(segment, name, tracked=tracked, created=True, lock_timeout=timeout)
    except BaseException:
        segment.close()
        raise


class _Unfinished(Exception):
    pass


def _unfinished(message: str) -> IncompatibleTable:
    """IncompatibleTable for a table that is not (or not yet) finished: code SHMKV_ENOTREADY,
    as the C core says of a header not marked ready."""
    exc = IncompatibleTable(message)
    exc.code_name = "SHMKV_ENOTREADY"
    return exc


def _open(name: str, fd: int, timeout: float) -> Table:
    """The table in the file fd, whose flock the caller holds; _Unfinished if its header was
    never marked ready (with the flock held, that means its creator died)."""
    segment = _segment.map_checked(name, fd, track=False)
    try:
        return Table(segment, name, tracked=False, lock_timeout=timeout)
    except IncompatibleTable as exc:
        if exc.code_name == "SHMKV_ENOTREADY":
            raise _Unfinished from None
        raise


def attach(
    name: str,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    user: UserId = None,
    group: UserId = None,
    mode: Any = 0o600,
    _inspect: bool = False,
) -> Table:
    """Attaches to the existing table ``name``. A table still being created is waited for
    (up to lock_timeout seconds). Never removes the table, at exit or otherwise.

    The table must belong to ``user`` (default: the caller) and, if given, ``group``, and
    grant no more than ``mode`` (default 0o600): a table that another user could have
    written is refused before anything in it is read.

    Raises FileNotFoundError if there is no such table, UntrustedTable if it belongs to
    someone else or grants more, LockTimeout if its creator is still at it after
    lock_timeout, and IncompatibleTable if it is not a shmkv table this build can use
    (foreign, truncated, another format, or never finished because its creator died).
    """
    # _inspect (shmkv-inspect): any owner, never waits, the handle changes no counter, and
    # it never takes the lock of another user's table (Table._forbid_lock).
    name = _segment.check_name(name)
    timeout = _timeout(lock_timeout)
    owner = Owner(user, group, mode)
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        fd = _segment.shm_open(name, os.O_RDWR)
        try:
            if not _inspect:
                owner.check(os.fstat(fd), name)
            try:
                _segment.flock(fd, fcntl.LOCK_SH, time.monotonic() if _inspect else deadline,
                               name)
            except LockTimeout:
                if not _inspect:
                    raise
                raise _unfinished(f"table {name!r} is being created") from None
            if os.fstat(fd).st_size != 0:
                try:
                    table = _open(name, fd, timeout)
                except _Unfinished:
                    raise _unfinished(
                        f"table {name!r} was never finished: its creator died while creating "
                        f"it; create(..., exist_ok=True) lays it anew, shmkv.unlink({name!r}) "
                        "removes it") from None
                if _inspect:
                    table._make_observer()
                    if os.fstat(fd).st_uid != os.geteuid():
                        table._forbid_lock()  # another user's: read, never lock
                return table
            if _inspect or time.monotonic() >= deadline:
                raise _unfinished(
                    f"table {name!r} was never finished: its segment is empty (its creator "
                    "died before sizing it, or it is another program's); create(..., "
                    "exist_ok=True) takes it over after lock_timeout, or remove "
                    f"{_segment.path_of(name)!r} by hand")
        finally:
            os.close(fd)
        _segment.back_off(attempt)
        attempt += 1
