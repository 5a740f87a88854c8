"""shmkv.contrib.flask in one process, through Flask's test client, on both backends (the
`store_url` fixture): the cookie, the stored data, login, logout and hostile cookies.
tests/test_gunicorn.py runs the example app in a real server with several workers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import JOIN_TIMEOUT, hold_lock, join_all

flask = pytest.importorskip("flask", reason="Flask is in the test extra: pip install -e '.[test]'")

import shmkv  # noqa: E402
from shmkv.contrib.flask import ShmkvSession, ShmkvSessionInterface  # noqa: E402

TTL = 600
PREFIX = b"session:"
ROOT = Path(__file__).resolve().parent.parent
# The table's methods that write, which the tests count calls of.
WRITES = ("set", "add", "compare_and_swap", "touch", "expire", "pop", "set_many", "incr",
          "setdefault")


@pytest.fixture
def app(store_url: str) -> flask.Flask:
    # The store fixture's sizes are too small for sessions: a bigger table here.
    url = store_url.replace("key_size=32", "key_size=64").replace("value_size=64",
                                                                   "value_size=1024")
    app = flask.Flask(__name__)
    app.session_interface = ShmkvSessionInterface(url, ttl=TTL)

    @app.get("/")
    def index():  # type: ignore[no-untyped-def]
        return {"user": flask.session.get("user"), "cart": flask.session.get("cart")}

    @app.post("/cart/<item>")
    def cart(item: str):  # type: ignore[no-untyped-def]
        flask.session["cart"] = [*flask.session.get("cart", []), item]
        return "ok"

    @app.post("/login/<user>")
    def login(user: str):  # type: ignore[no-untyped-def]
        flask.session.regenerate()
        flask.session["user"] = user
        return "ok"

    @app.post("/logout")
    def logout():  # type: ignore[no-untyped-def]
        flask.session.clear()
        return "ok"

    return app


@pytest.fixture
def table(app: flask.Flask):  # the app's own table, as this process sees it
    return app.session_interface.table


@pytest.fixture
def writes(table, monkeypatch) -> list[str]:
    """The names of the table's writing methods that the app calls from now on, in order."""
    calls: list[str] = []

    def counting(name: str):
        method = getattr(table, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return method(*args, **kwargs)
        return counted

    for name in WRITES:
        monkeypatch.setattr(table, name, counting(name))
    return calls


@pytest.fixture
def wall(app, monkeypatch) -> list[float]:
    """The interface's wall clock, stopped at the real time and moved by hand: wall[0]."""
    now = [time.time()]
    monkeypatch.setattr(app.session_interface, "_now", lambda: now[0])
    return now


def stored_data(table, sid: str):
    """The session data the table holds for sid: the stored JSON is [written, data]."""
    written, data = json.loads(table[PREFIX + sid.encode()])
    assert isinstance(written, int)
    return data


def session_cookie(response) -> dict[str, str]:
    """The attributes of the session cookie a response sets, by lower-case name."""
    (header,) = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("session=")]
    name_value, *attributes = [part.strip() for part in header.split(";")]
    found = {"value": name_value.split("=", 1)[1]}
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        found[key.lower()] = value
    return found


def sid_of(client) -> str | None:
    cookie = client.get_cookie("session")
    return cookie.value if cookie else None


@pytest.fixture
def ada(app):
    """A browser logged in as ada, and its session id."""
    client = app.test_client()
    client.post("/login/ada")
    return client, sid_of(client)


def opened(app, sid: str) -> ShmkvSession:
    """The session of sid as a request opens it (inside a request context)."""
    session = app.session_interface.open_session(app, flask.request)
    assert isinstance(session, ShmkvSession) and session.sid == sid
    return session


def test_an_anonymous_request_stores_nothing_and_sets_no_cookie(app, table) -> None:
    client = app.test_client()
    response = client.get("/")
    assert response.json == {"user": None, "cart": None}
    assert "Set-Cookie" not in response.headers
    assert len(table) == 0


def test_login_sets_a_random_httponly_samesite_cookie_and_stores_the_data(app, table) -> None:
    client = app.test_client()
    response = client.post("/login/ada")
    cookie = session_cookie(response)
    sid = cookie["value"]
    assert len(sid) == 43 and "ada" not in sid  # 256 random bits, not the user name
    assert "httponly" in cookie and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    assert "secure" not in cookie and "expires" not in cookie  # not permanent: browser session
    assert stored_data(table, sid) == {"user": "ada"}
    assert 0 < table.ttl(PREFIX + sid.encode()) <= TTL
    assert client.get("/").json["user"] == "ada"
    other = app.test_client()  # another browser knows nothing of it
    assert other.get("/").json["user"] is None


