"""A Django cache backend on a shmkv table, shared by every worker process of the machine.

::

    CACHES = {
        "default": {
            "BACKEND": "shmkv.contrib.django.ShmkvCache",
            "LOCATION": "shm://cache?capacity=100000&value_size=65536&memory=32MiB&on_full=evict",
        }
    }

``LOCATION`` is a URL for :func:`shmkv.connect`: ``shm://NAME?capacity=...`` creates the table
on first use (or attaches to it), ``redis://HOST/DB?name=NAME`` keeps the cache on a Redis
server instead; ``OPTIONS`` are passed to connect() as keywords (``{"lock_timeout": 1}``).
Each process connects once per LOCATION, on its first use of the cache (so after gunicorn
forks it), and every thread of the process shares that table. ``close()``, which Django calls
after every request, keeps it: it costs nothing to keep a table mapped.

What Django's ``BaseCache`` promises, this backend keeps: timeouts (``None`` for ever, ``0``
or less expires at once, ``DEFAULT_TIMEOUT`` the ``TIMEOUT`` setting), ``KEY_PREFIX``,
``VERSION`` and ``KEY_FUNCTION``, and the async ``a*`` methods. ``incr``/``decr`` are atomic
across every process. Beyond that:

- Values are pickled, except ints, which are stored as the table's own counters. Pickles run
  code chosen by whoever wrote them: the table is as trusted as every process that can write
  it (see the README's Security model).
- A key whose UTF-8 form is longer than the table's ``key_size`` is stored under a hash of it
  (BLAKE2b, 256 bits), so that long keys (``cache_page``'s are about 100 bytes) fit.
- A value that does not fit (longer than ``value_size``, or a full table created with
  ``on_full="error"``) is not stored and deletes the old value of its key, as Django's
  memcached backends do: ``set`` says nothing, ``add`` returns False, ``set_many`` returns
  the keys that were not stored. Give the table ``on_full="evict"`` to make it a cache.
- ``clear()`` empties the whole table: give the cache a table of its own.
- Culling (``MAX_ENTRIES``, ``CULL_FREQUENCY``) does not apply: the table's ``capacity`` and
  ``memory`` bound it, and ``on_full="evict"`` evicts the least recently used keys.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
from collections.abc import Iterable
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from .._connect import AnyTable, connect
from .._table import MAX_TTL, Table
from ..errors import TableFull, ValueTooLarge

# THE VALUE ENCODING
# An int in the signed 64-bit range is stored as the table's counter: in shared memory, its 8
# little-endian bytes (what Table.incr reads and writes); on Redis, its decimal text (what
# INCRBY reads). Every other value is _PICKLED followed by its pickle. The two never meet:
# - in shared memory, a counter is exactly 8 bytes, and a pickled value never is: one whose
#   tag and pickle come to 8 bytes gets one more byte, _PAD, after the pickle (pickle.loads
#   ignores bytes past the pickle's STOP), so the length alone tells them apart (no pickle
#   of protocol 4 or 5 is 7 bytes long, a frame takes 9, but the rule does not rely on it);
# - on Redis, decimal text starts with a digit or "-", and a pickled value with _PICKLED.
# bool, an int subclass, and ints past 64 bits are pickled: they come back as they went in.
_PICKLED = b"p"
_PAD = b"\0"
_COUNTER = 8
_PROTOCOL = pickle.HIGHEST_PROTOCOL

# A key longer than the table's key_size becomes _HASHED followed by its BLAKE2b digest.
# _HASHED (0xff) never occurs in UTF-8, so a hashed key never equals a key stored as it is.
_HASHED = b"\xff"
_DIGEST = 32
_HASHED_LENGTH = len(_HASHED) + _DIGEST

# Django's options that do not apply here (see the module's docstring), left out of the
# keywords that go to shmkv.connect().
_DJANGO_OPTIONS = ("MAX_ENTRIES", "CULL_FREQUENCY")

# One table per process per (LOCATION, OPTIONS), shared by the threads of the process (Django
# makes a backend object per thread and per async task): (pid, table) by that key.
_tables: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[int, AnyTable]] = {}
_tables_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock as another forked: no such thread here.
    global _tables_lock
    _tables_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ShmkvCache(BaseCache):  # type: ignore[misc]
    """Django's cache on a shmkv table (or a RedisTable): ``BACKEND =
    "shmkv.contrib.django.ShmkvCache"``, ``LOCATION`` a URL for :func:`shmkv.connect`. See
    the module's docstring for what it stores and how."""

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        if not isinstance(location, str) or not location:
            raise ValueError("ShmkvCache needs a LOCATION: a shm:// or redis:// URL")
        self._location = location
        options = params.get("OPTIONS", {})
        self._options = {key: value for key, value in options.items()
                         if key not in _DJANGO_OPTIONS}
        self._key_of = (location, tuple(sorted(self._options.items())))

    # ------------------------------------------------------------------ the table

    @property
    def table(self) -> AnyTable:
        """The table of this process, connected to on first use here (and again in a process
        forked since). Raises what :func:`shmkv.connect` raises, and ValueError for a table
        whose keys are too short for a hashed key."""
        entry = _tables.get(self._key_of)
        pid = os.getpid()
        if entry is not None and entry[0] == pid:
            return entry[1]
        with _tables_lock:
            entry = _tables.get(self._key_of)
            if entry is None or entry[0] != pid:
                table = connect(self._location, **self._options)
                if table.key_size is not None and table.key_size < _HASHED_LENGTH:
                    table.close()
                    raise ValueError(f"{self._location!r}: a cache's keys need key_size >= "
                                     f"{_HASHED_LENGTH} (long keys are stored as a hash)")
                entry = (pid, table)
                _tables[self._key_of] = entry
        return entry[1]

    def _key(self, key: Any, version: int | None) -> bytes:
        """The table's key for a Django key: made and validated as BaseCache says, in UTF-8,
        hashed when longer than the table allows."""
        data: bytes = self.make_and_validate_key(key, version=version).encode()
        limit = self.table.key_size
        if limit is not None and len(data) > limit:
            return _HASHED + hashlib.blake2b(data, digest_size=_DIGEST).digest()
        return data

    def _ttl(self, timeout: Any) -> float | None | bool:
        """A Django timeout as a table's ttl: seconds, None (never), or False for a timeout
        of 0 or less (expired at once). Longer than the table's longest ttl (146 years) is
        never."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None or timeout > MAX_TTL:
            return None
        if timeout <= 0:
            return False
        return timeout  # type: ignore[no-any-return]

    def _encode(self, value: Any, table: AnyTable) -> bytes:
        """A value as the table stores it: see THE VALUE ENCODING above. Raises what pickle
        raises for a value it cannot pickle."""
        if type(value) is int and -(2**63) <= value < 2**63:
            if isinstance(table, Table):
                return value.to_bytes(_COUNTER, "little", signed=True)
            return str(value).encode()
        data = _PICKLED + pickle.dumps(value, _PROTOCOL)
        return data + _PAD if len(data) == _COUNTER else data

    def _decode(self, data: bytes, table: AnyTable) -> Any:
        if isinstance(table, Table):
            if len(data) == _COUNTER:
                return int.from_bytes(data, "little", signed=True)
        elif data[:1] != _PICKLED:
            return int(data)
        if data[:1] != _PICKLED:
            raise ValueError(f"a value of {len(data)} bytes in table {table.name!r} that "
                             "ShmkvCache did not write")
        return pickle.loads(data[1:])

    # ------------------------------------------------------------------ one key

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> bool:
        """Stores value only if key is absent (or expired); True if it did. With a timeout
        of 0 or less nothing is stored, and it says whether it would have been. False, too,
        for a value that does not fit."""
        table = self.table
        k = self._key(key, version)
        data = self._encode(value, table)
        ttl = self._ttl(timeout)
        if ttl is False:
            return k not in table
        try:
            return table.add(k, data, ttl)
        except (TableFull, ValueTooLarge):
            return False

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        table = self.table
        data = table.get(self._key(key, version))
        return default if data is None else self._decode(data, table)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> None:
        """Stores value under key. With a timeout of 0 or less, or a value that does not fit,
        it deletes key instead (no stale value survives a failed set)."""
        table = self.table
        k = self._key(key, version)
        data = self._encode(value, table)
        ttl = self._ttl(timeout)
        if ttl is not False:
            try:
                table.set(k, data, ttl)
                return
            except (TableFull, ValueTooLarge):
                pass
        table.pop(k, None)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
              version: int | None = None) -> bool:
        """Gives key a new timeout (and marks it used); False if it is absent."""
        table = self.table
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        if ttl is False:
            return table.pop(k, None) is not None
        return table.touch(k, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Removes key; True if it was there."""
        table = self.table
        try:
            del table[self._key(key, version)]
        except KeyError:
            return False
        return True

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._key(key, version) in self.table

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Adds delta to the value of key, atomically across every process, and returns the
        new value; ValueError if key is absent, and what ``value + delta`` raises for a value
        that is no number (TypeError for None).

        A compare-and-swap rather than Table.incr: Table.incr creates an absent key, where
        Django's incr must raise and create nothing, and a check before it would bring back
        a key that another process deleted between the two. The swap also keeps what
        ``value + delta`` gives for any value, as Django's other backends do: a float, or an
        int that outgrows 64 bits (then pickled). It keeps the key's deadline."""
        table = self.table
        k = self._key(key, version)
        while True:
            data = table.get(k)
            if data is None:
                raise ValueError(f"Key '{key}' not found")
            new_value = self._decode(data, table) + delta
            if table.compare_and_swap(k, data, self._encode(new_value, table), keep_ttl=True):
                return new_value

    # ------------------------------------------------------------------ many keys

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """The values of the keys that are present, read in one step."""
        table = self.table
        by_key = {self._key(key, version): key for key in keys}
        found = table.get_many(list(by_key))
        return {by_key[k]: self._decode(data, table) for k, data in found.items()}

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                 version: int | None = None) -> list[Any]:
        """Stores every pair, in one step when they all fit; returns the keys that were not
        stored (and so were deleted), as Django's memcached backends do."""
        table = self.table
        ttl = self._ttl(timeout)
        batch = {self._key(key, version): (key, self._encode(value, table))
                 for key, value in data.items()}
        if ttl is False:
            self._delete_keys(table, batch)
            return []
        try:
            table.set_many({k: value for k, (_, value) in batch.items()},
                           ttl)
            return []
        except (TableFull, ValueTooLarge):
            pass
        failed = []
        for k, (key, value) in batch.items():  # one by one, to find which do not fit
            try:
                table.set(k, value, ttl)
            except (TableFull, ValueTooLarge):
                table.pop(k, None)
                failed.append(key)
        return failed

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        table = self.table
        self._delete_keys(table, [self._key(key, version) for key in keys])

    @staticmethod
    def _delete_keys(table: AnyTable, keys: Iterable[bytes]) -> None:
        for k in keys:
            table.pop(k, None)

    def clear(self) -> None:
        """Removes every key of the table, not only this cache's: give a cache its own."""
        self.table.clear()

    def close(self, **kwargs: Any) -> None:
        """Does nothing: the table stays mapped for the next request of every thread of this
        process (Django calls this after each request)."""

    # ------------------------------------------------------------------ async
    # BaseCache runs add, get, set, touch, delete and clear in a thread for their a* forms.
    # Its aincr is a get and a set (not atomic), and its aget_many, aset_many, adelete_many
    # and ahas_key go key by key through aget and aset: these run the methods above instead.

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await sync_to_async(self.incr, thread_sensitive=True)(key, delta, version)

    async def aget_many(self, keys: Iterable[Any],
                        version: int | None = None) -> dict[Any, Any]:
        found: dict[Any, Any] = await sync_to_async(self.get_many, thread_sensitive=True)(
            keys, version)
        return found

    async def aset_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                        version: int | None = None) -> list[Any]:
        failed: list[Any] = await sync_to_async(self.set_many, thread_sensitive=True)(
            data, timeout, version)
        return failed

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        await sync_to_async(self.delete_many, thread_sensitive=True)(keys, version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        found: bool = await sync_to_async(self.has_key, thread_sensitive=True)(key, version)
        return found
