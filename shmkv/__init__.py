"""shmkv: a key-value table in OS shared memory, shared by the processes of one machine.

The master creates a table, workers attach to it by name, and every get or set is a direct
memory operation under a process-shared robust lock, done by a small C core. No server, no
messages::

    import shmkv
    t = shmkv.create("sessions", capacity=100_000, value_size=65536, memory="48MiB")  # master
    t = shmkv.attach("sessions")                                                  # worker
    t[b"user:1"] = b"alice"; t.incr(b"hits"); t.get(b"user:1")

``shmkv.connect("shm://sessions")`` names a table by URL; ``redis://HOST/0?name=sessions``
gives the same interface on a Redis server, for the day one machine is not enough.
``@shmkv.memoize(table)`` is functools.lru_cache shared by every process of the machine.
"""

from ._connect import connect
from ._core import lib as _lib
from ._memoize import memoize
from ._open import attach, create, parse_size
from ._redis import RedisTable
from ._segment import unlink
from ._shareddict import SharedDict
from ._table import Table
from ._version import __version__
from .errors import (
    CheckFailed,
    CorruptTable,
    CounterOverflow,
    Error,
    IncompatibleTable,
    KeyTooLarge,
    LockError,
    LockTimeout,
    NotACounter,
    TableBroken,
    TableClosed,
    TableFull,
    UntrustedTable,
    ValueTooLarge,
)

_EXPECTED_ABI = 4
if _lib.shmkv_abi() != _EXPECTED_ABI:  # pragma: no cover - a stale build
    raise ImportError(
        f"shmkv's compiled core speaks ABI {_lib.shmkv_abi()}, this Python code ABI "
        f"{_EXPECTED_ABI}: reinstall shmkv"
    )

__all__ = [
    "CheckFailed",
    "CorruptTable",
    "CounterOverflow",
    "Error",
    "IncompatibleTable",
    "KeyTooLarge",
    "LockError",
    "LockTimeout",
    "NotACounter",
    "RedisTable",
    "SharedDict",
    "Table",
    "TableBroken",
    "TableClosed",
    "TableFull",
    "UntrustedTable",
    "ValueTooLarge",
    "__version__",
    "attach",
    "connect",
    "create",
    "memoize",
    "parse_size",
    "unlink",
]
