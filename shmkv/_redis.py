"""RedisTable: the Table interface on a Redis server, for the day one machine is not enough.

Code written against a :class:`~shmkv.Table` runs unchanged on a RedisTable: the same methods,
the same return values and exceptions, each operation atomic on the server (a single command,
or a Lua script where Redis has no one command for it). A table is a name under which its keys
live in a Redis database: key ``k`` of table ``sessions`` is the Redis key ``sessions:k``, so
that tables share a database without meeting, and ``len``, iteration and ``clear`` see their
own keys only.

Where the two differ, it is because one server serves many machines (see the README):
counters are stored as decimal text (Redis's INCRBY) rather than 8 binary bytes; ``len``,
iteration and ``clear`` walk the database with SCAN, so they are neither O(1) nor one step;
the server's maxmemory and maxmemory-policy decide what a full server does; every call is a
network round trip, some hundred times a shared-memory get.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, overload

from ._table import (
    _MISSING,
    TTL,
    BytesLike,
    _as_bytes,
    _check_counter_args,
    _keep_flags,
    _TableBase,
    _ttl_ns,
)
from .errors import CounterOverflow, Error, KeyTooLarge, NotACounter, TableClosed, ValueTooLarge

try:
    redis: Any = importlib.import_module("redis")
except ImportError:  # the redis extra is not installed: client_from_url() says so
    redis = None

_SCAN_COUNT = 1000  # keys per SCAN round trip, and per MGET/UNLINK batch

# incr: creates the counter at initial (with its deadline), then INCRBY does the arithmetic in
# 64-bit integers with Redis's own overflow check. Lua numbers are doubles, so the result is
# read back as text, and an INCRBY that fails undoes the counter this call created: on error
# nothing changes, as in a Table.
_INCR = """
local created = redis.call('EXISTS', KEYS[1]) == 0
if created then redis.call('SET', KEYS[1], ARGV[2]) end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(r) == 'table' and r.err then
  if created then redis.call('DEL', KEYS[1]) end
  return r
end
if created and ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return redis.call('GET', KEYS[1])
"""

# compare_and_swap with an expected value; ARGV[3]: 'keep' (keep_ttl), '0' (no ttl) or ms.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'keep' then redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
elseif ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

_SETDEFAULT = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# expire/touch with a deadline ('0': none, like PERSIST); 1 if the key is present. PERSIST
# alone says 0 both for an absent key and for one without a deadline.
_EXPIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '0' then redis.call('PERSIST', KEYS[1])
else redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""


def _ms(ttl_ns: int) -> int:
    """A deadline in Redis's milliseconds, rounded up so that a short ttl is never none."""
    return math.ceil(ttl_ns / 1_000_000)


def client_from_url(url: str, **options: Any) -> Any:
    """A redis-py client, or ImportError with the way to install it."""
    if redis is None:
        raise ImportError("a Redis table needs redis-py: pip install 'shmkv[redis]'")
    return redis.Redis.from_url(url, **options)


def _error(cls: type[Error], code_name: str, message: str) -> Error:
    exc = cls(message)
    exc.code_name = code_name
    return exc


