"""A gunicorn config whose master creates the shmkv table before it forks its workers, and
removes it when gunicorn exits. Use it as it is::

    SHMKV_URL='shm://sessions?capacity=100000&value_size=4096&on_full=evict' \\
        gunicorn -c python:shmkv.contrib.gunicorn_conf --workers 4 app:app

or import its hooks into your own ``gunicorn.conf.py``::

    from shmkv.contrib.gunicorn_conf import on_exit, on_starting

The app connects with the same URL (``shmkv.connect(os.environ["SHMKV_URL"])``, or
``ShmkvSessionInterface(os.environ["SHMKV_URL"])``) in each worker, after the fork. With
``capacity`` in the URL, a worker would also create the table if it did not exist; the master
doing it first means the geometry is checked once, before any request, and that the table
goes away with the server (not during a USR2 upgrade, whose new master keeps serving from
it). A table left behind by a master that was killed (``kill -9`` runs no hook) is attached
to at the next start, sessions and all, if its geometry matches.
A ``redis://`` URL is connected to and left as it is at exit: its sessions outlive one server.
"""

from __future__ import annotations

import os
from typing import Any

import shmkv
from shmkv._table import process_state

#: The table, named as shmkv.connect() takes it; the app must use the same URL. The default,
#: 10,000 sessions of up to 2 KiB, takes 21 MB, within Docker's 64 MB /dev/shm.
SHMKV_URL = os.environ.get(
    "SHMKV_URL", "shm://sessions?capacity=10000&key_size=64&value_size=2048&on_full=evict"
)

_table: Any = None


def on_starting(server: Any) -> None:
    """Creates (or attaches to) the table in the master, before any worker exists."""
    global _table
    _table = shmkv.connect(SHMKV_URL)
    # The name only: a redis:// URL may hold a password.
    server.log.info("shmkv: table %r ready for the workers", _table.name)


def on_exit(server: Any) -> None:
    """Removes a shared-memory table when gunicorn stops (see _removes)."""
    global _table
    if _table is None:
        return
    if isinstance(_table, shmkv.Table) and _removes(server, _table):
        _table.unlink()
        server.log.info("shmkv: table %r removed", _table.name)
    _table.close()
    _table = None


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
