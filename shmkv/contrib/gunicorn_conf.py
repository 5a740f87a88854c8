"""A gunicorn config whose master creates the shmkv table before it forks its workers, and
removes it when gunicorn exits. Use it as it is::

    SHMKV_URL='shm://sessions?capacity=100000&value_size=65536&memory=48MiB&on_full=evict' \\
        gunicorn -c python:shmkv.contrib.gunicorn_conf --workers 4 app:app

or import its hooks into your own ``gunicorn.conf.py``::

    from shmkv.contrib.gunicorn_conf import on_exit, on_starting

The app connects with the same URL in each worker, after the fork:
``ShmkvSessionInterface()`` does by default, and ``shmkv.connect(os.environ["SHMKV_URL"])``
works too, since the master puts the URL it used into its environment. With ``capacity`` in
the URL, a worker would also create the table if it did not exist; the master doing it first
means the geometry is checked once, before any request, and that the table goes away with the
server (not during a USR2 upgrade, whose new master keeps serving from it). A table left
behind by a master that was killed (``kill -9`` runs no hook) is attached to at the next
start, sessions and all, if its geometry matches.
A ``redis://`` URL is connected to and left as it is at exit: its sessions outlive one server.

WORKERS OF ANOTHER USER
gunicorn's ``user`` and ``group`` settings make the workers drop to another user after the
fork (a root master serving as ``www-data``). The master then creates the table for that user
and group (``shmkv.connect(url, user=..., group=...)``: it chowns the new segment), so that
the workers, which accept only tables of their own user, can open it; a master that restarts
attaches to that table again, and refuses one that anybody else owns (shmkv.UntrustedTable).

THE DEFAULT TABLE
Without ``SHMKV_URL``, the table is ``sessions-UID`` (UID: the workers' user id): up to
100,000 sessions of up to 64 KiB each, in 48 MiB of /dev/shm (Docker gives a container 64 MB),
each taking room by its size: 50,000 sessions of 300 bytes fill 20 MB of it. The user id in
the name keeps the servers of two users apart, each with a table of its own, where a common
name would make the second one to start fail on the first one's table. It is no secret:
another local user may create ``sessions-UID`` first, and the server then refuses to start,
with an error that names the squatter (a denial of service, never a takeover). Name the table
in ``SHMKV_URL`` to choose another, and give each app of one user its own: two apps sharing a
table share their sessions.
"""

from __future__ import annotations

import atexit
import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import shmkv
from shmkv._table import process_state

#: The default table: 48 MiB, within Docker's 64 MB /dev/shm, for up to 100,000 sessions of
#: any size up to 64 KiB (a session of 300 bytes takes 400).
DEFAULT_OPTIONS = "capacity=100000&key_size=64&value_size=65536&memory=48MiB&on_full=evict"

_table: Any = None
_server: Any = None
_master = -1


def table_url(uid: int | None = None) -> str:
    """The table's URL, as shmkv.connect() takes it: ``$SHMKV_URL``, else the default table
    of user uid (default: this process's effective user),
    ``shm://sessions-UID?capacity=100000&key_size=64&value_size=65536&memory=48MiB&on_full=evict``.
    """
    url = os.environ.get("SHMKV_URL")
    if url:
        return url
    return f"shm://sessions-{os.geteuid() if uid is None else uid}?{DEFAULT_OPTIONS}"


def on_starting(server: Any) -> None:
    """Creates (or attaches to) the table in the master, before any worker exists, for the
    workers' user and group (gunicorn's ``user`` and ``group``), and puts its URL in the
    environment (``SHMKV_URL``) that the workers inherit. Raises what shmkv.connect()
    raises: shmkv.UntrustedTable when another user owns a table of that name,
    shmkv.IncompatibleTable, ValueError for a bad URL, ..."""
    global _table, _server, _master
    uid, gid = server.cfg.uid, server.cfg.gid
    url = table_url(uid)
    parts = urlsplit(url)
    # The workers' user and group, unless the URL names them itself (group= with mode=0660
    # to share by group): the workers connect with the URL alone and must find the same.
    given = {key for key, _ in parse_qsl(parts.query)}
    options = ({key: value for key, value in (("user", uid), ("group", gid))
                if key not in given} if parts.scheme == "shm" else {})
    _table = shmkv.connect(url, **options)
    os.environ["SHMKV_URL"] = url
    # Some exits skip on_exit: a worker that fails to boot makes the master halt, and the
    # halt raises again if a second worker failed too (gunicorn's Arbiter.stop reaps it).
    # The interpreter's exit runs this then; on_exit, which runs first otherwise, disarms it.
    _server, _master = server, os.getpid()
    atexit.register(_at_exit)
    # The name only: a redis:// URL may hold a password.
    server.log.info("shmkv: table %r ready for the workers", _table.name)


def on_exit(server: Any) -> None:
    """Removes a shared-memory table when gunicorn stops (see _removes)."""
    global _table
    if _table is None:
        return
    atexit.unregister(_at_exit)
    if isinstance(_table, shmkv.Table) and _removes(server, _table):
        _table.unlink()
        server.log.info("shmkv: table %r removed", _table.name)
    _table.close()
    _table = None


def _at_exit() -> None:
    """on_exit, for a master that exits without calling it. Workers (forked from the master,
    and so registered too) do nothing."""
    if os.getpid() == _master:
        on_exit(_server)


def _removes(server: Any, table: shmkv.Table) -> bool:
    """Whether this master's exit should remove the table. Not in the middle of an upgrade
    (USR2): the old master exits while the new one serves from the same table, and the new
    one may exit in a rollback; gunicorn decides the same way for its own unix sockets. Not
    when another live process created the table: a second server given the same name.
    Otherwise yes, the table it created or one a killed master left behind."""
    if server.reexec_pid or server.master_pid:
        return False
    creator = int(table.stats(wait=False)["creator_pid"])
    return creator == os.getpid() or process_state(creator) is None
