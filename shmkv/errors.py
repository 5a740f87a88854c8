"""shmkv's exceptions, and the one place where a C status code becomes an exception.

Every exception shmkv raises on its own account derives from :class:`Error`. Where one
resembles a builtin it inherits that too (``KeyTooLarge`` is a ``ValueError``, ``LockTimeout``
a ``TimeoutError``), so callers can catch either. A missing key is not an error: it is
``KeyError`` or the default, as with ``dict``.
"""

from __future__ import annotations

import builtins
from typing import NoReturn

from ._core import ffi, lib


class Error(Exception):
    """Base class of every shmkv exception."""

    #: The C status code's name, e.g. ``"SHMKV_EFULL"``; None for errors raised in Python.
    code_name: str | None = None


class TableFull(Error):
    """No room for the write: ``kind`` says which ran out, ``"keys"`` (the table holds
    ``capacity`` keys) or ``"bytes"`` (its memory holds no more bytes)."""

    kind: str = "keys"


class KeyTooLarge(Error, builtins.ValueError):
    """A key is longer than the table's ``key_size``."""


class ValueTooLarge(Error, builtins.ValueError):
    """A value is longer than the table's ``value_size``."""


class IncompatibleTable(Error):
    """The segment is not a shmkv table this build can use: foreign, truncated, made by
    another format version or build, or with an inconsistent header."""


class UntrustedTable(Error, builtins.PermissionError):
    """The segment of that name belongs to another user than expected, or grants more
    access than asked for: refused before anything in it was read."""


class CorruptTable(Error):
    """An operation found the body of the table damaged; nothing was read out of bounds."""


class NotACounter(Error, builtins.ValueError):
    """``incr`` on a value that is not an 8-byte counter."""


class CounterOverflow(Error, builtins.OverflowError):
    """``incr`` would take a counter outside the signed 64-bit range."""


class TableClosed(Error, builtins.ValueError):
    """The table was used after ``close()``."""


class LockTimeout(Error, builtins.TimeoutError):
    """Another process held the table's lock for longer than the lock timeout."""


class LockError(Error):
    """The table's lock cannot be used: this thread holds it already, or its word is damaged."""


class TableBroken(Error):
    """A recovery after a crash could not make the table sound again: the damage is not a
    crash's but corruption's. Every operation but stats() and check() raises this; recreate
    the table."""


class CheckFailed(Error):
    """The full invariant check found a violated invariant; ``invariant`` is its number."""

    invariant: int = 0


# code -> (exception class, hint appended to the C library's message)
_ERRORS: dict[int, tuple[type[Exception], str]] = {
    lib.SHMKV_ENOTFOUND: (builtins.KeyError, ""),
    lib.SHMKV_EKEYSIZE: (KeyTooLarge, ""),
    lib.SHMKV_EVALUESIZE: (ValueTooLarge, ""),
    lib.SHMKV_EFULL: (TableFull, "create the table with a larger capacity"),
    lib.SHMKV_ENOROOM: (TableFull, "create the table with more memory, or on_full='evict'"),
    lib.SHMKV_EINCOMPATIBLE: (IncompatibleTable, ""),
    lib.SHMKV_ECORRUPT: (CorruptTable, "run shmkv-inspect --check; recreate the table"),
    lib.SHMKV_ENOTCOUNTER: (NotACounter, "incr works on 8-byte values it created"),
    lib.SHMKV_EOVERFLOW: (CounterOverflow, ""),
    lib.SHMKV_ECLOSED: (TableClosed, ""),
    lib.SHMKV_ELOCKTIMEOUT: (LockTimeout, "another process holds it; is one stopped?"),
    lib.SHMKV_EBROKEN: (TableBroken, "unlink it and create it again"),
    lib.SHMKV_ELOCK: (LockError, "is the lock already held by this thread?"),
    lib.SHMKV_EARG: (builtins.ValueError, ""),
    lib.SHMKV_ENOTREADY: (IncompatibleTable, "its creator has not finished creating it"),
    lib.SHMKV_EBUFSIZE: (Error, ""),
    lib.SHMKV_ECHECK: (CheckFailed, ""),
    lib.SHMKV_ENOMEM: (builtins.MemoryError, ""),
    lib.SHMKV_ENOLOCK: (UntrustedTable, "another user's table is inspected without its lock; "
                        "run as its owner for what needs the lock"),
}


def code_name(code: int) -> str:
    """The ``SHMKV_E*`` name of a status code."""
    for name in dir(lib):
        if name.startswith("SHMKV_E") and getattr(lib, name) == code:
            return name
    return f"code {code}"


def error_for(code: int, detail: str = "") -> Exception:
    """The exception for a negative C status code, with ``detail`` (what was being done,
    which limit) before the C library's own words and the hint."""
    cls, hint = _ERRORS.get(code, (Error, ""))
    words = ffi.string(lib.shmkv_strerror(code)).decode()
    message = f"{detail}: {words}" if detail else words
    if hint:
        message += f" ({hint})"
    exc = cls(message)
    if isinstance(exc, Error):
        exc.code_name = code_name(code)
    if isinstance(exc, TableFull) and code == lib.SHMKV_ENOROOM:
        exc.kind = "bytes"
    return exc


def raise_for(code: int, detail: str = "") -> NoReturn:
    """Raises :func:`error_for` of ``code``."""
    raise error_for(code, detail)
