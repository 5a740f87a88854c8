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
goes away with the server. A table left behind by a master that was killed (``kill -9``
runs no hook) is attached to at the next start, sessions and all, if its geometry matches.
A ``redis://`` URL is connected to and left as it is at exit: its sessions outlive one server.
"""

from __future__ import annotations

import os
from typing import Any

import shmkv

#: The table, named as shmkv.connect() takes it; the app must use the same URL.
SHMKV_URL = os.environ.get(
    "SHMKV_URL", "shm://sessions?capacity=100000&key_size=64&value_size=4096&on_full=evict"
)

_table: Any = None


def on_starting(server: Any) -> None:
    """Creates (or attaches to) the table in the master, before any worker exists."""
    global _table
    _table = shmkv.connect(SHMKV_URL)
    server.log.info("shmkv: table %r ready for the workers (%s)", _table.name, SHMKV_URL)


def on_exit(server: Any) -> None:
    """Removes a shared-memory table when gunicorn stops: its sessions end with the server."""
    global _table
    if _table is None:
        return
    if isinstance(_table, shmkv.Table):
        _table.unlink()
        server.log.info("shmkv: table %r removed", _table.name)
    _table.close()
    _table = None
