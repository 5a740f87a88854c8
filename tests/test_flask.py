"""shmkv.contrib.flask in one process, through Flask's test client, on both backends (the
`store_url` fixture): the cookie, the stored data, login, logout and hostile cookies.
tests/test_gunicorn.py runs the example app in a real server with several workers."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

flask = pytest.importorskip("flask", reason="Flask is in the test extra: pip install -e '.[test]'")

import shmkv  # noqa: E402
from shmkv.contrib.flask import ShmkvSession, ShmkvSessionInterface  # noqa: E402

TTL = 600
PREFIX = b"session:"


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
    assert json.loads(table[PREFIX + sid.encode()]) == {"user": "ada"}
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


def test_each_request_slides_the_expiry(app, table, ada) -> None:
    client, sid = ada
    key = PREFIX + sid.encode()
    table.expire(key, 10)
    client.get("/")  # a request that changes nothing still keeps the session alive
    assert table.ttl(key) > 10


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
    for junk in (b"\xff\xfe", b"not json", b"[1, 2]"):
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
