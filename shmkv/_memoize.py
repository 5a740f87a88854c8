"""memoize(table): functools.lru_cache for every process of the machine, with one computation
per key however many processes miss it at once.

A call's key is a digest of the function's module and qualified name and of its arguments in
a canonical form (never ``hash()``, which differs between processes). A hit decodes the stored
result. A miss takes the key's lock entry with ``add(lock_key, ..., ttl=lock_ttl)``: the
process that adds it computes, stores the result and removes the lock; every other process
that misses meanwhile waits, polling the table with a short backoff, and gets that result. A
lock entry expires by itself, so a computer that dies holding it blocks the others for at
most ``lock_ttl`` seconds; then one of them takes the lock and computes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ._redis import RedisTable
from ._shareddict import Codec, _codec
from ._table import TTL, Table
from .errors import TableFull, ValueTooLarge

F = TypeVar("F", bound=Callable[..., Any])

#: The waiting processes poll the table: first after FIRST_POLL seconds, then each wait
#: POLL_GROWTH times longer, never longer than MAX_POLL (nor a tenth of lock_ttl). A poll is
#: one lock-free get and one add, so even many waiters cost the table little.
FIRST_POLL = 0.001
POLL_GROWTH = 1.5
MAX_POLL = 0.05
#: Characters of the function's name kept in its keys, for shmkv-inspect --keys to show.
_NAME_CHARS = 24


def _canonical(obj: Any) -> Any:
    """A form of obj whose pickle is the same in every process for equal arguments: sets
    and dicts sorted (their order follows str hashes, which differ between processes), each
    value tagged with its type (1, 1.0 and True are different arguments, as with
    lru_cache(typed=True)). Other objects stay as they are: their pickle must be stable."""
    kind = type(obj)
    if obj is None or kind in (bool, int, float, complex, str, bytes):
        return (kind.__name__, obj)
    if kind in (tuple, list):
        return (kind.__name__, tuple(_canonical(item) for item in obj))
    if kind in (set, frozenset):
        return (kind.__name__, tuple(sorted(_stable(item) for item in obj)))
    if kind is dict:
        return ("dict", tuple(sorted((_stable(k), _stable(v)) for k, v in obj.items())))
    return (f"{kind.__module__}.{kind.__qualname__}", obj)


def _stable(obj: Any) -> bytes:
    return pickle.dumps(_canonical(obj), protocol=4)


def call_key(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The part of a call's keys that names it: a short name and a digest of the function's
    module and qualified name and of the arguments (keyword arguments sorted by name).
    Raises what pickle raises for an argument it cannot pickle."""
    name = f"{func.__module__}.{func.__qualname__}"
    digest = hashlib.blake2b(
        pickle.dumps((name, _canonical(args), sorted((k, _canonical(v))
                                                     for k, v in kwargs.items())),
                     protocol=4),
        digest_size=16).hexdigest()
    return f"{func.__name__[:_NAME_CHARS]}:{digest}"


def memoize(
    table: Table | RedisTable,
    ttl: TTL = None,
    lock_ttl: float = 60,
    *,
    codec: str | Codec = "pickle",
    prefix: str = "memo",
) -> Callable[[F], F]:
    """Caches a function's results in ``table``, shared by every process that uses it::

        @shmkv.memoize(table, ttl=300)
        def report(customer_id: int) -> dict: ...

    ``ttl``: seconds a result stays (None: until evicted or removed). ``lock_ttl``: seconds a
    computation may hold its key's lock; a process that misses while another computes the
    same call waits for that result, and computes it itself only if the lock expires first
    (the computer died, or took longer than lock_ttl) or the computer raised (exceptions are
    not cached: one waiter tries again). So a computer that dies blocks the others for at most
    lock_ttl. ``codec``: how results are stored, as for SharedDict (pickle by default: as
    trusted as every process that can write the table). Keys are ``PREFIX:NAME:DIGEST`` and
    the lock ``PREFIX!NAME:DIGEST``, at most 62 bytes with the default prefix.

    Arguments must be picklable, and equal arguments must pickle alike in every process:
    None, bool, numbers, str, bytes, and tuples, lists, dicts, sets of them do; so do most
    objects whose state is made of them. As with lru_cache, f(1, b=2) and f(1, 2) are two
    keys. A result that does not fit the table (ValueTooLarge, TableFull) is returned
    uncached. The wrapper raises what the function, the codec and the table raise.
    """
    encode = _codec(codec)
    if not (isinstance(lock_ttl, (int, float)) and lock_ttl > 0):
        raise ValueError(f"lock_ttl must be a positive number of seconds, not {lock_ttl!r}")
    max_poll = min(MAX_POLL, lock_ttl / 10)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = call_key(func, args, kwargs)
            key = f"{prefix}:{name}".encode()
            lock = f"{prefix}!{name}".encode()
            token = os.urandom(16)
            poll = FIRST_POLL
            while True:
                stored = table.get(key)
                if stored is not None:
                    return encode.loads(stored)
                if table.add(lock, token, ttl=lock_ttl):
                    break
                time.sleep(poll)  # another process computes: wait for it, briefly
                poll = min(poll * POLL_GROWTH, max_poll)
            try:
                stored = table.get(key)  # stored between our miss and our lock?
                if stored is not None:
                    return encode.loads(stored)
                result = func(*args, **kwargs)
                try:
                    table.set(key, encode.dumps(result), ttl)
                except (ValueTooLarge, TableFull):
                    pass
                return result
            finally:
                # Remove the lock if it is still ours: past lock_ttl another process may
                # hold it. A compare-and-swap to an empty value that expires in a
                # nanosecond (a millisecond on Redis) removes it in one atomic step, and
                # only if it still holds our token.
                table.compare_and_swap(lock, token, b"", ttl=1e-9)

        wrapper.cache_key = lambda *a, **kw: (  # type: ignore[attr-defined]
            f"{prefix}:{call_key(func, a, kw)}".encode())
        return cast(F, wrapper)

    return decorate