def test_the_cookie_follows_the_apps_settings(app, table) -> None:
    app.config.update(SESSION_COOKIE_SECURE=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_NAME="session", PERMANENT_SESSION_LIFETIME=timedelta(1))

    @app.post("/remember")
    def remember():  # type: ignore[no-untyped-def]
        flask.session.permanent = True
        flask.session["user"] = "ada"
        return "ok"

    cookie = session_cookie(app.test_client().post("/remember"))
    assert "secure" in cookie and cookie["samesite"] == "Strict"
    assert "expires" in cookie  # a permanent session's cookie expires with its data (ttl)


def test_login_moves_the_session_to_a_new_id(app, table) -> None:
    client = app.test_client()
    client.post("/cart/book")  # an anonymous session with data: the id an attacker may plant
    planted = sid_of(client)
    assert planted is not None
    client.post("/login/ada")
    sid = sid_of(client)
    assert sid != planted
    assert PREFIX + planted.encode() not in table  # the planted id leads nowhere now
    assert client.get("/").json == {"user": "ada", "cart": ["book"]}  # the data moved along


def test_logout_deletes_the_session_and_the_cookie(app, table, ada) -> None:
    client, sid = ada
    response = client.post("/logout")
    assert PREFIX + sid.encode() not in table
    assert session_cookie(response)["value"] == ""  # the browser is told to drop it
    thief = app.test_client()  # whoever kept a copy of the cookie gets nobody
    thief.set_cookie("session", sid)
    assert thief.get("/").json["user"] is None


def test_a_request_that_changes_nothing_writes_nothing(app, table, ada, writes) -> None:
    client, sid = ada
    for _ in range(3):
        response = client.get("/")
        assert response.json["user"] == "ada" and "Set-Cookie" not in response.headers
    assert writes == []  # a lock-free read of the session, nothing else


def test_the_deadline_moves_once_a_tenth_of_the_ttl_has_passed(app, table, clock, wall, ada,
                                                               writes) -> None:
    # Both clocks stop before the login: the table's (its deadlines) and the interface's (the
    # time of each write, stored with the session). On Redis, only the interface's stops.
    client, sid = ada
    key = PREFIX + sid.encode()
    exact = isinstance(table, shmkv.Table)

    def later(seconds: float) -> None:
        clock.advance(seconds)
        wall[0] += seconds

    later(TTL / 10 - 1)  # 59 s on: not yet
    assert client.get("/").json["user"] == "ada"
    assert writes == []
    if exact:
        assert table.ttl(key) == pytest.approx(TTL - (TTL / 10 - 1), abs=1e-6)
    later(2)  # 61 s on: the deadline moves to ttl from now, once
    assert client.get("/").json["user"] == "ada"
    assert client.get("/").json["user"] == "ada"
    assert writes == ["compare_and_swap"]
    assert stored_data(table, sid) == {"user": "ada"}
    if exact:
        assert table.ttl(key) == pytest.approx(TTL, abs=1e-6)
    else:
        assert TTL - JOIN_TIMEOUT < table.ttl(key) <= TTL
    later(TTL - 1)  # the session lives ttl after that refresh, less a tenth at worst
    assert client.get("/").json["user"] == "ada"


def test_refresh_after_zero_moves_the_deadline_on_every_request(app, table, ada,
                                                               writes) -> None:
    client, sid = ada
    app.session_interface.refresh_after = 0
    client.get("/")
    client.get("/")
    assert writes == ["compare_and_swap"] * 2


@pytest.mark.parametrize("fraction", [-0.1, 1, 1.5])
def test_refresh_after_is_a_fraction_below_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="refresh_after"):
        ShmkvSessionInterface("shm://x", refresh_after=fraction)


def test_a_refresh_never_brings_back_a_session_a_logout_ended(app, table, wall, ada) -> None:
    client, sid = ada
    with app.test_request_context("/", headers={"Cookie": f"session={sid}"}):
        session = opened(app, sid)
        del table[PREFIX + sid.encode()]  # another worker logs the user out meanwhile
        wall[0] += TTL  # and this request, which changed nothing, is due for a refresh
        response = app.response_class()
        app.session_interface.save_session(app, session, response)
    assert PREFIX + sid.encode() not in table and "Set-Cookie" not in response.headers


