"""A Flask-Caching backend whose cache is a shmkv table, shared by every worker of the server.

::

    app.config["CACHE_TYPE"] = "shmkv.contrib.flask_caching.ShmkvCache"
    app.config["CACHE_SHMKV_URL"] = "shm://cache?capacity=100000&memory=64MiB&on_full=evict"
    cache = Cache(app)

``CACHE_SHMKV_URL`` is what ``CACHE_REDIS_URL`` is for Redis: any URL of
:func:`shmkv.connect` (``redis://...?name=NAME`` works too). Each process connects on first
use, so the app may be created before or after the server forks its workers. Create the table
with ``on_full="evict"``: a cache is always full, and then the least recently used entries
make room instead of writes failing.

cachelib's rules hold, as for its other backends: keys are str (``CACHE_KEY_PREFIX``, by
default ``flask_cache_``, is prepended); values go through ``serializer`` (pickle, like
cachelib's RedisCache: as trusted as every process that can write the table); a timeout is
whole seconds or a timedelta, **0 means never expire** and None means ``default_timeout``
(``CACHE_DEFAULT_TIMEOUT``); a negative timeout expires at once. ``inc``/``dec`` are atomic
across processes (a compare-and-swap loop). A value that does not fit (larger than the
table's ``value_size``, or a full table that does not evict) is a backend error: ``set`` and
``add`` return False, as cachelib says, and the cache stays as it was.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
from collections.abc import Callable
from typing import Any, Union

from cachelib import BaseCache as CachelibBaseCache
from flask import Flask
from flask_caching.backends.base import BaseCache

from .._connect import AnyTable, connect
from ..errors import TableFull, ValueTooLarge

Timeout = Union[int, dt.timedelta, None]
#: What a value that does not fit raises: cachelib's "backend error", False from set/add.
_NO_ROOM = (ValueTooLarge, TableFull)


class PickleSerializer:
    """Values as pickles (highest protocol). dumps raises what pickle raises; loads returns
    None for bytes that are not a pickle, as cachelib's serializers do."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError):
            return None


