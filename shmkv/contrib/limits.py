"""Rate limits in a shmkv table: a storage for the ``limits`` library (and so for
Flask-Limiter and slowapi), shared by every process of the machine.

::

    import shmkv.contrib.limits  # registers the shmkv:// scheme: import it first
    from limits.storage import storage_from_string
    storage = storage_from_string("shmkv://ratelimits?capacity=100000")

Importing this module registers :class:`ShmkvStorage` under the scheme ``shmkv`` and
:class:`AsyncShmkvStorage` under ``async+shmkv``. ``shmkv://NAME?...`` takes what a
``shm://NAME?...`` URL takes (see :func:`shmkv.connect`): with ``capacity`` each process
creates the table or attaches to it (race-free), without it the table must exist. Each
process connects on its first use, so the storage may be made before gunicorn forks its
workers. A Redis URL goes on using limits' own Redis storage (``redis://...``).

The three strategies of ``limits``, each atomic across processes through one key:

- **fixed window**: a counter made by ``incr(..., ttl=expiry)``, which sets the deadline only
  when it creates the counter;
- **moving window**: one value per key holding the window's hits as (time, cost) pairs of 16
  bytes, newest first, replaced by a compare-and-swap loop. A window of more pairs than the
  table's ``value_size`` holds merges its two oldest pairs into one at the newer time: the
  merged hits then count a little longer than they should, so the limit errs on the strict
  side and never admits more than it says. ``value_size=1024`` holds 64 pairs exactly: give
  the table ``value_size=16 * N`` for limits of N hits that must expire one by one;
- **sliding window counter**: one value per key holding the current window's number and the
  counts of the current and previous windows (windows aligned on multiples of the period
  since the epoch, as limits' memory and memcached storages align them), replaced by a
  compare-and-swap loop: it never admits more than the limit, even when many processes hit
  at the end of a window.

Keys live under the prefix ``limits.`` (so the table can hold other data too); a key longer
than the table's ``key_size`` is stored under a 128-bit BLAKE2b digest of itself.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from typing import Any, Callable

from limits.aio.storage import MovingWindowSupport as AsyncMovingWindowSupport
from limits.aio.storage import SlidingWindowCounterSupport as AsyncSlidingWindowCounterSupport
from limits.aio.storage import Storage as AsyncStorage
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from .._connect import connect
from .._table import Table
from ..errors import Error

__all__ = ["SCHEME", "AsyncShmkvStorage", "ShmkvStorage"]

#: The URL scheme this module registers with limits (and ``async+shmkv`` for asyncio).
SCHEME = "shmkv"

_PREFIX = b"limits."
_COUNTER = _PREFIX + b"c:"  # fixed-window counters: incr()'s 8 little-endian bytes
_MOVING = _PREFIX + b"m:"  # moving windows: _HITS pairs, newest first
_SLIDING = _PREFIX + b"s:"  # sliding window counters: _SLIDING_STATE
_HITS = struct.Struct("<dq")  # when, how many
_SLIDING_STATE = struct.Struct("<qqq")  # window number, previous count, current count
_DIGEST_SIZE = 16

Clock = Callable[[], float]


class ShmkvStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport,
                   TimestampedSlidingWindow):
    """limits' storage in a shmkv table: ``shmkv://NAME?capacity=...`` (what ``shm://``
    takes). ``options`` (keywords, e.g. Flask-Limiter's ``storage_options``) add to or
    override the URL's query, as in :func:`shmkv.connect`. ``clock`` gives the time in seconds
    since the epoch of the moving and sliding windows (``time.time``; tests inject their own);
    the deadlines of keys are the table's.

    Errors of the table (``shmkv.Error``: TableFull, LockTimeout, ValueTooLarge...) are
    raised as they are, or as ``limits.errors.StorageError`` with ``wrap_exceptions=True``."""

    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, *,
                 clock: Clock = time.time, **options: Any) -> None:
        """Checks the URL at once (ValueError for one that is not ``shmkv://NAME...``);
        connects on first use, once per process."""
        if uri is None or not uri.startswith(f"{SCHEME}://"):
            raise ValueError(f"{uri!r}: a shmkv storage URL is {SCHEME}://NAME?capacity=...")
        self.url = "shm://" + uri[len(SCHEME) + 3:]
        self.options = options
        self.clock = clock
        self._table: Table | None = None
        self._pid = -1
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def table(self) -> Table:
        """The table, connected on first use in each process (a forked worker connects anew).
        Raises what :func:`shmkv.connect` raises."""
        if self._table is None or self._pid != os.getpid():
            table = connect(self.url, **self.options)
            if not isinstance(table, Table):  # pragma: no cover - connect() of shm://
                raise TypeError(f"{self.url!r} is not a shared-memory table")
            self._table, self._pid = table, os.getpid()
        return self._table

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return Error

    def _key(self, prefix: bytes, key: str) -> bytes:
        full = prefix + key.encode()
        if len(full) <= self.table.key_size:
            return full
        return prefix + b"#" + hashlib.blake2b(full, digest_size=_DIGEST_SIZE).hexdigest().encode()

    # ------------------------------------------------------------------ fixed window

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Adds amount to the counter of key and returns it; a new counter expires expiry
        seconds later (a fixed window)."""
        return self.table.incr(self._key(_COUNTER, key), amount, ttl=expiry)

    def get(self, key: str) -> int:
        """The counter of key, 0 if there is none (or it expired)."""
        value = self.table.get(self._key(_COUNTER, key))
        return 0 if value is None else int.from_bytes(value, "little", signed=True)

    def get_expiry(self, key: str) -> float:
        """When the counter of key expires, in seconds since the epoch (now if it does not
        exist)."""
        now = self.clock()
        try:
            left = self.table.ttl(self._key(_COUNTER, key))
        except KeyError:
            return now
        return now + (left or 0.0)

    def check(self) -> bool:
        """True if the table answers (raises what connect() raises if it cannot be had)."""
        self.table.stats(wait=False)
        return True

    def reset(self) -> int | None:
        """Removes every rate-limit key of the table (and nothing else) and says how many."""
        table = self.table
        removed = 0
        for key in list(table):
            if key.startswith(_PREFIX) and table.pop(key, None) is not None:
                removed += 1
        return removed

    def clear(self, key: str) -> None:
        """Forgets the counter and the moving window of key."""
        for prefix in (_COUNTER, _MOVING):
            self.table.pop(self._key(prefix, key), None)

    # ------------------------------------------------------------------ moving window

    def _swap(self, key: bytes, admit: Callable[[bytes | None], bytes | None],
              ttl: float) -> bool:
        """Replaces key's value by admit(value) (None: refuse) in one compare-and-swap, or
        one add() for an absent key, reading again whenever another process got there first:
        exact under any concurrency. True if admitted."""
        table = self.table
        while True:
            old = table.get(key)
            new = admit(old)
            if new is None:
                return False
            if old is None:
                if table.add(key, new, ttl=ttl):
                    return True
            elif table.compare_and_swap(key, old, new, ttl=ttl):
                return True

    def _window(self, value: bytes | None, now: float, expiry: float) -> list[tuple[float, int]]:
        """The (time, cost) pairs of a stored window that are inside it at now, newest
        first."""
        if not value:
            return []
        start = now - expiry
        return [pair for pair in _HITS.iter_unpack(value) if pair[0] >= start]

    def _pack_window(self, pairs: list[tuple[float, int]], room: int) -> bytes:
        """pairs as stored, the two oldest merged (at the newer time) while they exceed room
        bytes."""
        while len(pairs) > 1 and len(pairs) * _HITS.size > room:
            (newer, newer_cost), (_, older_cost) = pairs[-2:]
            pairs[-2:] = [(newer, newer_cost + older_cost)]
        return b"".join(_HITS.pack(*pair) for pair in pairs)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Adds amount hits to the moving window of key if it then holds at most limit hits of
        the last expiry seconds; True if it did. One compare-and-swap: exact under any
        concurrency."""
        if amount > limit:
            return False
        def admit(old: bytes | None) -> bytes | None:
            now = self.clock()
            pairs = self._window(old, now, expiry)
            if sum(cost for _, cost in pairs) + amount > limit:
                return None
            return self._pack_window([(now, amount), *pairs], self.table.value_size)

        return self._swap(self._key(_MOVING, key), admit, expiry)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(the time of the oldest hit in the window, the number of hits in it); (now, 0) for
        an empty window."""
        now = self.clock()
        pairs = self._window(self.table.get(self._key(_MOVING, key)), now, expiry)
        if not pairs:
            return now, 0
        return pairs[-1][0], sum(cost for _, cost in pairs)

    # ------------------------------------------------------------------ sliding window counter

    def _sliding(self, value: bytes | None, window: int) -> tuple[int, int, int]:
        """(window number, previous count, current count) of a stored state, moved on to
        window (a state from a later window, by a process whose clock is ahead, stays)."""
        if value is None:
            return window, 0, 0
        stored, previous, current = _SLIDING_STATE.unpack(value)
        if stored >= window:
            return stored, previous, current
        if stored == window - 1:
            return window, current, 0
        return window, 0, 0

    def _sliding_info(self, window: int, previous: int, current: int, now: float,
                      expiry: int) -> tuple[int, float, int, float]:
        # The same arithmetic as limits' timestamp-keyed storages (memory, memcached).
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int,
                                     amount: int = 1) -> bool:
        """Adds amount to the current window's count of key if the weighted count (the
        previous window's, weighted by how much of it still overlaps the last expiry seconds,
        plus the current one's) then stays at most limit; True if it did. One
        compare-and-swap: exact under any concurrency."""
        if amount > limit:
            return False
        def admit(old: bytes | None) -> bytes | None:
            now = self.clock()
            window, previous, current = self._sliding(old, int(now / expiry))
            _, previous_ttl, _, _ = self._sliding_info(window, previous, current, now, expiry)
            if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
                return None
            return _SLIDING_STATE.pack(window, previous, current + amount)

        return self._swap(self._key(_SLIDING, key), admit, 2 * expiry)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """(previous window's count, seconds it still counts for, current window's count,
        seconds until the current window's count expires)."""
        now = self.clock()
        state = self._sliding(self.table.get(self._key(_SLIDING, key)), int(now / expiry))
        return self._sliding_info(*state, now, expiry)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Forgets both windows of key."""
        self.table.pop(self._key(_SLIDING, key), None)


class AsyncShmkvStorage(AsyncStorage, AsyncMovingWindowSupport,
                        AsyncSlidingWindowCounterSupport, TimestampedSlidingWindow):
    """The same storage for ``limits.aio`` (``async+shmkv://NAME?...``). Each call is one
    short operation on shared memory (no I/O to wait for), so it runs inline, as
    :class:`ShmkvStorage` does it; only a table's lock held by another process makes it wait,
    for at most the table's ``lock_timeout``."""

    STORAGE_SCHEME = [f"async+{SCHEME}"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, *,
                 clock: Clock = time.time, **options: Any) -> None:
        """As :class:`ShmkvStorage`, for a URL that starts with ``async+shmkv://``."""
        prefix = "async+"
        if uri is None or not uri.startswith(prefix):
            raise ValueError(f"{uri!r}: an async shmkv storage URL is "
                             f"async+{SCHEME}://NAME?capacity=...")
        self.sync = ShmkvStorage(uri[len(prefix):], clock=clock, **options)
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return Error

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        return self.sync.incr(key, expiry, amount)

    async def get(self, key: str) -> int:
        return self.sync.get(key)

    async def get_expiry(self, key: str) -> float:
        return self.sync.get_expiry(key)

    async def check(self) -> bool:
        return self.sync.check()

    async def reset(self) -> int | None:
        return self.sync.reset()

    async def clear(self, key: str) -> None:
        self.sync.clear(key)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.sync.acquire_entry(key, limit, expiry, amount)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.sync.get_moving_window(key, limit, expiry)

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int,
                                           amount: int = 1) -> bool:
        return self.sync.acquire_sliding_window_entry(key, limit, expiry, amount)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self.sync.get_sliding_window(key, expiry)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.sync.clear_sliding_window(key, expiry)

