"""Table: a ``MutableMapping[bytes, bytes]`` over one shared-memory segment.

Every operation is one call into the C core, which does it whole under the table's lock.
Python's part is naming, lifecycle, argument checks and turning status codes into exceptions
(``errors.error_for``). The hot methods are written for the interpreter: the C functions are
bound once, the value buffers are reused, and bytes keys go to C without a copy.

THREADS. A Table may be shared by the threads of a process; the C calls release the GIL.
Nothing here depends on where the interpreter may switch threads (3.9 switches between any
two bytecodes): the buffers a value is copied into come from a free list taken with one
``list.pop()`` and given back with one ``list.append()``, each atomic on its own, so two
threads never share a buffer; and close() is made safe in C (see THREADS AND CLOSE in
csrc/table.c): calls already inside finish before the mapping goes, later ones raise
TableClosed, and the C handle is freed only with the Table object (``ffi.gc``).

What free-threaded CPython (3.13t and later, no GIL) would need beyond that: ``list.pop``
and ``append`` stay atomic there (lists lock themselves), and the C core already counts
reads and calls with atomics; but cffi must be a release that supports free-threading and
the extension must declare itself GIL-free (``Py_mod_gil``), or importing it re-enables the
GIL. Plain attribute stores such as ``_snapshot_size`` are races that only cost a retry.
close() is serialised by a ``threading.Lock``, which is correct with or without a GIL.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
import threading
import weakref
from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from datetime import timedelta
from typing import Any, TypeVar, Union, overload

from . import _segment
from ._core import ffi, lib
from .errors import KeyTooLarge, TableClosed, ValueTooLarge, error_for

BytesLike = Union[bytes, bytearray, memoryview]
TTL = Union[float, int, timedelta, None]

DEFAULT_LOCK_TIMEOUT = 5.0
#: The longest lock_timeout, in seconds (about 31.7 years): in ns it fits the C core's int64
#: and every timespec deadline, with room to spare. Use it to wait "for ever".
MAX_LOCK_TIMEOUT = 1e9
_SNAPSHOT_START = 64 * 1024
_SENTINELS = 4  # Nones at the bottom of a Table's list of free value buffers (see __init__)
_WHY_SIZE = 256
_U32 = struct.Struct("=I")
_U32_CODE = "I" if array("I").itemsize == 4 else "L"  # array.array's code of a uint32_t

_get = lib.shmkv_get
_put = lib.shmkv_put
_pop = lib.shmkv_pop
_NOTFOUND = lib.SHMKV_ENOTFOUND
_CLOSED = lib.SHMKV_ECLOSED
_INSERTED = lib.SHMKV_INSERTED
_EVICTED = lib.SHMKV_EVICTED
_IF_ABSENT = lib.SHMKV_PUT_IF_ABSENT
_KEEP_TTL: int = lib.SHMKV_KEEP_TTL
_ON_FULL = {"error": 0, "evict": lib.SHMKV_EVICT}
_BLOCK_HEADER = 32  # bytes of an entry's header in the data area (csrc/layout.h)
_uncleared = ffi.new_allocator(should_clear_after_alloc=False)
# The longest ttl: 2**62 ns, about 146 years, far inside the clock's 64-bit range.
MAX_TTL = 2**62 / 1e9


class _Missing:
    pass


_MISSING: Any = _Missing()


def _as_bytes(obj: object, what: str) -> bytes:
    """Copies a bytes-like argument to bytes; a clear TypeError for anything else."""
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, str):
        raise TypeError(f"{what} must be bytes-like, not str (encode it, or use SharedDict)")
    try:
        return memoryview(obj).tobytes()  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(obj).__name__}") from None


def _lengths(items: list[Any]) -> Any:
    """The lengths of items as a C uint32_t array. Built through array.array, which converts
    a batch of ints about 35% faster than cffi does from a list."""
    return ffi.from_buffer("uint32_t[]", array(_U32_CODE, map(len, items)))


def _positive_int(value: object, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{what} must be between 1 and {limit:,}, not {value:,}")
    return value


def _ttl_ns(ttl: object) -> int:
    """A ttl in seconds (or a timedelta) as the C core takes it: ns, 0 for None (never)."""
    seconds: Any = ttl
    if type(ttl) is int:  # whole seconds, the common case: exact, and no float to convert
        if 0 < ttl <= MAX_TTL:
            return ttl * 1_000_000_000
    elif ttl is None:
        return 0
    else:
        if type(ttl) is not float:
            seconds = _seconds(ttl)
        if 0 < seconds <= MAX_TTL:
            return round(seconds * 1e9) or 1
    raise ValueError(f"ttl must be a positive number of seconds up to {MAX_TTL:.3g}, "
                     f"or None for no expiry, not {ttl!r}")


def _seconds(ttl: object) -> float:
    if isinstance(ttl, timedelta):
        return ttl.total_seconds()
    if isinstance(ttl, numbers.Real) and not isinstance(ttl, bool):
        return float(ttl)  # int subclasses, Fraction, numpy numbers
    raise TypeError(f"ttl must be seconds (a number or timedelta) or None, "
                    f"not {type(ttl).__name__}")


def _check_counter_args(delta: object, initial: object) -> None:
    """incr's delta and initial: ints in the signed 64-bit range, or TypeError/OverflowError."""
    for what, number in (("delta", delta), ("initial", initial)):
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"{what} must be an int, not {type(number).__name__}")
        if not -(2**63) <= number < 2**63:
            raise OverflowError(f"{what} {number} is outside the signed 64-bit range")


