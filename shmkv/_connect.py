"""connect(url): one string that names a table in shared memory or on a Redis server, so that
moving from one machine to many is a change of configuration, not of code."""

from __future__ import annotations

from typing import Any, Union
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ._open import attach, create
from ._redis import RedisTable, client_from_url
from ._segment import check_name
from ._table import Table

AnyTable = Union[Table, RedisTable]

_CREATE = ("capacity", "key_size", "value_size", "memory", "on_full")
_OWNER = ("user", "group", "mode")
_SHM_OPTIONS = (*_CREATE, "lock_timeout", *_OWNER)
_NUMBERS = {"capacity": int, "key_size": int, "value_size": int, "lock_timeout": float}
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def connect(url: str, **options: Any) -> AnyTable:
    """The table a URL names; options (as keywords) add to or override the URL's query.

    - ``shm://NAME``: attaches to the shared-memory table NAME. With ``capacity`` (and
      optionally ``key_size``, ``value_size``, ``on_full``) it creates the table if it does
      not exist yet, race-free among processes that all do this (``create(...,
      exist_ok=True)``): ``shm://sessions?capacity=100000&value_size=65536&memory=48MiB&on_full=evict``.
      ``lock_timeout`` is passed on, and so are ``user``, ``group`` and ``mode`` (octal),
      whom the table must belong to (see create() and attach()).
    - ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]?name=NAME``, ``rediss://...`` (TLS) or
      ``unix:///PATH/redis.sock?db=DB&name=NAME``: a :class:`RedisTable` whose keys are
      NAME:key in that database, through redis-py (``pip install 'shmkv[redis]'``).
      ``key_size`` and ``value_size`` become limits that it checks, as a Table does; any
      other option goes to ``redis.Redis.from_url`` (``socket_timeout=2``, ...).

    Raises ValueError for a URL it cannot use, and what attach(), create() or redis-py raise.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in url):
        # urlsplit() drops tabs and newlines silently: "shm://a\tb" would name table "ab".
        raise ValueError(f"{url!r}: a URL has no control characters (percent-encode them)")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(options)
    if parts.scheme == "shm":
        return _connect_shm(url, parts.netloc + parts.path, query)
    if parts.scheme in _REDIS_SCHEMES:
        return _connect_redis(url, query, options)
    raise ValueError(f"cannot connect to {url!r}: the URL must start with shm://, redis://, "
                     "rediss:// or unix://")


def _numbers(url: str, query: dict[str, Any]) -> dict[str, Any]:
    try:
        return {key: _NUMBERS[key](value) if key in _NUMBERS and isinstance(value, str)
                else value for key, value in query.items()}
    except ValueError:
        raise ValueError(f"{url!r}: {', '.join(_NUMBERS)} must be numbers") from None


def _connect_shm(url: str, name: str, query: dict[str, Any]) -> Table:
    unknown = sorted(set(query) - set(_SHM_OPTIONS))
    if unknown:
        raise ValueError(f"{url!r}: unknown option {unknown[0]!r} for a shm:// table "
                         f"(known: {', '.join(_SHM_OPTIONS)})")
    name = unquote(name)
    if not name:
        raise ValueError(f"{url!r} names no table: shm://NAME")
    check_name(name)
    query = _numbers(url, query)
    if "capacity" in query:
        return create(name, exist_ok=True, **query)
    creating = [key for key in _CREATE if key in query]
    if creating:
        raise ValueError(f"{url!r}: {creating[0]} is for creating the table, which needs "
                         "capacity too")
    return attach(name, **query)


def _connect_redis(
    url: str, query: dict[str, Any], options: dict[str, Any]
) -> RedisTable:
    name = query.pop("name", None)
    if not name:
        raise ValueError(f"{url!r} names no table: add ?name=NAME (its keys are NAME:key)")
    limits = _numbers(url, {key: query.pop(key) for key in ("key_size", "value_size")
                            if key in query})
    # The URL without our options goes to redis-py, which reads its own (db, timeouts, ...).
    rest = [(key, value) for key, value in query.items() if isinstance(value, str)]
    redis_url = url.split("?", 1)[0] + ("?" + urlencode(rest) if rest else "")
    keywords = {key: value for key, value in query.items() if not isinstance(value, str)}
    client = client_from_url(redis_url, **keywords)
    return RedisTable(client, name, reopen=(url, options), **limits)


def reconnect(url: str, options: dict[str, Any]) -> AnyTable:
    """connect(url, **options), for unpickling."""
    return connect(url, **options)
