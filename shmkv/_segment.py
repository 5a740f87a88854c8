"""The shared-memory segment behind a table: its name, its owner, creating, attaching and
removing it.

A table is a file in the POSIX shared-memory directory (/dev/shm on Linux), mapped through
:class:`multiprocessing.shared_memory.SharedMemory`. Four rules keep it safe among
neighbours; each one answers something seen to go wrong:

NAMES are 1 to 200 of ``A-Z a-z 0-9 _ . -``, starting with a letter, digit or ``_`` and not
with ``sem.``. A name travels into a path (``/`` and ``..`` would leave the directory), the
standard library's resource tracker (a line protocol split on ``:`` and newlines, which a
crafted name could make delete another table), a terminal (escape sequences) and glibc's own
namespace (``sem.NAME`` is a named semaphore's file).

OWNERS. Whoever can write a segment can make every process that reads it see forged data (and
run code, through a pickle codec). So a segment is opened, ``fstat``-ed and refused with
:class:`~shmkv.UntrustedTable` before a byte of it is read, unless it belongs to the expected
user (the caller, or whom the caller names) and grants no permission beyond the mode asked
for. Tables are created 0600; sharing with another user is explicit (``user``, ``group``,
``mode``).

CREATION is serialised by ``flock`` on the segment itself. A creator holds it exclusively
from the moment the name exists until the header's ready flag is written; attachers take it
shared before they read the header. The kernel drops a flock when its holder dies, so a
creator killed half way blocks nobody, and an attacher that gets the lock and finds the
header unfinished knows at once that its creator died: attach() says so, and
``create(..., exist_ok=True)`` lays the table anew. (A named semaphore did this before; its
count dies with its holder, it was a second name to squat, and it outlived failed creates.)

REMOVAL removes that table and nothing else. A segment is known by its inode: unlinking by a
handle checks that the name still refers to its own segment, and at exit an owner forgets
its registration with the resource tracker (which unlinks by name) when the name has been
removed or taken by another table since, so that its exit never removes a newer table.

Attaching processes never register with the resource tracker (Python < 3.13 registers every
attach, and the tracker then removes the table when the attacher exits): 3.13+ passes
``track=False``; before, the one registration is skipped.
"""

from __future__ import annotations

import _posixshmem
import atexit
import errno
import fcntl
import grp
import os
import pwd
import re
import stat
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable, Union

from .errors import LockTimeout, UntrustedTable

MAX_NAME_LENGTH = 200
#: The first bytes of every table (SHMKV_MAGIC in csrc/layout.h), written as soon as a new
#: segment is sized, so that a table whose creator died is still known for shmkv's.
MAGIC = b"SHMKVTB1"
SHM_DIR = "/dev/shm"  # where glibc's shm_open() keeps its objects on Linux
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HAS_TRACK_PARAMETER = sys.version_info >= (3, 13)
_untracked = threading.Lock()

UserId = Union[int, str, None]


def check_name(name: Any) -> str:
    """The table name, if it is one of the portable names; TypeError or ValueError if not."""
    if not isinstance(name, str):
        raise TypeError(f"table name must be a str, not {type(name).__name__}")
    if (not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH
            or name.startswith("sem.")):
        raise ValueError(
            f"invalid table name {name!r}: 1 to {MAX_NAME_LENGTH} of the characters A-Z a-z "
            "0-9 _ . -, starting with a letter, digit or _, and not with 'sem.'"
        )
    return name


def path_of(name: str) -> str:
    return f"{SHM_DIR}/{name}"


# ---------------------------------------------------------------------- owners


def uid_of(user: UserId) -> int:
    """A user as a uid: an int or decimal string as it is, a name looked up, None the
    caller's euid."""
    if user is None:
        return os.geteuid()
    return _id_of(user, "user", lambda name: pwd.getpwnam(name).pw_uid)


def gid_of(group: UserId) -> int | None:
    """A group as a gid, or None for "any group" (then the mode may grant the group nothing)."""
    if group is None:
        return None
    return _id_of(group, "group", lambda name: grp.getgrnam(name).gr_gid)


def _id_of(value: int | str, what: str, by_name: Callable[[str], int]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what} must be an id, a name or None, not {type(value).__name__}")
    if isinstance(value, str) and not value.isdigit():
        try:
            return by_name(value)
        except KeyError:
            raise ValueError(f"no {what} named {value!r}") from None
    if int(value) < 0:
        raise ValueError(f"{what} must be an id >= 0, not {value}")
    return int(value)