def _keep_flags(ttl: object) -> int:
    """The flags of keep_ttl=True, which leaves no room for a ttl."""
    if ttl is not None:
        raise ValueError("give either ttl or keep_ttl=True, not both")
    return _KEEP_TTL


def _timeout(value: object) -> float:
    """A lock_timeout checked: a finite number of seconds above 0 and at most
    MAX_LOCK_TIMEOUT. Raises ValueError for anything else, before anything is created."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value <= MAX_LOCK_TIMEOUT or not math.isfinite(value)):
        raise ValueError(f"lock_timeout must be a number of seconds above 0 and at most "
                         f"{MAX_LOCK_TIMEOUT:g}, not {value!r}")
    return float(value)


def _timeout_ns(seconds: float) -> int:
    """A checked timeout in ns for the C core: at least 1, so that a tiny timeout is honoured
    (the C core reads 0 as "the default")."""
    return max(1, round(seconds * 1e9))


_T = TypeVar("_T", bound="_TableBase")


class _TableBase(MutableMapping[bytes, bytes]):
    """What a Table and a RedisTable share above their storage: iteration and the views over
    _snapshot(), popitem() over pop(), update() as set_many(), and the context manager."""

    _name: str  # the table's name, which each subclass sets

    def _snapshot(self, with_values: bool) -> list[Any]:
        """Every key, or every (key, value) pair, as a list the caller may walk at leisure."""
        raise NotImplementedError

    def set_many(self, mapping: Any, ttl: TTL = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._snapshot(False))

    def items(self) -> ItemsView[bytes, bytes]:
        """A view whose iteration is one snapshot of (key, value) pairs."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[bytes]:
        return _SnapshotValues(self)

    def popitem(self) -> tuple[bytes, bytes]:
        """Removes and returns some (key, value); KeyError if the table is empty."""
        missed: Any = None
        while True:
            keys = self._snapshot(False)
            if not keys:
                raise KeyError("popitem(): table is empty")
            for key in keys:
                value = self.pop(key, None)
                if value is not None:
                    return key, value
            # Other processes may have taken every key listed; but the same keys listed
            # twice and found by no lookup can only be a damaged index.
            if keys == missed:
                raise error_for(lib.SHMKV_ECORRUPT, f"table {self._name!r}: popitem() finds "
                                "listed keys missing from the index")
            missed = keys

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like dict.update, stored in one step with set_many()."""
        if kwargs:
            raise TypeError("Table keys are bytes; keyword arguments cannot name them")
        self.set_many(other)

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SnapshotItems(ItemsView[bytes, bytes]):
    _mapping: _TableBase

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._mapping._snapshot(True))


class _SnapshotValues(ValuesView[bytes]):
    _mapping: _TableBase

    def __iter__(self) -> Iterator[bytes]:
        return (value for _, value in self._mapping._snapshot(True))


class Table(_TableBase):
    """A hash table of bytes keys and bytes values in shared memory, of a size fixed at creation.

    Make one with :func:`shmkv.create` (the master) or :func:`shmkv.attach` (a worker).
    Behaves like a ``dict`` whose keys and values are bytes; every single operation is atomic
    across processes. Raises :class:`~shmkv.TableClosed` once closed.
    """

    def __init__(
        self,
        segment: Any,
        name: str,
        *,
        tracked: bool,
        created: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        # Private: use shmkv.create() or shmkv.attach(). Raises what error_for() makes of
        # shmkv_open()'s code, and ValueError for a bad lock_timeout; on any error the cffi
        # buffer is released and the segment closed (nothing is left half-open), and the
        # caller decides about the segment's name.
        #: True for the handle whose create() made the table (not for those that attached).
        self.created = created
        self._segment = segment
        self._name = name
        self._tracked = tracked
        self._h: Any = ffi.NULL
        self._base: Any = None
        self._close_lock = threading.Lock()
        _live[id(self)] = self
        # Buffers a value is read into, as (cdata, buffer) pairs: see THREADS above.
        # Below the buffers lie _SENTINELS Nones, so that the list never runs empty: a list
        # that pop() empties frees its array and the next append() allocates it again, which
        # cost 20 ns a get. A thread that pops a None gives it back and makes a new pair.
        self._free: list[Any] = [None] * _SENTINELS
        self._handle: Any = None
        self._snapshot_size = _SNAPSHOT_START
        try:
            self._lock_timeout = _timeout(lock_timeout)
            self._identity = _segment.identity(segment)  # unlink() removes this file, no other
            self._base = ffi.from_buffer("char[]", segment.buf, require_writable=True)
            holder = ffi.new("shmkv_t **")
            why = ffi.new("char[]", _WHY_SIZE)
            rc = lib.shmkv_open(self._base, segment.size, holder, why, _WHY_SIZE)
            if rc != 0:
                detail = ffi.string(why).decode(errors="replace")
                raise error_for(rc, f"table {name!r}" + (f": {detail}" if detail else ""))
            # The handle is freed with this object, not at close(): a thread that is inside
            # a method holds self, and so may still pass the pointer it read from _h (it
            # gets SHMKV_ECLOSED). _h is the bare pointer, which cffi passes ~10 ns faster.
            self._handle = ffi.gc(holder[0], lib.shmkv_free)
            self._h = holder[0]
            lib.shmkv_set_lock_timeout(self._h, _timeout_ns(self._lock_timeout))
            geometry = ffi.new("struct shmkv_geometry *")
            lib.shmkv_geometry(self._h, geometry)
            self.capacity: int = geometry.capacity
            self.key_size: int = geometry.key_size
            self.value_size: int = geometry.value_size
            #: The cap on the segment's bytes given to create(), or None: sized for capacity.
            self.memory: int | None = geometry.memory or None
            self._data_size: int = geometry.data_size
            #: "error" (a full table raises TableFull) or "evict" (it makes room), as created.
            self.on_full: str = (
                "evict" if lib.shmkv_table_flags(self._h) & lib.SHMKV_EVICT else "error")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        """The table's name, as given to create() or attach()."""
        return self._name

    @property
    def closed(self) -> bool:
        return bool(self._h == ffi.NULL)

    @property
    def lock_timeout(self) -> float:
        """Seconds an operation waits for the lock before raising LockTimeout."""
        return self._lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        """ValueError unless seconds is finite, above 0 and at most MAX_LOCK_TIMEOUT."""
        self._lock_timeout = _timeout(seconds)
        h = self._h
        if h != ffi.NULL:
            lib.shmkv_set_lock_timeout(h, _timeout_ns(self._lock_timeout))

    def close(self) -> None:
        """Unmaps the table from this process. Idempotent; the table itself stays.

        Safe while other threads use the table: calls already inside the C core finish
        first (close waits for them; each is bounded by the lock timeout), and later calls
        raise TableClosed."""
        with self._close_lock:
            h, self._h = self._h, ffi.NULL
            if h != ffi.NULL:
                lib.shmkv_close(h)  # waits for calls in flight; the segment is ours after
            # cffi's buffer export must go before the mapping, or mmap.close() raises
            # BufferError.
            if self._base is not None:
                ffi.release(self._base)
                self._base = None
            self._free.clear()
            if self._segment is not None:
                self._segment.close()
                self._segment = None

    def unlink(self) -> None:
        """Removes the table's name from the system: no process can attach any more, and the
        memory is freed once every process has closed it. This handle stays usable.
        FileNotFoundError if it was already removed (even if another table has taken the
        name since: that one is left alone)."""
        _segment.unlink_segment(self._name, tracked=self._tracked, identity=self._identity)
        self._tracked = False

    def __del__(self) -> None:
        try:
            if hasattr(self, "_close_lock"):
                self.close()
        except Exception:
            pass

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled table is its name: the receiving process attaches anew.
        return (_reattach, (self._name, self._lock_timeout))

    def __repr__(self) -> str:
        # Without the lock (a repr must not wait for, or fail on, another process's hold):
        # the count may include expired keys not yet reclaimed.
        s = ffi.new("struct shmkv_stats *")
        if lib.shmkv_peek_stats(self._h, s) < 0:
            return f"<shmkv.Table {self._name!r} closed>"
        return (
            f"<shmkv.Table {self._name!r} {s.count}/{self.capacity} entries, "
            f"key_size={self.key_size}, value_size={self.value_size}>"
        )

    # ------------------------------------------------------------------ errors

    def _error(self, code: int, key: Any = None, value: Any = None) -> Exception:
        exc: Exception
        if code == lib.SHMKV_EKEYSIZE:
            size = len(_as_bytes(key, "key"))
            exc = KeyTooLarge(f"key of {size} bytes is longer than table {self._name!r} "
                              f"allows (key_size={self.key_size})")
        elif code == lib.SHMKV_EVALUESIZE:
            size = len(_as_bytes(value, "value")) if value is not None else 8
            exc = ValueTooLarge(f"value of {size} bytes is longer than table {self._name!r} "
                                f"allows (value_size={self.value_size})")
        elif code == _CLOSED:
            exc = TableClosed(f"table {self._name!r} is closed")
        else:
            if code == lib.SHMKV_EFULL:
                detail = f"table {self._name!r} holds its capacity of {self.capacity} keys"
            elif code == lib.SHMKV_ENOROOM:
                what = "the batch" if key is None else "the entry"
                detail = (f"table {self._name!r}: no room for {what} in its "
                          f"{self._data_size:,}-byte data area")
            elif code == lib.SHMKV_ELOCKTIMEOUT:
                detail = (f"table {self._name!r}: waited {self._lock_timeout:g} s for the "
                          f"lock, {self._lock_holder()}")
            else:
                detail = f"table {self._name!r}"
            return error_for(code, detail)
        exc.code_name = f"SHMKV_{_CODE_NAMES[code]}"
        return exc

    def _lock_holder(self) -> str:
        """Who holds the lock, in words, read without taking it: a process of this PID
        namespace, or a thread of another one (never a local process that merely has the
        other namespace's thread id)."""
        holder = ffi.new("struct shmkv_lock_holder *")
        if lib.shmkv_lock_holder(self._h, holder) < 0:
            return "held by an unknown owner"
        return _describe_owner(int(holder.tid), other_pidns=holder.same_pidns == 0,
                               pid=int(holder.pid))

    def _buffers(self) -> Any:
        # (cdata, buffer) of value_size bytes for a value read out of the table, taken off
        # the free list in one atomic step (list.pop) and given back with one append once
        # the value is sliced out: two threads never hold the same pair (see THREADS).
        try:
            out = self._free.pop()
        except IndexError:  # more threads at once than sentinels: harmless
            out = None
        return out if out is not None else self._new_buffers()

    def _ensure_open(self) -> None:
        # For the calls that may not reach C, which would say so itself.
        if self.closed:
            raise self._error(_CLOSED)

    def _make_observer(self) -> None:
        """Makes this handle an observer, for inspection: from now on its reads count no
        hits or misses, its lock waits count no lock timeouts, and it marks no key used for
        eviction, so that looking at a table changes nothing in it. TableClosed if closed."""
        rc = lib.shmkv_observe(self._h)
        if rc < 0:
            raise self._error(rc)

    def _forbid_lock(self) -> None:
        """Forbids this handle the table's lock, for inspecting another user's table: a call
        that would take it raises UntrustedTable instead (see shmkv_forbid_lock() for why);
        gets stay optimistic. TableClosed if closed."""
        rc = lib.shmkv_forbid_lock(self._h)
        if rc < 0:
            raise self._error(rc)

    def _new_buffers(self) -> Any:
        # A new (cdata, buffer) pair, for a caller whose pop() found a sentinel (given back
        # here) or nothing. TableClosed once closed (close() empties the list).
        self._ensure_open()
        self._free.append(None)
        data = ffi.new("char[]", self.value_size)
        return (data, ffi.buffer(data))

    # ------------------------------------------------------------------ single-key operations

    def get(self, key: BytesLike, default: Any = None) -> Any:
        """The value of key, or default if absent."""
        # The hot path, written out: take the buffers, one C call, slice, give them back.
        try:
            out = self._free.pop()
        except IndexError:
            out = None
        if out is None:
            out = self._new_buffers()
        try:
            n = _get(self._h, key, len(key), out[0], self.value_size)
        except TypeError:
            key = _as_bytes(key, "key")
            n = _get(self._h, key, len(key), out[0], self.value_size)
        if n >= 0:
            value = out[1][0:n]
            self._free.append(out)
            return value
        self._free.append(out)
        if n == _NOTFOUND:
            return default
        raise self._error(n, key)

    def __getitem__(self, key: BytesLike) -> bytes:
        # get()'s body again, not a call to it: the call would cost more than the C lookup.
        try:
            out = self._free.pop()
        except IndexError:
            out = None
        if out is None:
            out = self._new_buffers()
        try:
            n = _get(self._h, key, len(key), out[0], self.value_size)
        except TypeError:
            key = _as_bytes(key, "key")
            n = _get(self._h, key, len(key), out[0], self.value_size)
        if n >= 0:
            value: bytes = out[1][0:n]
            self._free.append(out)
            return value
        self._free.append(out)
        if n == _NOTFOUND:
            raise KeyError(key)
        raise self._error(n, key)

    def __contains__(self, key: object) -> bool:
        try:
            n = _get(self._h, key, len(key), ffi.NULL, 0)  # type: ignore[arg-type]
        except TypeError:
            key = _as_bytes(key, "key")
            n = _get(self._h, key, len(key), ffi.NULL, 0)
        if n >= 0:
            return True
        if n == _NOTFOUND:
            return False
        raise self._error(n, key)

    def _put(self, key: Any, value: Any, flags: int, ttl_ns: int) -> int:
        try:
            rc: int = _put(self._h, key, len(key), value, len(value), flags, ttl_ns)
        except TypeError:
            key = _as_bytes(key, "key")
            value = _as_bytes(value, "value")
            rc = _put(self._h, key, len(key), value, len(value), flags, ttl_ns)
        if rc < 0:
            raise self._error(rc, key, value)
        return rc

    def __setitem__(self, key: BytesLike, value: BytesLike) -> None:
        self._put(key, value, 0, 0)

    def set(
        self, key: BytesLike, value: BytesLike, ttl: TTL = None, *, keep_ttl: bool = False
    ) -> bool:
        """Stores key = value, inserting or replacing. The value expires ``ttl`` seconds from
        now (None: never; a replaced value's deadline is dropped, as Redis's SET does), or,
        with keep_ttl=True, when the value it replaces would have.

        Returns True if a live key was evicted to make room (only in a table created with
        ``on_full="evict"``; nginx calls this "forcible"), else False. TableFull if key is new
        and the table is full; KeyTooLarge / ValueTooLarge over the limits. Nothing changes on
        error."""
        if keep_ttl:
            rc = self._put(key, value, _keep_flags(ttl), 0)
        else:
            rc = self._put(key, value, 0, 0 if ttl is None else _ttl_ns(ttl))
        return bool(rc & _EVICTED)

    def add(self, key: BytesLike, value: BytesLike, ttl: TTL = None) -> bool:
        """Stores key = value (expiring after ttl seconds) only if key is absent or expired;
        True if it was stored."""
        return bool(self._put(key, value, _IF_ABSENT, _ttl_ns(ttl)) & _INSERTED)

    def __delitem__(self, key: BytesLike) -> None:
        try:
            rc = _pop(self._h, key, len(key), ffi.NULL, 0)
        except TypeError:
            key = _as_bytes(key, "key")
            rc = _pop(self._h, key, len(key), ffi.NULL, 0)
        if rc < 0:
            if rc == _NOTFOUND:
                raise KeyError(key)
            raise self._error(rc, key)

    @overload
    def pop(self, key: BytesLike) -> bytes: ...
    @overload
    def pop(self, key: BytesLike, default: Any) -> Any: ...

    def pop(self, key: BytesLike, default: Any = _MISSING) -> Any:
        """Removes key and returns its value (atomically); default or KeyError if absent."""
        out = self._buffers()
        try:
            n = _pop(self._h, key, len(key), out[0], self.value_size)
        except TypeError:
            key = _as_bytes(key, "key")
            n = _pop(self._h, key, len(key), out[0], self.value_size)
        if n >= 0:
            value: bytes = out[1][0:n]  # sliced before the buffers go back (see _buffers)
            self._free.append(out)
            return value
        self._free.append(out)
        if n == _NOTFOUND:
            if default is _MISSING:
                raise KeyError(key)
            return default
        raise self._error(n, key)

    def setdefault(self, key: BytesLike, default: BytesLike = b"") -> bytes:
        """Returns the value of key, first storing default if key is absent (atomically)."""
        key = _as_bytes(key, "key")
        default = _as_bytes(default, "value")
        out = self._buffers()
        n = lib.shmkv_setdefault(
            self._h, key, len(key), default, len(default), out[0], self.value_size
        )
        if n < 0:
            self._free.append(out)
            raise self._error(n, key, default)
        value: bytes = out[1][0:n]
        self._free.append(out)
        return value

    def incr(self, key: BytesLike, delta: int = 1, initial: int = 0, ttl: TTL = None) -> int:
        """Adds delta to the signed 64-bit counter under key and returns the new count; an
        absent (or expired) key starts at initial and expires ttl seconds later, an existing
        counter keeps its deadline: ``incr(key, ttl=60)`` counts in fixed 60 s windows. The
        counter is stored as 8 little-endian bytes (``int.from_bytes(t[key], "little",
        signed=True)`` reads it). NotACounter if the value is not 8 bytes; CounterOverflow
        past the 64-bit range; nothing changes then."""
        _check_counter_args(delta, initial)
        ttl_ns = _ttl_ns(ttl)
        key = _as_bytes(key, "key")
        result = ffi.new("int64_t *")
        rc = lib.shmkv_incr(self._h, key, len(key), delta, initial, ttl_ns, result)
        if rc < 0:
            raise self._error(rc, key)
        return int(result[0])

    def compare_and_swap(
        self,
        key: BytesLike,
        expected: BytesLike | None,
        new: BytesLike,
        ttl: TTL = None,
        *,
        keep_ttl: bool = False,
    ) -> bool:
        """Stores new under key if its value is currently expected (or, with expected None,
        if key is absent); True if it did. One atomic step. ttl and keep_ttl as in set()."""
        flags = _keep_flags(ttl) if keep_ttl else 0
        if expected is None:
            return self.add(key, new, ttl)
        ttl_ns = _ttl_ns(ttl)
        key = _as_bytes(key, "key")
        expected = _as_bytes(expected, "expected")
        new = _as_bytes(new, "value")
        rc = lib.shmkv_compare_and_swap(
            self._h, key, len(key), expected, len(expected), new, len(new), flags, ttl_ns
        )
        if rc < 0:
            raise self._error(rc, key, new)
        return bool(rc == 1)

    # ------------------------------------------------------------------ expiry

    def ttl(self, key: BytesLike) -> float | None:
        """Seconds until key expires, or None if it never does. KeyError if key is absent
        (or expired)."""
        key = _as_bytes(key, "key")
        left = ffi.new("uint64_t *")
        rc = lib.shmkv_ttl(self._h, key, len(key), left)
        if rc == _NOTFOUND:
            raise KeyError(key)
        if rc < 0:
            raise self._error(rc, key)
        return left[0] / 1e9 if left[0] else None

    def _expire(self, key: BytesLike, ttl: TTL, flags: int) -> bool:
        ttl_ns = _ttl_ns(ttl)
        key = _as_bytes(key, "key")
        rc = lib.shmkv_expire(self._h, key, len(key), ttl_ns, flags)
        if rc < 0:
            raise self._error(rc, key)
        return bool(rc)

    def expire(self, key: BytesLike, ttl: TTL) -> bool:
        """Makes key expire ttl seconds from now (None: never, like Redis's PERSIST).
        True if key is present, False (and nothing changes) if not."""
        return self._expire(key, ttl, 0)

    def touch(self, key: BytesLike, ttl: TTL) -> bool:
        """Sliding expiry: like expire(), and it counts as a use of key, so that an evicting
        table keeps it. Call it on each use of a session to keep the session alive while it
        is used. True if key is present."""
        return self._expire(key, ttl, lib.SHMKV_TOUCH)

    def purge_expired(self) -> int:
        """Reclaims the room of every expired key now and returns how many there were.
        Expired keys are invisible anyway, and their room is reclaimed when needed; calling
        this from a timer in the master keeps that work off the workers' requests."""
        n = lib.shmkv_purge_expired(self._h)
        if n < 0:
            raise self._error(n)
        return int(n)

    # ------------------------------------------------------------------ whole-table operations

    def __len__(self) -> int:
        n = lib.shmkv_len(self._h)
        if n < 0:
            raise self._error(n)
        return int(n)

    def clear(self) -> None:
        """Removes every key, in one step."""
        rc = lib.shmkv_clear(self._h)
        if rc < 0:
            raise self._error(rc)

    def _snapshot(self, with_values: bool) -> list[Any]:
        """Every key (or (key, value) pair) at one instant, under one lock acquisition: what
        the caller iterates is safe whatever other processes do meanwhile."""
        needed = ffi.new("uint64_t *")
        while True:
            size = self._snapshot_size
            buf = ffi.new("char[]", size)
            n = lib.shmkv_snapshot(self._h, int(with_values), buf, size, needed)
            if n != lib.SHMKV_EBUFSIZE:
                break
            self._snapshot_size = needed[0] + needed[0] // 4 + 4096
        if n < 0:
            raise self._error(n)
        data = ffi.buffer(buf, needed[0])[:]
        records: list[Any] = []
        unpack = _U32.unpack_from
        pos = 0
        for _ in range(n):
            (klen,) = unpack(data, pos)
            key = data[pos + 4 : pos + 4 + klen]
            pos += 4 + klen
            if with_values:
                (vlen,) = unpack(data, pos)
                records.append((key, data[pos + 4 : pos + 4 + vlen]))
                pos += 4 + vlen
            else:
                records.append(key)
        return records

    def get_many(self, keys: Iterable[BytesLike]) -> dict[bytes, bytes]:
        """The values of the keys that are present, read under one lock acquisition."""
        blist = keys if type(keys) is list else list(keys)
        if set(map(type, blist)) != {bytes}:  # a per-key call only when some key is not bytes
            blist = [_as_bytes(key, "key") for key in blist]
        n = len(blist)
        if n == 0:
            self._ensure_open()
            return {}
        joined = b"".join(blist)
        klens = _lengths(blist)
        vlens = ffi.new("int64_t[]", n)
        needed = ffi.new("uint64_t *")
        # Room for every value at its largest, up to 1 MiB; past that, ask C what is needed.
        # Not zeroed: C writes what is read back.
        size = min(n * self.value_size, 1 << 20)
        while True:
            out = _uncleared("char[]", max(size, 1))
            rc = lib.shmkv_get_many(self._h, n, joined, klens, out, size, vlens, needed)
            if rc != lib.SHMKV_EBUFSIZE:
                break
            size = needed[0]
        if rc < 0:
            bad = next((k for k in blist if len(k) > self.key_size), None)
            raise self._error(rc, bad)
        data = ffi.buffer(out, needed[0])  # sliced straight into each value: one copy
        result: dict[bytes, bytes] = {}
        pos = 0
        for key, vlen in zip(blist, ffi.unpack(vlens, n)):
            if vlen >= 0:
                end = pos + vlen
                result[key] = data[pos:end]
                pos = end
        return result

    def set_many(
        self, mapping: Mapping[BytesLike, BytesLike] | Iterable[Any], ttl: TTL = None
    ) -> None:
        """Stores every pair under one lock acquisition, each expiring after ttl seconds
        (None: never). All or nothing: TableFull (and no change) if the new keys do not fit;
        an evicting table evicts other keys to make room, never keys of the batch, and
        raises TableFull only for a batch larger than the table."""
        ttl_ns = _ttl_ns(ttl)
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        batch: dict[bytes, bytes] = {}
        try:
            items = iter(pairs)
        except TypeError:
            raise TypeError(f"set_many() takes a mapping or an iterable of (key, value) "
                            f"pairs, not {type(mapping).__name__}") from None
        for i, item in enumerate(items):
            try:
                key, value = item
            except (TypeError, ValueError):
                raise TypeError(f"set_many() takes a mapping or an iterable of (key, value) "
                                f"pairs; item {i} is {type(item).__name__} {item!r:.40}"
                                ) from None
            batch[_as_bytes(key, "key")] = _as_bytes(value, "value")
        if not batch:
            self._ensure_open()
            return
        keys = list(batch)
        values = list(batch.values())
        rc = lib.shmkv_set_many(
            self._h,
            len(keys),
            b"".join(keys),
            _lengths(keys),
            b"".join(values),
            _lengths(values),
            ttl_ns,
            ffi.new("uint64_t[]", 2 * len(keys)),
        )
        if rc < 0:
            key = next((k for k in keys if len(k) > self.key_size), None)
            value = next((v for v in values if len(v) > self.value_size), None)
            raise self._error(rc, key, value)

    # ------------------------------------------------------------------ introspection

    def stats(self, *, wait: bool = True) -> dict[str, Any]:
        """Geometry, fill and counters, read in one consistent step under the lock. With
        wait=False, read without the lock (never blocks; the figures may be mid-update).
        Reading changes nothing, so "len" counts expired keys whose room is not reclaimed
        yet (len() reclaims it first); "expirations" counts reclaimed ones, "evictions"
        live keys evicted to make room."""
        s = ffi.new("struct shmkv_stats *")
        rc = (lib.shmkv_stats if wait else lib.shmkv_peek_stats)(self._h, s)
        if rc < 0:
            raise self._error(rc)
        g = s.geometry
        free = int(s.bytes_free)
        return {
            "name": self._name,
            "version": s.version,
            "capacity": g.capacity,
            "len": s.count,
            "on_full": self.on_full,
            "key_size": g.key_size,
            "value_size": g.value_size,
            "index_slots": g.nslots,
            "segment_size": g.total_size,
            "memory": g.memory or None,
            "data_size": g.data_size,
            "bytes_stored": s.bytes_stored,
            "bytes_used": g.data_size - free,
            "bytes_free": free,
            "largest_free": s.largest_free,
            # Compaction gathers all free room: an entry fits if its block fits in it.
            "largest_item": max(0, free - _BLOCK_HEADER) if wait else None,
            "fragmentation": (1 - s.largest_free / free if free and wait else 0.0),
            "free_blocks": s.free_blocks,
            "hits": s.hits,
            "misses": s.misses,
            "inserts": s.inserts,
            "updates": s.updates,
            "deletes": s.deletes,
            "evictions": s.evictions,
            "expirations": s.expirations,
            "recoveries": s.recoveries,
            "lock_timeouts": s.lock_timeouts,
            "compactions": s.compactions,
            "moved_bytes": s.moved_bytes,
            "broken": bool(s.broken),
            "creator_pid": s.creator_pid,
        }

    def check(self) -> None:
        """Walks the whole table and verifies every invariant (see csrc/table.c).
        CheckFailed, naming the first violated invariant, if one does not hold."""
        invariant = ffi.new("int *")
        rc = lib.shmkv_check(self._h, invariant)
        if rc == lib.SHMKV_ECHECK:
            number = invariant[0]
            text = ffi.string(lib.shmkv_invariant_text(number)).decode()
            exc = error_for(rc, f"table {self._name!r}: invariant {number} violated ({text})")
            exc.invariant = number  # type: ignore[attr-defined]
            raise exc
        if rc < 0:
            raise self._error(rc)

    def probe_lengths(self) -> list[int]:
        """How far each live key is from its home slot: element i counts the keys that a
        lookup finds at its (i+1)-th probe (the last element, at the 32nd or later)."""
        hist = ffi.new("uint64_t[]", 32)
        rc = lib.shmkv_probe_lengths(self._h, hist, 32)
        if rc < 0:
            raise self._error(rc)
        return [int(n) for n in hist]

    def _crash_after_for_testing(self, points: int) -> None:
        # Ends this process, lock held, at the points-th crash point from now (layout.h).
        lib.shmkv_testing_crash_after(points)

    @staticmethod
    def _set_clock_for_testing(seconds: float | None) -> None:
        # Deadlines in this process are read from a clock stopped at `seconds` (None: the
        # real clock again). Process-wide: tests must restore it.
        lib.shmkv_testing_set_clock(0 if seconds is None else max(1, round(seconds * 1e9)))

    def _hold_lock_for_testing(self, hold: bool = True, *, writer: bool = True) -> None:
        # Takes the lock and keeps it, as a writer or as a reader that optimistic gets do
        # not wait for, so a test process can die holding it; hold=False releases it (a
        # process must, before it closes the table).
        rc = lib.shmkv_testing_hold_lock(self._h, 0 if not hold else 1 if writer else 2)
        if rc < 0:
            raise self._error(rc)


