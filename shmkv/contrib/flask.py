"""Flask sessions kept in a shmkv table, shared by every worker of the server.

::

    from shmkv.contrib.flask import ShmkvSessionInterface
    app.session_interface = ShmkvSessionInterface(ttl=1800)  # the table: $SHMKV_URL

    @app.post("/login")
    def login():
        ...                        # check the password
        session.regenerate()       # a new id at login: a planted id is worth nothing
        session["user_id"] = user.id

    @app.post("/logout")
    def logout():
        session.clear()            # deletes the entry: every worker refuses the id at once

The browser holds only a random id (256 bits from ``secrets``) in an HttpOnly, SameSite
cookie; the session's data lives in the table under ``session:<id>``, as Flask's tagged JSON
(dicts, lists, str, numbers, bytes, datetimes, tuples, UUIDs, Markup), and expires ``ttl``
seconds after its last request (sliding expiry; a request that changes nothing moves the
deadline only once a tenth of the ttl has passed, so that it reads without the table's lock:
see ``refresh_after``). A request that leaves a new session empty
stores nothing and sets no cookie; anonymous sessions that hold data (flashed messages, CSRF
tokens, carts) take room like any other: size the table for them, or create it with
``on_full="evict"`` so that the least recently used sessions make room. A session that does
not fit (TableFull, or ValueTooLarge past the table's value_size) fails its request.

The store is a table, or a URL for :func:`shmkv.connect` that each process connects to on
its first request: that works under gunicorn whether or not the app is imported before the
workers fork (``preload_app``), and with ``redis://...?name=...`` on many machines. Without
one, it is the URL that the gunicorn hooks (:mod:`shmkv.contrib.gunicorn_conf`) use:
``$SHMKV_URL``, or else their default table for this process's user.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from flask import Flask, Request, Response
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from .._connect import AnyTable, connect
from .gunicorn_conf import table_url

#: The ids this interface makes: 43 characters of urlsafe base64, 256 random bits.
_ID_BYTES = 32
_ID_LENGTH = len(secrets.token_urlsafe(_ID_BYTES))
_ID = re.compile(f"[A-Za-z0-9_-]{{{_ID_LENGTH}}}")

#: A request that changes nothing moves its session's deadline once this fraction of the
#: ttl (at least _MIN_REFRESH seconds) has passed since the session was last written.
REFRESH_AFTER = 0.1
_MIN_REFRESH = 1.0


class ShmkvSession(CallbackDict, SessionMixin):  # type: ignore[type-arg]
    """A Flask session whose data lives in a shmkv table under a random id."""

    def __init__(self, initial: Any = None, sid: str | None = None, stored: bytes | None = None,
                 written: float = 0.0):
        def on_update(session: Any) -> None:
            session.modified = True
            session.accessed = True

        super().__init__(initial, on_update)
        self.sid = sid
        #: The bytes this request read from the table (None for a new session): a save
        #: compares against them, to find what other requests changed meanwhile.
        self.stored = stored
        #: When the stored bytes were written (wall clock, seconds): their deadline is ttl
        #: later. A save of an unchanged session refreshes it only when this is old enough.
        self.written = written
        self.new = sid is None
        self.modified = False
        self.regenerate_id = False
        #: Set when a save raised: Flask's error handler saves again, and must not wait on
        #: the table's lock a second time (nor store half of what failed).
        self.save_failed = False

    def regenerate(self) -> None:
        """Moves the session to a new random id when the response is saved, and deletes the
        old one. Call it at login (and at any change of privilege): an id that an attacker
        planted in the browser beforehand (session fixation) then leads nowhere."""
        self.regenerate_id = True
        self.modified = True


Store = Union[str, AnyTable]


class ShmkvSessionInterface(SessionInterface):
    """Server-side sessions in a shmkv table (or a RedisTable).

    ``store``: a table, or a URL for :func:`shmkv.connect` (connected once per process, on
    first use); None (the default) is the gunicorn hooks' URL, read at first use:
    ``$SHMKV_URL``, or else their default table for this process's user
    (:func:`shmkv.contrib.gunicorn_conf.table_url`). ``ttl``: seconds (or a timedelta) a
    session lives after its last request; None takes the app's
    ``PERMANENT_SESSION_LIFETIME``. ``key_prefix``: prepended to the id in the table, so that
    sessions can share a table with other data.

    ``refresh_after``: a request that changes nothing writes nothing, unless this fraction
    of the ttl (and at least one second) has passed since the session was last written; then
    it moves the deadline to ttl from now. So most requests only read, without the table's
    lock (a held lock stalls only the requests that write), at a price: a session expires
    between (1 - refresh_after) × ttl and ttl after its last request, not exactly ttl after
    it (27 to 30 minutes with the default 0.1 and a ttl of 30). 0 writes on every request.
    The time of the last write is stored with the data (wall clock, so that several machines
    sharing a Redis table agree on it); a clock that moves back by more than a second makes
    the next request refresh.

    The cookie takes its name, domain, path and Secure flag from the app's ``SESSION_COOKIE_*``
    settings; it is always HttpOnly, and SameSite is the app's setting or else ``Lax``.
    A permanent session (``session.permanent = True``) gets a cookie that expires with the
    session; otherwise the cookie lasts as long as the browser keeps it and the data ``ttl``
    seconds from the last request. Two requests of one session that both change it are
    merged key by key (each save writes the keys its request set or removed onto what is
    stored then); a session that a logout ended stays ended.
    """

    session_class = ShmkvSession
    serializer = TaggedJSONSerializer()

    def __init__(
        self,
        store: Store | None = None,
        *,
        ttl: float | timedelta | None = None,
        key_prefix: str = "session:",
        refresh_after: float = REFRESH_AFTER,
    ) -> None:
        """Raises ValueError unless 0 <= refresh_after < 1. The store is connected to (and
        checked) on first use: see :attr:`table`."""
        if not 0 <= refresh_after < 1:
            raise ValueError(f"refresh_after={refresh_after!r}: a fraction of the ttl, at least "
                             "0 and below 1")
        self._store = store
        self._pid = -1
        self._table: Any = None
        self.ttl = ttl
        self.key_prefix = key_prefix.encode()
        self.refresh_after = refresh_after

    @property
    def table(self) -> AnyTable:
        """The table of this process: a URL is connected to on first use in each process.
        Raises ValueError when its keys are too short for session ids, and what
        :func:`shmkv.connect` raises (FileNotFoundError, shmkv.UntrustedTable, ...)."""
        if self._pid != os.getpid():  # first use here, or a process forked since
            store = table_url() if self._store is None else self._store
            table = connect(store) if isinstance(store, str) else store
            needed = len(self._key("x" * _ID_LENGTH))
            if table.key_size is not None and table.key_size < needed:
                raise ValueError(f"session keys take {needed} bytes, more than the key_size="
                                 f"{table.key_size} of table {table.name!r}")
            self._table, self._pid = table, os.getpid()
        return self._table  # type: ignore[no-any-return]

    def _key(self, sid: str) -> bytes:
        return self.key_prefix + sid.encode()

    def _ttl(self, app: Flask) -> timedelta:
        if self.ttl is None:
            return app.permanent_session_lifetime
        return self.ttl if isinstance(self.ttl, timedelta) else timedelta(seconds=self.ttl)

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        """A permanent session's cookie expires with its data, ttl after this request."""
        if session.permanent:
            return datetime.now(timezone.utc) + self._ttl(app)
        return None

    @staticmethod
    def _now() -> float:
        """The wall clock that dates each write of a session (the tests stop it)."""
        return time.time()

    def _encode(self, data: dict[str, Any], written: float) -> bytes:
        """What the table holds: [the time of this write in ms, the data], as tagged JSON."""
        return self.serializer.dumps([round(written * 1000), data]).encode()

    def _decode(self, stored: bytes) -> tuple[float, dict[str, Any]] | None:
        """(when it was written, the session data) in stored bytes; None for bytes that are
        not a session's. A bare dict (the data alone, as earlier versions stored it) was
        written at 0, and so is refreshed by its next request."""
        try:
            found = self.serializer.loads(stored.decode())
        except ValueError:  # not ours, or damaged
            return None
        if isinstance(found, dict):
            return 0.0, found
        if isinstance(found, list) and len(found) == 2 and type(found[0]) is int \
                and isinstance(found[1], dict):
            return found[0] / 1000, found[1]
        return None

    def _data(self, stored: bytes | None) -> dict[str, Any]:
        decoded = None if stored is None else self._decode(stored)
        return {} if decoded is None else decoded[1]

    def open_session(self, app: Flask, request: Request) -> ShmkvSession:
        """The session the request's cookie names, read without the table's lock; a new,
        empty one if there is none. Raises what the table raises (TableClosed, LockTimeout
        behind a writer that holds the lock too long, CorruptTable, ...)."""
        sid = request.cookies.get(self.get_cookie_name(app))
        # Anything but an id of ours is never looked up: a cookie is attacker-supplied.
        if sid and _ID.fullmatch(sid):
            stored = self.table.get(self._key(sid))
            decoded = None if stored is None else self._decode(stored)
            if decoded is not None:
                return self.session_class(decoded[1], sid=sid, stored=stored,
                                          written=decoded[0])
        return self.session_class()

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Stores what the request changed, and sets or deletes the cookie. Raises what the
        table raises (TableFull, ValueTooLarge, LockTimeout, ...), once: when Flask's error
        handler calls it again for the same session, it does nothing; nor does it for a
        session that open_session did not make (open_session raised)."""
        if not isinstance(session, ShmkvSession) or session.save_failed:
            return
        try:
            self._save(app, session, response)
        except Exception:
            session.save_failed = True
            raise

    def _save(self, app: Flask, session: ShmkvSession, response: Response) -> None:
        ttl = self._ttl(app)
        cookie = self._cookie_options(app)
        if session.accessed:
            response.vary.add("Cookie")

        if not session:
            if session.modified:  # this request emptied it: a logout
                if session.sid is not None:
                    self.table.pop(self._key(session.sid), None)
                response.delete_cookie(self.get_cookie_name(app), **cookie)
                response.vary.add("Cookie")
            return

        # A session that another request ended meanwhile (a logout in another worker) stays
        # ended: nothing is stored, and the cookie is left as it is, since the browser may
        # hold a newer one by now (a login in another tab).
        sid, table = session.sid, self.table
        if session.new or session.regenerate_id:
            if sid is not None and table.pop(self._key(sid), None) is None:
                return
            sid = secrets.token_urlsafe(_ID_BYTES)
            table.add(self._key(sid), self._encode(dict(session), self._now()), ttl)
        elif session.modified:
            if not self._replace(table, session, ttl):
                return
        elif not self._refresh(table, session, ttl):
            return
        if session.new or session.regenerate_id or self.should_set_cookie(app, session):
            response.set_cookie(self.get_cookie_name(app), sid,  # type: ignore[arg-type]
                                expires=self.get_expiration_time(app, session), **cookie)
            response.vary.add("Cookie")

    def _refresh(self, table: AnyTable, session: ShmkvSession, ttl: timedelta) -> bool:
        """Moves an unchanged session's deadline to ttl from now, if refresh_after of the ttl
        has passed since its last write (or the clock moved back); True if it did. A
        compare-and-swap against what this request read, so that it never revives a session
        that a logout ended; if it finds other bytes, another request wrote the session
        meanwhile, and so moved the deadline itself."""
        now = self._now()
        if self.refresh_after:
            threshold = max(ttl.total_seconds() * self.refresh_after, _MIN_REFRESH)
            # A write dated more than a second ahead: the clock moved back since (or
            # another machine's runs ahead); refresh rather than wait for it to catch up.
            if -_MIN_REFRESH < now - session.written < threshold:
                return False
        return table.compare_and_swap(self._key(session.sid),  # type: ignore[arg-type]
                                      session.stored, self._encode(dict(session), now), ttl)

    def _replace(self, table: AnyTable, session: ShmkvSession, ttl: Any) -> bool:
        """Stores what this request changed in its session; False if the session is gone.
        A plain set would bring back a session that a logout in another worker ended while
        this request ran, and would undo what other requests of the session changed
        meanwhile (a logout that removes the user's key, as Flask-Login's does). So the
        write is a compare-and-swap against what this request read, and on a conflict this
        request's changes, key by key (set or removed), go onto what is stored now."""
        key = self._key(session.sid)  # type: ignore[arg-type]
        read = self._data(session.stored)
        data = dict(session)
        changed = {k: v for k, v in data.items() if k not in read or read[k] != v}
        removed = read.keys() - data.keys()
        current = session.stored
        while current is not None:
            if table.compare_and_swap(key, current, self._encode(data, self._now()), ttl):
                return True
            current = table.get(key)
            if current is None:
                break
            theirs = self._data(current)
            data = {k: v for k, v in {**theirs, **changed}.items() if k not in removed}
            if not data:  # nothing left of the session: it ended
                table.pop(key, None)
                break
        return False

    def _cookie_options(self, app: Flask) -> dict[str, Any]:
        options = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "samesite": self.get_cookie_samesite(app) or "Lax",
            "httponly": True,
        }
        if hasattr(self, "get_cookie_partitioned"):  # Flask 3.1
            options["partitioned"] = self.get_cookie_partitioned(app)
        return options