def test_sessions_of_an_earlier_version_are_read_and_refreshed(app, table, writes) -> None:
    # Before the time of the last write was stored with it, the table held the data alone.
    client = app.test_client()
    sid = "s" * 43
    table.set(PREFIX + sid.encode(), b'{"user":"ada"}', TTL)
    client.set_cookie("session", sid)
    assert client.get("/").json["user"] == "ada"
    assert writes == ["set", "compare_and_swap"]  # the test's set, the request's refresh
    assert stored_data(table, sid) == {"user": "ada"}


@pytest.mark.parametrize("cookie", ["", "x", "a" * 42, "a" * 44, "a" * 1000, "../../etc",
                                    "a" * 42 + "!", "é" * 43])
def test_a_cookie_that_is_not_our_id_is_a_new_session(app, table, cookie: str) -> None:
    client = app.test_client()
    client.set_cookie("session", cookie)
    assert client.get("/").json["user"] is None  # no error, not even for 1000 bytes
    client.post("/login/ada")
    assert sid_of(client) != cookie and client.get("/").json["user"] == "ada"


def test_data_that_is_not_a_session_is_ignored(app, table, ada) -> None:
    client, sid = ada
    for junk in (b"\xff\xfe", b"not json", b"[1, 2]", b'[1.5, {"user": "x"}]',
                 b'[1, {"user": "x"}, 3]'):
        table[PREFIX + sid.encode()] = junk
        assert client.get("/").json["user"] is None


def test_a_save_never_brings_back_a_session_a_logout_ended(app, table, ada) -> None:
    client, sid = ada
    interface = app.session_interface
    with app.test_request_context("/", headers={"Cookie": f"session={sid}"}):
        session = opened(app, sid)
        assert session["user"] == "ada"
        del table[PREFIX + sid.encode()]  # another worker logs the user out meanwhile
        session["cart"] = ["book"]  # and this request, still running, changes the session
        response = app.response_class()
        interface.save_session(app, session, response)
    assert PREFIX + sid.encode() not in table
    # The cookie is left alone: by the time this response arrives, the browser may hold the
    # id of a newer login, which a deletion by name would end.
    assert "Set-Cookie" not in response.headers


def test_a_login_never_brings_back_a_session_a_logout_ended(app, table, ada) -> None:
    client, sid = ada
    with app.test_request_context("/", headers={"Cookie": f"session={sid}"}):
        session = opened(app, sid)
        del table[PREFIX + sid.encode()]  # logged out in another worker meanwhile
        session.regenerate()  # while this request raises the session's privileges
        session["sudo"] = True
        response = app.response_class()
        app.session_interface.save_session(app, session, response)
    assert len(table) == 0 and "Set-Cookie" not in response.headers


def test_a_logout_that_removes_keys_wins_over_a_slower_save(app, table, ada) -> None:
    client, sid = ada
    client.post("/cart/pen")
    interface = app.session_interface
    with app.test_request_context("/", headers={"Cookie": f"session={sid}"}):
        slow, logout = opened(app, sid), opened(app, sid)
        slow["cart"] = ["pen", "book"]  # a request that began before the logout, ends after
        logout.pop("user")  # Flask-Login's logout_user() removes keys, it does not clear
        interface.save_session(app, logout, app.response_class())
        interface.save_session(app, slow, app.response_class())
    assert client.get("/").json == {"user": None, "cart": ["pen", "book"]}


def test_the_later_of_two_saves_wins(app, table, ada) -> None:
    client, sid = ada
    interface = app.session_interface
    with app.test_request_context("/", headers={"Cookie": f"session={sid}"}):
        first, second = opened(app, sid), opened(app, sid)
        first["cart"] = ["book"]
        interface.save_session(app, first, app.response_class())
        second["cart"] = ["pen"]
        interface.save_session(app, second, app.response_class())
    assert client.get("/").json == {"user": "ada", "cart": ["pen"]}


def test_a_url_connects_once_per_process(app) -> None:
    interface = app.session_interface
    assert interface.table is interface.table
    assert isinstance(interface.table, (shmkv.Table, shmkv.RedisTable))


def test_a_table_too_small_for_session_ids_says_so(store) -> None:
    app = flask.Flask(__name__)
    app.session_interface = ShmkvSessionInterface(store)  # keys of 32 bytes: too short
    with pytest.raises(ValueError, match="session keys take 51 bytes"):
        _ = app.session_interface.table


# ---------------------------------------------------------------------- a lock held elsewhere


