"""The shared-memory segment behind a table: naming, creating, attaching and unlinking it.

The segment is a :class:`multiprocessing.shared_memory.SharedMemory`. The resource tracker of
Python < 3.13 registers every attach and removes (or warns about) the segment when the
attaching process exits; so attachers here never register (3.13+: ``track=False``; before:
the registration is skipped), and only a creator that owns the table is tracked.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import posix_ipc

MAX_NAME_LENGTH = 200
_HAS_TRACK_PARAMETER = sys.version_info >= (3, 13)
_untracked = threading.Lock()


def check_name(name: Any) -> str:
    """The table name as given, after checking it can name a POSIX shared-memory object."""
    if not isinstance(name, str):
        raise TypeError(f"table name must be a str, not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or "\0" in bare or len(bare) > MAX_NAME_LENGTH:
        raise ValueError(
            f"invalid table name {name!r}: 1 to {MAX_NAME_LENGTH} characters, no '/' or NUL"
        )
    return bare


def open_segment(
    name: str, *, create: bool, size: int = 0, track: bool
) -> shared_memory.SharedMemory:
    """Opens (or creates, exclusively) the segment; registers it with the resource tracker
    only if ``track``. Raises FileNotFoundError / FileExistsError as the OS says."""
    if _HAS_TRACK_PARAMETER:
        factory: Any = shared_memory.SharedMemory  # `track` is 3.13+: typed for older ones
        return factory(name, create=create, size=size, track=track)  # type: ignore[no-any-return]
    if track:
        return shared_memory.SharedMemory(name, create=create, size=size)
    # Before 3.13 SharedMemory registers every segment it opens. Skip that one registration
    # (3.9 imports register() at call time, 3.10-3.12 look it up on the module: patching the
    # module's function serves both); other names pass through untouched.
    segment_path = "/" + name
    with _untracked:
        register = resource_tracker.register

        def register_others(path: Any, rtype: str) -> None:
            if path != segment_path or rtype != "shared_memory":
                register(path, rtype)

        resource_tracker.register = register_others  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name, create=create, size=size)
        finally:
            resource_tracker.register = register


def unlink_segment(name: str, *, tracked: bool) -> None:
    """Removes the segment's name (mappings stay valid until closed), and forgets it in the
    resource tracker if this process registered it. FileNotFoundError if already gone."""
    import _posixshmem

    _posixshmem.shm_unlink("/" + name)
    if tracked:
        resource_tracker.unregister("/" + name, "shared_memory")


def reserve(segment: shared_memory.SharedMemory, name: str) -> None:
    """Allocates every page of a fresh segment now, so that a full /dev/shm is an error here
    and not a SIGBUS in some process that touches a page later."""
    fd: int = segment._fd  # type: ignore[attr-defined]
    try:
        os.posix_fallocate(fd, 0, segment.size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise OSError(
                exc.errno,
                f"no room in shared memory for table {name!r} ({segment.size:,} bytes): "
                "free some, make the table smaller, or pass reserve=False to allocate pages "
                "only when used",
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


class CreationLock:
    """A named POSIX semaphore that serialises ``create(..., exist_ok=True)`` of one table
    name, so that exactly one process initialises it and the others attach to a finished
    table instead of polling a half-made one. A holder killed inside leaves the semaphore
    taken: waiters then give up waiting after ``timeout`` and fall back on the exclusive
    create and the ready flag, which are race-free by themselves."""

    def __init__(self, name: str, timeout: float) -> None:
        self._sem = posix_ipc.Semaphore(semaphore_name(name), posix_ipc.O_CREAT, initial_value=1)
        self._timeout = timeout
        self._held = False

    def __enter__(self) -> CreationLock:
        try:
            self._sem.acquire(self._timeout)
            self._held = True
        except posix_ipc.BusyError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._sem.release()
        self._sem.close()


def semaphore_name(name: str) -> str:
    return f"/shmkv-create.{name}"


def unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(semaphore_name(name))
    except posix_ipc.ExistentialError:
        pass


def back_off(attempt: int) -> None:
    """Waits while a creator finishes a table: 0.1 ms, doubling up to 20 ms."""
    time.sleep(min(0.0001 * (2**attempt), 0.02))