# Every Table of this process, so that a forked child can give each a fresh close() lock: a
# thread of the parent that was inside close() when another forked holds it, and no such
# thread exists in the child to release it.
_live: weakref.WeakValueDictionary[int, Table] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    for table in list(_live.values()):
        table._close_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def process_state(tid: int) -> tuple[int, str] | None:
    """The process of a thread (or process) id and "alive" or "alive and stopped"; None if
    no such thread exists here."""
    try:
        with open(f"/proc/{tid}/status") as status:
            fields = dict(line.split(":\t", 1) for line in status if ":\t" in line)
        pid = int(fields["Tgid"])
    except (OSError, KeyError, ValueError):
        return None
    stopped = fields.get("State", "").strip().startswith(("T", "t"))
    return pid, "alive and stopped" if stopped else "alive"


def _describe_owner(tid: int, *, other_pidns: bool = False, pid: int = 0) -> str:
    """Who holds a lock, from the owner's thread id: its process, and whether it lives.
    other_pidns: the holder recorded a PID namespace other than ours (pid: its process id
    there), so its tid means nothing here and no local process is named."""
    if tid <= 0:
        return "which was released meanwhile" if tid == 0 else "held by an unknown owner"
    if other_pidns:
        of = f" (process {pid} there)" if pid > 0 else ""
        return f"held by thread {tid}{of} of another PID namespace"
    found = process_state(tid)
    if found is None:
        return (f"held by thread {tid}, which does not exist here: the lock word is damaged, "
                "or its owner lives in another PID namespace")
    return f"held by process {found[0]} ({found[1]})"


_CODE_NAMES = {lib.SHMKV_EKEYSIZE: "EKEYSIZE", lib.SHMKV_EVALUESIZE: "EVALUESIZE",
               lib.SHMKV_ECLOSED: "ECLOSED"}


def _reattach(name: str, lock_timeout: float) -> Table:
    from ._open import attach  # unpickling: _open imports this module

    return attach(name, lock_timeout=lock_timeout)