# Without Flask-Caching's types (mypy outside the test extra) BaseCache is Any.
class ShmkvCache(BaseCache):  # type: ignore[misc,unused-ignore]
    """A cachelib cache (and Flask-Caching backend) over a shmkv table or a RedisTable.

    ``store``: a table, or a URL for :func:`shmkv.connect`, connected to once per process on
    first use. ``key_prefix``: a str, or a callable returning one, prepended to every key.
    ``clear()`` removes the keys under the prefix (every key of the table when there is no
    prefix). The rest as in :class:`cachelib.BaseCache`. The serializer may be replaced (an
    object with ``dumps``/``loads``, such as ``cachelib.serializers.JSONSerializer()``)."""

    serializer: Any = PickleSerializer()

    def __init__(
        self,
        store: str | AnyTable,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str | Callable[[], str] | None = None,
        ignore_delete_many_errors: bool = False,
    ) -> None:
        """Raises TypeError unless store is a str or a table. The URL is connected to (and
        the errors of :func:`shmkv.connect` raised) on first use: see :attr:`table`."""
        if not isinstance(store, str) and not hasattr(store, "compare_and_swap"):
            raise TypeError(f"store must be a shmkv URL or table, not {type(store).__name__}")
        # cachelib's own __init__: Flask-Caching's types its timeout as int alone.
        CachelibBaseCache.__init__(self, default_timeout=default_timeout,
                                   ignore_delete_many_errors=ignore_delete_many_errors)
        self._store = store
        self._table: Any = None
        self._pid = -1
        self.key_prefix = key_prefix or ""

    @classmethod
    def factory(cls, app: Flask, config: dict[str, Any], args: list[Any],
                kwargs: dict[str, Any]) -> ShmkvCache:
        """What Flask-Caching calls for ``CACHE_TYPE = "shmkv.contrib.flask_caching.
        ShmkvCache"``: the table is ``CACHE_SHMKV_URL`` (or ``CACHE_ARGS[0]``), the prefix
        ``CACHE_KEY_PREFIX``; kwargs hold ``default_timeout`` and ``CACHE_OPTIONS``.
        Raises ValueError when no URL is configured."""
        url = config.get("CACHE_SHMKV_URL")
        if url:
            args = [url, *args]
        if not args and "store" not in kwargs:
            raise ValueError("ShmkvCache needs the table's URL in CACHE_SHMKV_URL, e.g. "
                             "shm://cache?capacity=100000&memory=64MiB&on_full=evict")
        if config.get("CACHE_KEY_PREFIX"):
            kwargs.setdefault("key_prefix", config["CACHE_KEY_PREFIX"])
        return cls(*args, **kwargs)

    @property
    def table(self) -> AnyTable:
        """The table of this process: a URL is connected to on first use in each process
        (and again in a process forked since). Raises what :func:`shmkv.connect` raises."""
        if self._pid != os.getpid():
            store = self._store
            self._table = connect(store) if isinstance(store, str) else store
            self._pid = os.getpid()
        return self._table  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ keys and timeouts

    def _prefix(self) -> str:
        prefix = self.key_prefix
        return prefix if isinstance(prefix, str) else prefix()

    def _key(self, key: str | Callable[[], str]) -> bytes:
        # cachelib's own tests pass callables as keys too (RedisCache accepts them).
        return (self._prefix() + (key if isinstance(key, str) else key())).encode()

    def _ttl(self, timeout: Timeout) -> float | None:
        """cachelib's timeout as a table's ttl: None (never) for 0, a negative number for
        "expired already"."""
        seconds = self._normalize_timeout(timeout)
        return None if seconds == 0 else float(seconds)

    # ------------------------------------------------------------------ the cachelib API

    def get(self, key: str) -> Any:
        stored = self.table.get(self._key(key))
        return None if stored is None else self.serializer.loads(stored)

    def get_many(self, *keys: str) -> list[Any]:
        names = [self._key(key) for key in keys]
        found = self.table.get_many(names)
        return [None if name not in found else self.serializer.loads(found[name])
                for name in names]

    def has(self, key: str) -> bool:
        return self._key(key) in self.table

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        ttl = self._ttl(timeout)
        data = self.serializer.dumps(value)
        if data is None:  # a cachelib serializer that could not encode it (and warned)
            return False
        if ttl is not None and ttl < 0:  # expired at once: what it replaces goes too
            self.table.pop(self._key(key), None)
            return True
        try:
            self.table.set(self._key(key), data, ttl)
        except _NO_ROOM:
            return False
        return True

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        ttl = self._ttl(timeout)
        data = self.serializer.dumps(value)
        if data is None:
            return False
        if ttl is not None and ttl < 0:  # stored only if absent, and expired at once
            return self._key(key) not in self.table
        try:
            return self.table.add(self._key(key), data, ttl)
        except _NO_ROOM:
            return False

    def set_many(self, mapping: dict[str, Any], timeout: Timeout = None) -> list[Any]:
        """Stores every pair in one step; if they do not fit together, each one that fits
        on its own. Returns the keys stored."""
        ttl = self._ttl(timeout)
        encoded = {key: self.serializer.dumps(value) for key, value in mapping.items()}
        if all(data is not None for data in encoded.values()) and (ttl is None or ttl > 0):
            try:
                self.table.set_many({self._key(k): v for k, v in encoded.items()}, ttl)
                return list(mapping)
            except _NO_ROOM:
                pass
        return [key for key, value in mapping.items() if self.set(key, value, timeout)]

    def delete(self, key: str) -> bool:
        return self.table.pop(self._key(key), None) is not None

    def clear(self) -> bool:
        prefix = self._prefix().encode()
        table = self.table
        if not prefix:
            table.clear()
            return True
        for name in [name for name in table if name.startswith(prefix)]:
            table.pop(name, None)
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Adds delta to the number under key, atomically across processes, and returns the
        new number; an absent key starts at 0 and gets the default timeout, an existing one
        keeps its deadline. TypeError if the value is not a number."""
        name = self._key(key)
        table = self.table
        while True:
            stored = table.get(name)
            if stored is None:
                ttl = self._ttl(None)
                if table.add(name, self.serializer.dumps(delta), ttl):
                    return delta
                continue
            value = (self.serializer.loads(stored) or 0) + delta
            if table.compare_and_swap(name, stored, self.serializer.dumps(value),
                                      keep_ttl=True):
                result: int = value
                return result

    def dec(self, key: str, delta: int = 1) -> int | None:
        """inc(key, -delta)."""
        return self.inc(key, -delta)