class RedisTable(_TableBase):
    """A table of bytes keys and values kept by a Redis server, with the methods of
    :class:`~shmkv.Table`. Make one with :func:`shmkv.connect` (``redis://HOST:PORT/DB?name=
    NAME``), or from a ``redis.Redis`` client. ``key_size`` and ``value_size``, if given, are
    limits checked as a Table checks its own (KeyTooLarge, ValueTooLarge)."""

    #: Redis has no capacity of its own: its maxmemory and maxmemory-policy decide.
    capacity: int | None = None
    on_full: str | None = None
    created = False

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        key_size: int | None = None,
        value_size: int | None = None,
        reopen: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        # No ":" in a name, so that tables "a" and "a:b" do not share the keys "a:b:*"; no
        # glob characters, so that the name is its own SCAN pattern.
        if not isinstance(name, str) or not name or any(c in name for c in ":*?[]\\\0"):
            raise ValueError(f"invalid table name {name!r}: a non-empty str without :*?[]\\ "
                             "(table NAME keeps its keys under NAME:)")
        self._client: Any = client
        self._name = name
        self._prefix = name.encode() + b":"
        self._match = self._prefix + b"*"
        self._reopen = reopen  # connect()'s arguments, which a pickle carries
        self.key_size = key_size
        self.value_size = value_size
        self._incr = client.register_script(_INCR)
        self._cas = client.register_script(_CAS)
        self._setdefault = client.register_script(_SETDEFAULT)
        self._expire_script = client.register_script(_EXPIRE)

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._client is None

    def _live(self) -> Any:
        client = self._client
        if client is None:
            raise TableClosed(f"table {self._name!r} is closed")
        return client

    def close(self) -> None:
        """Closes this handle's connections. Idempotent; the keys stay on the server."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def unlink(self) -> None:
        """Removes every key of the table from the server. This handle stays usable."""
        self.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._reopen is None:
            raise TypeError("a RedisTable made from a client cannot be pickled; "
                            "make it with shmkv.connect(url)")
        from ._connect import reconnect
        return (reconnect, self._reopen)

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<shmkv.RedisTable {self._name!r}{state}>"

    def _run(self, script: Any, keys: list[bytes], args: list[Any]) -> Any:
        # A script object would reconnect a closed client: it gets the live one each time.
        return script(keys=keys, args=args, client=self._live())

    # ------------------------------------------------------------------ keys and values

    def _key(self, key: Any) -> bytes:
        data = _as_bytes(key, "key")
        if self.key_size is not None and len(data) > self.key_size:
            raise _error(KeyTooLarge, "SHMKV_EKEYSIZE", f"key of {len(data)} bytes exceeds "
                         f"this table's key_size={self.key_size}")
        return self._prefix + data

    def _value(self, value: Any) -> bytes:
        data = _as_bytes(value, "value")
        if self.value_size is not None and len(data) > self.value_size:
            raise _error(ValueTooLarge, "SHMKV_EVALUESIZE", f"value of {len(data)} bytes "
                         f"exceeds this table's value_size={self.value_size}")
        return data

    def _bare(self, rkey: bytes) -> bytes:
        return rkey[len(self._prefix):]

    # ------------------------------------------------------------------ single-key operations

    def get(self, key: BytesLike, default: Any = None) -> Any:
        """The value of key, or default if absent."""
        value = self._live().get(self._key(key))
        return default if value is None else value

    def __getitem__(self, key: BytesLike) -> bytes:
        value: bytes | None = self._live().get(self._key(key))
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return bool(self._live().exists(self._key(key)))

    def __setitem__(self, key: BytesLike, value: BytesLike) -> None:
        self.set(key, value)

    def set(
        self, key: BytesLike, value: BytesLike, ttl: TTL = None, *, keep_ttl: bool = False
    ) -> bool:
        """Stores key = value, as Table.set. Always False: what Redis evicts, it evicts on its
        own, and no command says whether a write made it."""
        rkey, value = self._key(key), self._value(value)
        if keep_ttl:
            _keep_flags(ttl)
            self._live().set(rkey, value, keepttl=True)
        elif ttl is None:
            self._live().set(rkey, value)
        else:
            self._live().set(rkey, value, px=_ms(_ttl_ns(ttl)))
        return False

    def add(self, key: BytesLike, value: BytesLike, ttl: TTL = None) -> bool:
        """Stores key = value (expiring after ttl seconds) only if key is absent; True if it
        was stored (SET NX)."""
        ttl_ns = _ttl_ns(ttl)
        rkey, value = self._key(key), self._value(value)
        return bool(self._live().set(rkey, value, nx=True, px=_ms(ttl_ns) if ttl_ns else None))

    def __delitem__(self, key: BytesLike) -> None:
        if not self._live().delete(self._key(key)):
            raise KeyError(key)

    @overload
    def pop(self, key: BytesLike) -> bytes: ...
    @overload
    def pop(self, key: BytesLike, default: Any) -> Any: ...

    def pop(self, key: BytesLike, default: Any = _MISSING) -> Any:
        """Removes key and returns its value (GETDEL); default or KeyError if absent."""
        value = self._live().getdel(self._key(key))
        if value is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def setdefault(self, key: BytesLike, default: BytesLike = b"") -> bytes:
        """Returns the value of key, first storing default if key is absent (atomically)."""
        value: bytes = self._run(self._setdefault, [self._key(key)], [self._value(default)])
        return value

    def incr(self, key: BytesLike, delta: int = 1, initial: int = 0, ttl: TTL = None) -> int:
        """As Table.incr, with the counter stored as decimal text (Redis's own counters, which
        INCRBY and other clients understand). NotACounter if the value is not a 64-bit
        integer in decimal; CounterOverflow past the range; nothing changes then."""
        _check_counter_args(delta, initial)
        ttl_ns = _ttl_ns(ttl)
        rkey = self._key(key)
        try:
            result = self._run(self._incr, [rkey], [delta, initial, _ms(ttl_ns)])
        except redis.ResponseError as exc:
            # Redis's words for the two errors a Table has; any other (out of memory, a
            # read-only replica, a key of another type) is the server's and goes up as it is.
            if "would overflow" in str(exc):
                raise _error(CounterOverflow, "SHMKV_EOVERFLOW",
                             f"table {self._name!r}: {key!r} + {delta} overflows 64 bits"
                             ) from None
            if "not an integer" in str(exc):
                raise _error(NotACounter, "SHMKV_ENOTCOUNTER", f"table {self._name!r}: the "
                             f"value of {key!r} is not a decimal 64-bit integer") from None
            raise
        return int(result)

    def compare_and_swap(
        self,
        key: BytesLike,
        expected: BytesLike | None,
        new: BytesLike,
        ttl: TTL = None,
        *,
        keep_ttl: bool = False,
    ) -> bool:
        """Stores new under key if its value is currently expected (None: if key is absent);
        True if it did. One step on the server. ttl and keep_ttl as in set()."""
        if keep_ttl:
            _keep_flags(ttl)
            deadline: Any = "keep"
        else:
            deadline = _ms(_ttl_ns(ttl))
        if expected is None:
            return self.add(key, new, ttl)
        rkey, new = self._key(key), self._value(new)
        expected = _as_bytes(expected, "expected")
        return bool(self._run(self._cas, [rkey], [expected, new, deadline]))

    # ------------------------------------------------------------------ expiry

    def ttl(self, key: BytesLike) -> float | None:
        """Seconds until key expires, or None if it never does; KeyError if absent."""
        left = self._live().pttl(self._key(key))
        if left == -2:
            raise KeyError(key)
        return None if left < 0 else left / 1000

    def expire(self, key: BytesLike, ttl: TTL) -> bool:
        """Makes key expire ttl seconds from now (None: never); True if key is present."""
        ttl_ns = _ttl_ns(ttl)
        return bool(self._run(self._expire_script, [self._key(key)], [_ms(ttl_ns)]))

    def touch(self, key: BytesLike, ttl: TTL) -> bool:
        """Sliding expiry, as expire(): Redis counts every command as a use of the key."""
        return self.expire(key, ttl)

    def purge_expired(self) -> int:
        """0: Redis reclaims expired keys on its own."""
        self._live()  # TableClosed once closed, as a Table
        return 0

    # ------------------------------------------------------------------ whole-table operations

    def _rkeys(self) -> list[bytes]:
        # SCAN may return a key twice; dict.fromkeys keeps the first of each, in order.
        return list(dict.fromkeys(self._live().scan_iter(match=self._match, count=_SCAN_COUNT)))

    def __len__(self) -> int:
        return len(self._rkeys())

    def _snapshot(self, with_values: bool) -> list[Any]:
        # Every key present from the start to the end of the walk, once; not one instant.
        rkeys = self._rkeys()
        if not with_values:
            return [self._bare(k) for k in rkeys]
        pairs = []
        for i in range(0, len(rkeys), _SCAN_COUNT):
            batch = rkeys[i:i + _SCAN_COUNT]
            for rkey, value in zip(batch, self._live().mget(batch)):
                if value is not None:  # deleted since the walk saw it
                    pairs.append((self._bare(rkey), value))
        return pairs

    def clear(self) -> None:
        """Removes every key of the table. Not one step: a key another process stores while
        it runs may stay."""
        rkeys = self._rkeys()
        for i in range(0, len(rkeys), _SCAN_COUNT):
            self._live().unlink(*rkeys[i:i + _SCAN_COUNT])

    def get_many(self, keys: Iterable[BytesLike]) -> dict[bytes, bytes]:
        """The values of the keys that are present, read in one step (MGET)."""
        blist = [_as_bytes(key, "key") for key in keys]
        if not blist:
            self._live()  # TableClosed once closed
            return {}
        values = self._live().mget([self._key(key) for key in blist])
        return {key: value for key, value in zip(blist, values) if value is not None}

    def set_many(
        self, mapping: Mapping[BytesLike, BytesLike] | Iterable[Any], ttl: TTL = None
    ) -> None:
        """Stores every pair, each expiring after ttl seconds (None: never), all or nothing
        (MSET, or SETs in one MULTI transaction)."""
        ttl_ns = _ttl_ns(ttl)
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        batch = {self._key(key): self._value(value) for key, value in pairs}
        if not batch:
            self._live()  # TableClosed once closed
            return
        if not ttl_ns:
            self._live().mset(batch)
            return
        with self._live().pipeline(transaction=True) as pipe:
            for rkey, value in batch.items():
                pipe.set(rkey, value, px=_ms(ttl_ns))
            pipe.execute()

    # ------------------------------------------------------------------ introspection

    def stats(self, *, wait: bool = True) -> dict[str, Any]:
        """The table's name and len, and the server's own counters. hits, misses,
        evictions and expirations count the whole server, not this table alone."""
        info = self._live().info()
        return {
            "name": self._name,
            "backend": "redis",
            "server": info.get("redis_version"),
            "len": len(self),
            "key_size": self.key_size,
            "value_size": self.value_size,
            "hits": info.get("keyspace_hits", 0),
            "misses": info.get("keyspace_misses", 0),
            "evictions": info.get("evicted_keys", 0),
            "expirations": info.get("expired_keys", 0),
            "used_memory": info.get("used_memory"),
            "maxmemory_policy": info.get("maxmemory_policy"),
        }