@pytest.fixture
def held_lock(app, table, request):
    """Another process holds the table's lock (shm only): as a writer (param True), which
    stalls every access, or as a reader (False), which stalls only the writes. This process
    waits for it 0.2 s. Yields once it holds the lock; it releases it (and closes) at
    teardown."""
    import multiprocessing

    if not isinstance(table, shmkv.Table):
        pytest.skip("a Redis table has no lock of its own to hold: these cases are about "
                    "a shared-memory table's lock")
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=hold_lock, args=(table.name, ready, done, False, request.param))
    child.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        table.lock_timeout = 0.2
        yield
    finally:
        done.set()
        assert join_all([child]) == [0]


def finalizing_failed(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "finalizing failed" in r.getMessage()]


@pytest.mark.parametrize("held_lock", [False], indirect=True)
def test_a_held_lock_stalls_only_the_requests_that_write(app, table, ada, held_lock) -> None:
    client, sid = ada
    assert client.get("/").json["user"] == "ada"  # read without the lock
    assert client.post("/cart/book").status_code == 500  # LockTimeout: a write waits


@pytest.mark.parametrize("held_lock", [False], indirect=True)
def test_a_save_that_times_out_waits_once(app, table, ada, writes, held_lock, caplog) -> None:
    client, sid = ada
    # Flask's error handler saves the session again; that save must not wait a second time.
    assert client.post("/cart/book").status_code == 500
    assert writes == ["compare_and_swap"]
    assert finalizing_failed(caplog) == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and isinstance(errors[0].exc_info[1], shmkv.LockTimeout)


@pytest.mark.parametrize("held_lock", [True], indirect=True)
def test_a_session_that_fails_to_open_is_one_error(app, table, ada, held_lock, caplog) -> None:
    client, sid = ada
    assert client.get("/").status_code == 500  # a writer holds the lock: the get times out
    assert finalizing_failed(caplog) == []  # not a second, misleading AssertionError
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and isinstance(errors[0].exc_info[1], shmkv.LockTimeout)


def test_a_table_too_small_is_one_error_per_request(store, caplog) -> None:
    app = flask.Flask(__name__)
    app.session_interface = ShmkvSessionInterface(store)  # keys too short for session ids
    client = app.test_client()
    client.set_cookie("session", "a" * 43)  # an id: opening the session looks it up, and fails
    assert client.get("/").status_code == 500
    assert finalizing_failed(caplog) == []
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


# ---------------------------------------------------------------------- the README's app


def load_example(name: str):
    """examples/NAME.py, imported afresh."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples"
                                                  / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_defaults_to_the_gunicorn_hooks_url(make_name, monkeypatch) -> None:
    name = make_name()
    monkeypatch.setenv("SHMKV_URL", f"shm://{name}?capacity=10&key_size=64&value_size=512")
    interface = ShmkvSessionInterface()
    assert interface.table.name == name
    interface.table.close()


def test_a_request_that_uses_no_session_connects_to_no_table(make_name, monkeypatch) -> None:
    # A request served in a --preload master (say, a warm-up) must not make the table there,
    # before the gunicorn hook makes it for the workers' user.
    name = make_name()
    monkeypatch.setenv("SHMKV_URL", f"shm://{name}?capacity=10&key_size=64&value_size=512")
    app = flask.Flask(__name__)
    app.session_interface = ShmkvSessionInterface()
    app.get("/")(lambda: "ok")
    assert app.test_client().get("/").text == "ok"
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)


def test_without_shmkv_url_the_table_is_the_users_default(monkeypatch) -> None:
    from shmkv.contrib.gunicorn_conf import table_url

    monkeypatch.delenv("SHMKV_URL", raising=False)
    assert table_url().startswith(f"shm://sessions-{os.geteuid()}?capacity=")
    assert table_url(65534).startswith("shm://sessions-65534?")


def test_the_readme_app_runs(make_name, monkeypatch) -> None:
    monkeypatch.setenv("SHMKV_URL", f"shm://{make_name()}?capacity=10&key_size=64"
                                    "&value_size=512")
    app = load_example("app").app
    client, other = app.test_client(), app.test_client()
    assert client.get("/me").json == {"user_id": None}
    assert client.post("/login").text == "ok"
    assert client.get("/me").json == {"user_id": 42}
    assert other.get("/me").json == {"user_id": None}
    assert client.post("/logout").text == "ok"
    assert client.get("/me").json == {"user_id": None}
    app.session_interface.table.close()


def test_the_readme_shows_the_app_as_it_runs() -> None:
    # The README's Flask snippet is examples/app.py, to the character.
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(# app\.py\n.*?)```", readme, re.S)
    assert blocks == [(ROOT / "examples" / "app.py").read_text()]
