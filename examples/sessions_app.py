"""An app whose login sessions every gunicorn worker shares through one shmkv table.

    pip install -e '.[flask]' gunicorn
    gunicorn -c python:shmkv.contrib.gunicorn_conf --workers 3 --pythonpath examples \\
        sessions_app:app

Then open http://127.0.0.1:8000/, log in as ``ada`` with the password ``correct horse
battery staple`` (or ``grace`` / ``tr0ub4dor&3``), and reload /admin: the X-Worker-Pid
header (and the page) name the worker that answered, and every one of them knows you. Log out,
and none does. The table is the gunicorn hooks': SHMKV_URL if set (the master puts the URL it
used there for its workers), else their default table for the workers' user; with
``SHMKV_URL=redis://HOST:6379/0?name=sessions`` the same app keeps its sessions in Redis.
Run as root with ``--user nobody --group nogroup``, the master hands the table to that user.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

from flask import Flask, redirect, request, session
from werkzeug.security import check_password_hash

from shmkv.contrib.flask import ShmkvSessionInterface


@dataclass(frozen=True)
class User:
    id: int
    login: str
    name: str
    password_hash: str  # werkzeug's salted scrypt; the passwords themselves are nowhere


# The app's user database. A real one would be SQL, queried with parameters, never with
# strings pasted together.
USERS = [
    User(1, "ada", "Ada Lovelace",
         "scrypt:32768:8:1$3XqUC2uoGZ7R8Rlc$176b1348120e3150407675d64512fca9159921f8c14ab5228"
         "9aa65306b58ae89bd8139e99811674c7a934c4ec3f75ef02eecc0a180fd9736c42a131512b9d0f2"),
    User(2, "grace", "Grace Hopper",
         "scrypt:32768:8:1$Uty16lnAH4KEZfEc$2514e8dd7417035bf1a312d1438b946541912c8853f7f2cf6"
         "d9b51c2f6f3718d5528156e748124a10c9a48efca48e16fba920b817f633b54a7f2a0e87776be49"),
]
BY_LOGIN = {user.login: user for user in USERS}
BY_ID = {user.id: user for user in USERS}
# Checked against for unknown logins, so that they take as long as wrong passwords.
_NOBODY_HASH = USERS[0].password_hash

app = Flask(__name__)
app.session_interface = ShmkvSessionInterface(ttl=30 * 60)  # the gunicorn hooks' table
app.config["SESSION_COOKIE_SECURE"] = os.environ.get("SESSION_COOKIE_SECURE") == "1"

PAGE = """<!doctype html><title>shmkv sessions</title>
<p>Worker {pid}. {body}</p>"""
LOGIN_FORM = """<form method="post" action="/login">
<input name="login" placeholder="login" autocomplete="username">
<input name="password" type="password" placeholder="password" autocomplete="current-password">
<button>Log in</button></form>"""
LOGOUT_FORM = '<form method="post" action="/logout"><button>Log out</button></form>'


def page(body: str, status: int = 200) -> tuple[str, int]:
    return PAGE.format(pid=os.getpid(), body=body), status


def current_user() -> User | None:
    return BY_ID.get(session.get("user_id"))  # type: ignore[arg-type]


@app.after_request
def name_the_worker(response):  # type: ignore[no-untyped-def]
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.get("/")
def index():  # type: ignore[no-untyped-def]
    user = current_user()
    if user is None:
        return page("Nobody is logged in. " + LOGIN_FORM)
    return page(f"Logged in as {html.escape(user.name)}. <a href='/admin'>Admin</a> "
                + LOGOUT_FORM)


@app.post("/login")
def login():  # type: ignore[no-untyped-def]
    user = BY_LOGIN.get(request.form.get("login", ""))
    password = request.form.get("password", "")
    if not check_password_hash(user.password_hash if user else _NOBODY_HASH, password) \
            or user is None:
        return page("Wrong login or password. " + LOGIN_FORM, 401)
    session.clear()
    session.regenerate()  # a new id at login: an id planted beforehand leads nowhere
    session["user_id"] = user.id
    return redirect("/admin", 303)


@app.get("/admin")
def admin():  # type: ignore[no-untyped-def]
    user = current_user()
    if user is None:
        return page("Log in first. " + LOGIN_FORM, 401)
    return page(f"Admin page of {html.escape(user.name)}. " + LOGOUT_FORM)


@app.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    session.clear()  # deletes the session from the table: every worker forgets it at once
    return redirect("/", 303)