def check_mode(mode: Any) -> int:
    """The permission bits a table may grant: the owner's read and write, and any of the
    group's and others' read and write bits."""
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ValueError(f"mode must be octal, such as 0o600 or '660', not {mode!r}") from None
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int such as 0o600, not {type(mode).__name__}")
    if mode & ~0o666 or mode & 0o600 != 0o600:
        raise ValueError(f"mode must give the owner read and write and no execute or special "
                         f"bits (0o600, 0o640, 0o660, ...), not {mode:#o}")
    return mode


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


class Owner:
    """Whom a table must belong to, and the most it may grant: checked against fstat()."""

    def __init__(self, user: UserId = None, group: UserId = None, mode: Any = 0o600) -> None:
        self.uid = uid_of(user)
        self.gid = gid_of(group)
        self.mode = check_mode(mode)

    def check(self, st: os.stat_result, name: str) -> None:
        """UntrustedTable unless st is a regular file of this owner (and group) that grants
        no permission beyond self.mode."""
        granted = stat.S_IMODE(st.st_mode)
        wrong = []
        if not stat.S_ISREG(st.st_mode):
            wrong.append("it is not a regular file")
        if st.st_uid != self.uid:
            wrong.append(f"it belongs to {user_name(st.st_uid)}, not {user_name(self.uid)}")
        if self.gid is not None and st.st_gid != self.gid:
            wrong.append(f"its group is {group_name(st.st_gid)}, not {group_name(self.gid)}")
        if granted & ~self.mode:
            wrong.append(f"its mode {granted:04o} grants more than {self.mode:04o}")
        if wrong:
            raise UntrustedTable(
                f"refusing table {name!r} (owner {user_name(st.st_uid)}, group "
                f"{group_name(st.st_gid)}, mode {granted:04o}): {'; '.join(wrong)}. "
                "Whoever can write a table can "
                "forge what every process reads from it. If it is not yours, choose another "
                "name or have its owner (or root) remove it; if you trust it, pass its owner "
                "as user= (and group=, mode=)"
            )

    def apply(self, fd: int) -> None:
        """Gives a new segment this owner, group and mode (another user needs privilege)."""
        if self.uid != os.geteuid() or self.gid is not None:
            os.fchown(fd, self.uid, -1 if self.gid is None else self.gid)
        os.fchmod(fd, self.mode)


# ---------------------------------------------------------------------- opening


def shm_open(name: str, flags: int) -> int:
    """A descriptor of the segment (glibc adds O_NOFOLLOW and O_CLOEXEC), with errors that
    say "table"."""
    try:
        fd: int = _posixshmem.shm_open("/" + name, flags, 0o600)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no table named {name!r}") from None
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"table {name!r} exists") from None
    except PermissionError:
        raise PermissionError(errno.EACCES, f"table {name!r} exists and is not open to you: "
                              f"{_describe(name)}") from None
    return fd


def _describe(name: str) -> str:
    try:
        st = os.lstat(path_of(name))
    except OSError:
        return "it is gone"
    return (f"it belongs to {user_name(st.st_uid)}, group {group_name(st.st_gid)}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}")


