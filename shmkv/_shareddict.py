"""SharedDict: a table seen as a ``MutableMapping[str, Any]``, values through a codec.

Values go through ``codec.dumps`` / ``codec.loads``: pickle by default; json, str (UTF-8
text) or bytes (stored as they are) by name; or any object with those two methods. Every
operation is the table's one atomic operation on the encoded bytes; the read-modify-write ones
(incr, compare_and_swap) loop on the table's compare-and-swap, so they are atomic too. Expiry
(ttl, touch, expire) is the table's.

Keys are str, stored as their UTF-8 bytes: one str is one key, and any process in any language
reads it alike. A str with no UTF-8 form (lone surrogates, as ``os.fsdecode`` or the
``surrogateescape`` error handler make of bytes that are not UTF-8) raises
``UnicodeEncodeError`` and changes nothing; ``surrogateescape`` would store ``'\\udcc3\\udcbf'``
and ``'\\xff'`` as the same two bytes. A key that is not UTF-8, written through the bytes
:class:`Table`, is no SharedDict key: iterating the keys or items (``list(d)``, ``dict(d)``)
raises ``UnicodeDecodeError`` naming it, rather than skip it or show it as another key;
``popitem`` passes over it, ``len`` counts it, ``values`` include its value and ``clear``
removes it. Read or remove it through the Table.

Pickle is as trusted as every process that can write the segment: a process that can write
the table can make every reader run code. Choose json where that is not acceptable.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any, Protocol

from ._redis import RedisTable
from ._table import _MISSING, TTL, Table, _keep_flags, _ttl_ns


class Codec(Protocol):
    def dumps(self, obj: Any) -> bytes: ...
    def loads(self, data: bytes) -> Any: ...


class PickleCodec:
    """The default: any picklable value, at the highest protocol."""

    name = "pickle"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> Any:
        return pickle.loads(data)


class JsonCodec:
    """JSON values (dict, list, str, int, float, bool, None): safe to load from anyone."""

    name = "json"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def loads(data: bytes) -> Any:
        return json.loads(data)


class StrCodec:
    """str values, stored as UTF-8: readable by any process in any language. A str that is
    not valid Unicode (lone surrogates) raises UnicodeEncodeError, a ValueError."""

    name = "str"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        if not isinstance(obj, str):
            raise TypeError(f"the str codec stores str values, not {type(obj).__name__}")
        return obj.encode("utf-8")

    @staticmethod
    def loads(data: bytes) -> Any:
        return data.decode("utf-8")


class BytesCodec:
    """bytes-like values, stored as they are (read back as bytes)."""

    name = "bytes"

    @staticmethod
    def dumps(obj: Any) -> bytes:
        if isinstance(obj, bytes):
            return obj
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(f"the bytes codec stores bytes-like values, not {type(obj).__name__}")

    @staticmethod
    def loads(data: bytes) -> Any:
        return data


CODECS: dict[str, Codec] = {
    "pickle": PickleCodec(),
    "json": JsonCodec(),
    "str": StrCodec(),
    "bytes": BytesCodec(),
}


def _codec(codec: str | Codec) -> Codec:
    if isinstance(codec, str):
        try:
            return CODECS[codec]
        except KeyError:
            raise ValueError(f"unknown codec {codec!r}: one of {sorted(CODECS)}, "
                             "or an object with dumps() and loads()") from None
    if not (callable(getattr(codec, "dumps", None)) and callable(getattr(codec, "loads", None))):
        raise TypeError("codec must be a name or an object with dumps() and loads()")
    return codec


class SharedDict(MutableMapping[str, Any]):
    """A dict of str keys and encoded values over a :class:`Table` (or a RedisTable).

    Raises: every method that takes a key raises TypeError if it is not a str and
    UnicodeEncodeError (a ValueError) if it has no UTF-8 form, before the table is touched;
    iterating the keys or items raises UnicodeDecodeError if the table holds a key that is
    not UTF-8 (see the module's docstring). Beyond that, each method raises what the codec
    raises (pickle.PicklingError, TypeError for json) and what the table's method of the same
    name raises: KeyError for a missing key, KeyTooLarge/ValueTooLarge (ValueErrors) past the
    table's limits, TableFull, LockTimeout, TableClosed, TableBroken."""

    def __init__(self, table: Table | RedisTable, codec: str | Codec = "pickle") -> None:
        if not isinstance(table, (Table, RedisTable)):
            raise TypeError(f"SharedDict needs a shmkv.Table, not {type(table).__name__}")
        self.table = table
        self.codec = _codec(codec)
        self._dumps = self.codec.dumps
        self._loads = self.codec.loads

    def _key(self, key: object) -> bytes:
        """key as the table holds it: its UTF-8 bytes. TypeError if it is not a str;
        UnicodeEncodeError (a ValueError) if it has no UTF-8 form."""
        if not isinstance(key, str):
            raise TypeError(f"table {self.table.name!r}: SharedDict keys are str, "
                            f"not {type(key).__name__}")
        try:
            return key.encode()
        except UnicodeEncodeError as e:
            raise UnicodeEncodeError(
                "utf-8", key, e.start, e.end,
                f"a lone surrogate is no text, and table {self.table.name!r} keeps SharedDict "
                "keys as UTF-8 (decode bytes strictly, or use the Table's bytes keys)") from None

    def _text(self, key: bytes) -> str:
        """A key the table holds as str; UnicodeDecodeError, naming it, if it is not UTF-8."""
        try:
            return key.decode()
        except UnicodeDecodeError as e:
            raise UnicodeDecodeError(
                "utf-8", key, e.start, e.end,
                f"table {self.table.name!r} holds {key!r}, a key written through the Table "
                "and no SharedDict key; read or remove it there") from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (SharedDict, (self.table, self.codec))

    def __repr__(self) -> str:
        return f"<shmkv.SharedDict over {self.table!r}>"

    def __getitem__(self, key: str) -> Any:
        try:
            data = self.table[self._key(key)]
        except KeyError:
            raise KeyError(key) from None
        return self._loads(data)

    def get(self, key: str, default: Any = None) -> Any:
        """The decoded value of key, or default if it is absent."""
        data = self.table.get(self._key(key))
        return default if data is None else self._loads(data)

    def __setitem__(self, key: str, value: Any) -> None:
        self.table.set(self._key(key), self._dumps(value))

    def set(self, key: str, value: Any, ttl: TTL = None, *, keep_ttl: bool = False) -> bool:
        """Stores value, expiring after ttl seconds (see Table.set); True if a live key was
        evicted to make room."""
        return self.table.set(self._key(key), self._dumps(value), ttl, keep_ttl=keep_ttl)

    def add(self, key: str, value: Any, ttl: TTL = None) -> bool:
        """Stores value only if key is absent; True if it was stored."""
        return self.table.add(self._key(key), self._dumps(value), ttl)

    def ttl(self, key: str) -> float | None:
        """Seconds until key expires, None if never; KeyError if absent."""
        try:
            return self.table.ttl(self._key(key))
        except KeyError:
            raise KeyError(key) from None

    def touch(self, key: str, ttl: TTL) -> bool:
        """Sliding expiry: key now expires ttl seconds from now, and counts as used."""
        return self.table.touch(self._key(key), ttl)

    def expire(self, key: str, ttl: TTL) -> bool:
        """key now expires ttl seconds from now (None: never); False if absent."""
        return self.table.expire(self._key(key), ttl)

    def purge_expired(self) -> int:
        """Removes every expired key now (see Table.purge_expired); how many."""
        return self.table.purge_expired()

    def __delitem__(self, key: str) -> None:
        try:
            del self.table[self._key(key)]
        except KeyError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            bkey = key.encode()
        except UnicodeEncodeError:
            return False  # no such key can be stored
        return bkey in self.table

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[str]:
        """One snapshot of the keys, all decoded before the first is returned:
        UnicodeDecodeError, and no key, if the table holds one that is not UTF-8."""
        text = self._text
        return iter([text(key) for key in self.table])

    def items(self) -> ItemsView[str, Any]:
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        """Removes key and returns its decoded value; default, or KeyError, if absent."""
        data = self.table.pop(self._key(key), None)
        if data is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._loads(data)

    def popitem(self) -> tuple[str, Any]:
        """Removes and returns some (key, value), passing over keys that are not UTF-8;
        KeyError if the table is empty, UnicodeDecodeError if it holds only such keys."""
        while True:
            keys = list(self.table)
            if not keys:
                raise KeyError(f"popitem(): table {self.table.name!r} is empty")
            texts = [key for key in keys if _is_utf8(key)]
            if not texts:
                self._text(keys[0])  # not UTF-8: raises, naming it
            for bkey in texts:
                data = self.table.pop(bkey, None)
                if data is not None:  # None: another process took it first
                    return bkey.decode(), self._loads(data)

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of key; if absent, stores default first (atomically) and returns it."""
        bkey = self._key(key)
        data = self.table.get(bkey)
        if data is None:  # encode the default only when it may be stored
            data = self.table.setdefault(bkey, self._dumps(default))
        return self._loads(data)

    def clear(self) -> None:
        """Removes every key of the table, those written through the Table included."""
        self.table.clear()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like dict.update, stored in one step with set_many()."""
        pairs = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        self.set_many(pairs)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The decoded values of those keys that are present, read in one table operation."""
        named = {self._key(key): key for key in keys}
        found = self.table.get_many(list(named))
        return {named[bkey]: self._loads(data) for bkey, data in found.items()}

    def set_many(
        self, mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], ttl: TTL = None
    ) -> None:
        """Stores every pair, each expiring after ttl seconds, in one table operation."""
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        self.table.set_many({self._key(key): self._dumps(value) for key, value in pairs}, ttl)

    def compare_and_swap(
        self, key: str, expected: Any, new: Any, ttl: TTL = None, *, keep_ttl: bool = False
    ) -> bool:
        """Stores new if the value of key equals (==) expected; True if it did. Compares
        decoded values, since equal values need not encode to equal bytes. ttl and keep_ttl
        as in Table.set."""
        bkey = self._key(key)
        encoded = self._dumps(new)
        if keep_ttl:
            _keep_flags(ttl)
        else:
            _ttl_ns(ttl)  # bad arguments fail whatever the table holds
        while True:
            data = self.table.get(bkey)
            if data is None or self._loads(data) != expected:
                return False
            if self.table.compare_and_swap(bkey, data, encoded, ttl, keep_ttl=keep_ttl):
                return True

    def incr(self, key: str, delta: int = 1, initial: int = 0, ttl: TTL = None) -> int:
        """Adds delta to the int stored under key (absent: initial, expiring after ttl
        seconds; an existing value keeps its deadline) and returns the result, atomically
        across processes."""
        bkey = self._key(key)
        _ttl_ns(ttl)  # a bad ttl fails whether or not the counter exists
        while True:
            data = self.table.get(bkey)
            current = initial if data is None else self._loads(data)
            if isinstance(current, bool) or not isinstance(current, int):
                raise TypeError(f"table {self.table.name!r}: the value of {key!r} is a "
                                f"{type(current).__name__}, not an int")
            result = current + delta
            encoded = self._dumps(result)
            if data is None:
                done = self.table.add(bkey, encoded, ttl)
            else:
                done = self.table.compare_and_swap(bkey, data, encoded, keep_ttl=True)
            if done:
                return result

    def stats(self) -> dict[str, Any]:
        """The table's stats() (see Table.stats)."""
        return self.table.stats()

    def close(self) -> None:
        """Closes the table (see Table.close)."""
        self.table.close()

    def __enter__(self) -> SharedDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_utf8(key: bytes) -> bool:
    try:
        key.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Items(ItemsView[str, Any]):
    _mapping: SharedDict

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        # One snapshot; every key decoded (or the UnicodeDecodeError raised) before the first
        # value is, since a value may take much longer to load than a key to decode.
        text, loads = self._mapping._text, self._mapping._loads
        pairs = [(text(k), v) for k, v in self._mapping.table.items()]
        return ((k, loads(v)) for k, v in pairs)


class _Values(ValuesView[Any]):
    _mapping: SharedDict

    def __iter__(self) -> Iterator[Any]:
        loads = self._mapping._loads
        return (loads(v) for v in self._mapping.table.values())