def named(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file the name refers to now, None if none: what tells a
    table's file from any other that takes its name later."""
    try:
        st = os.lstat(path_of(name))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def fd_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the file open as fd (see named())."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def names_file(name: str, fd: int) -> bool:
    """Whether the name still refers to the file open as fd (not removed, not replaced)."""
    return named(name) == fd_identity(fd)


def flock(fd: int, operation: int, deadline: float, name: str) -> None:
    """flock() that gives up at deadline (time.monotonic()) with LockTimeout."""
    attempt = 0
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise LockTimeout(f"table {name!r}: another process has been creating it for "
                              "longer than lock_timeout")
        back_off(attempt)
        attempt += 1


class Segment(shared_memory.SharedMemory):
    """A SharedMemory whose finalizer leaves a mapping that cffi still exports to its Table.
    The cyclic garbage collector finalizes the objects of a cycle in no set order, and the
    stock finalizer would raise BufferError there; the Table's own close() unmaps it."""

    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass


def open_segment(name: str, *, create: bool, size: int = 0, track: bool) -> Segment:
    """Maps the segment (or creates it exclusively, of size bytes); registers it with the
    resource tracker only if ``track``. Raises FileNotFoundError / FileExistsError as the OS
    says. Checks nothing: callers check the owner first (see open_checked)."""
    if _HAS_TRACK_PARAMETER:
        factory: Any = Segment  # `track` is 3.13+: typed for older ones
        return factory(name, create=create, size=size, track=track)  # type: ignore[no-any-return]
    if track:
        return Segment(name, create=create, size=size)
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
            return Segment(name, create=create, size=size)
        finally:
            resource_tracker.register = register


def map_checked(name: str, fd: int, *, track: bool) -> Segment:
    """Maps the file open as fd, by its name (SharedMemory opens names only), and makes sure
    the mapping is of that same file. FileNotFoundError if the name went meanwhile."""
    segment = open_segment(name, create=False, track=track)
    if identity(segment) == fd_identity(fd):
        return segment
    segment.close()
    if track:
        resource_tracker.unregister("/" + name, "shared_memory")
    raise FileNotFoundError(errno.ENOENT, f"table {name!r} was removed while being opened")


# ---------------------------------------------------------------------- removing


# name -> (st_dev, st_ino) of the tables this process created and registered with the
# resource tracker, which removes them by name when the process tree ends.
_owned: dict[str, tuple[int, int]] = {}


def track(name: str, segment: shared_memory.SharedMemory) -> None:
    """Notes that this process registered the segment with the resource tracker."""
    _owned[name] = identity(segment)


def _forget(name: str) -> None:
    if _owned.pop(name, None) is not None:
        resource_tracker.unregister("/" + name, "shared_memory")


@atexit.register
def _forget_replaced() -> None:
    """At exit, stops the resource tracker from removing names that no longer refer to the
    tables this process created: removed by someone else (no "leaked" warning for what is
    gone), or since taken by another table (which the tracker would remove by name)."""
    for name, identity in list(_owned.items()):
        if named(name) != identity:
            _forget(name)


def identity(segment: shared_memory.SharedMemory) -> tuple[int, int]:
    """(st_dev, st_ino) of a segment's file (see named())."""
    return fd_identity(segment._fd)  # type: ignore[attr-defined]


def unlink_segment(name: str, *, tracked: bool, identity: tuple[int, int] | None = None) -> None:
    """Removes the segment's name (mappings stay valid until closed) and forgets it in the
    resource tracker. With identity, only if the name still refers to that file:
    FileNotFoundError if it was removed, or taken by another table since (left alone)."""
    if identity is not None and named(name) != identity:
        _forget(name)
        raise FileNotFoundError(errno.ENOENT, f"table {name!r} was already removed")
    _posixshmem.shm_unlink("/" + name)
    if tracked or name in _owned:
        _forget(name)


def unlink(name: str, *, user: UserId = None) -> None:
    """Removes the table ``name`` from the system: no process can attach to it any more, and
    its memory is freed once every process has closed it. Also removes a table whose creator
    died while creating it.

    Raises ValueError for an invalid name, FileNotFoundError if there is no such table,
    UntrustedTable if it belongs to another user than ``user`` (default: the caller), and
    IncompatibleTable if the file of that name does not start with shmkv's magic (left
    alone: another program's segment, or an empty one).
    """
    from .errors import IncompatibleTable

    name = check_name(name)
    expected = uid_of(user)
    fd = shm_open(name, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_uid != expected:
            raise UntrustedTable(f"refusing to remove table {name!r}: it belongs to "
                                 f"{user_name(st.st_uid)}, not {user_name(expected)} "
                                 "(root may pass user= its owner)")
        if not stat.S_ISREG(st.st_mode) or os.pread(fd, len(MAGIC), 0) != MAGIC:
            raise IncompatibleTable(
                f"{path_of(name)!r} is not a shmkv table (no magic; an empty file can be one "
                "whose creator died before sizing it): left alone; remove it with rm if you "
                "know whose it is")
        unlink_segment(name, tracked=False, identity=(st.st_dev, st.st_ino))
    finally:
        os.close(fd)


def reserve(fd: int, size: int, name: str) -> None:
    """Allocates every page of a fresh segment now, so that a full /dev/shm is an error here
    and not a SIGBUS in some process that touches a page later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise OSError(
                exc.errno,
                f"no room in shared memory for table {name!r} ({size:,} bytes): "
                "free some, make the table smaller, or pass reserve=False to allocate pages "
                "only when used",
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def back_off(attempt: int) -> None:
    """Waits while a creator finishes a table: 0.1 ms, doubling up to 20 ms."""
    time.sleep(min(0.0001 * (2**attempt), 0.02))

