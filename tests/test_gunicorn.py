"""The example app (examples/sessions_app.py) in a real gunicorn with 3 workers, configured by
shmkv.contrib.gunicorn_conf: one login is known to every worker, one logout to every worker,
and a worker that replaces a killed one knows the sessions that were there before it.

gunicorn forks its workers itself, so there is no spawn variant here; the server listens on a
socket this test binds first (fd://), so that requests wait in its backlog until a worker
takes them, with no sleep and no port race. Every wait is bounded by JOIN_TIMEOUT."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import pytest
from conftest import JOIN_TIMEOUT, join_all

import shmkv

pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
pytest.importorskip("flask", reason="Flask is in the test extra: pip install -e '.[test]'")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKERS = 3
ADA = urlencode({"login": "ada", "password": "correct horse battery staple"})


class Server:
    """gunicorn running the example app on a loopback socket."""

    def __init__(self, url: str, log: Path, *options: str) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        fd = self.listener.fileno()
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "python:shmkv.contrib.gunicorn_conf",
                 "--workers", str(WORKERS), "--bind", f"fd://{fd}", "--graceful-timeout", "5",
                 "--pythonpath", str(EXAMPLES), *options, "sessions_app:app"],
                env={**os.environ, "SHMKV_URL": url}, pass_fds=[fd], stdout=out, stderr=out)

    def request(self, method: str, path: str, sid: str | None = None,
                body: str | None = None) -> tuple[int, int, str | None]:
        """(status, the pid of the worker that answered, the session id it set, if any);
        one connection per request, so that any worker may take it."""
        headers = {"Connection": "close"}
        if sid is not None:
            headers["Cookie"] = f"session={sid}"
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=JOIN_TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        cookie = response.getheader("Set-Cookie") or ""
        new_sid = cookie.split(";")[0].split("=", 1)[1] if cookie.startswith("session=") \
            else None
        return response.status, int(response.getheader("X-Worker-Pid", "0")), new_sid

    def admin_many(self, sid: str, n: int) -> list[tuple[int, int]]:
        """n requests for /admin, six at a time, so that several workers are busy at once."""
        with ThreadPoolExecutor(6) as pool:
            return [(status, pid) for status, pid, _ in
                    pool.map(lambda _: self.request("GET", "/admin", sid), range(n))]

    def admin_by_others(self, sid: str, known: set[int]) -> set[int]:
        """The pids of workers not in known that served /admin, always authorised, to a
        dozen requests."""
        answers = self.admin_many(sid, 12)
        assert [status for status, _ in answers] == [200] * len(answers)
        return {pid for _, pid in answers} - known

    def workers(self) -> set[int]:
        """The pids of the master's live children, read from /proc."""
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                    found.add(int(entry))
        return found

    def all_workers(self) -> set[int] | None:
        """The workers' pids once there are WORKERS of them, else None after a request (which
        paces the caller's loop on the server's answers)."""
        found = self.workers()
        if len(found) == WORKERS:
            return found
        self.request("GET", "/")
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(JOIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.listener.close()
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def until(check, what: str, deadline: float):
    """Calls check() until it returns something true, and returns that; fails at deadline.
    Each call makes requests to the server: the waiting is on the server's answers."""
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
    pytest.fail(f"gave up waiting: {what}")


@pytest.fixture(params=["shm", "redis"])
def server(request: pytest.FixtureRequest, make_name, tmp_path: Path):
    name = make_name()
    if request.param == "shm":
        url = f"shm://{name}?capacity=1000&key_size=64&value_size=1024&on_full=evict"
    else:
        url = f"unix://{request.getfixturevalue('redis_socket')}?name={name}"
    srv = Server(url, tmp_path / "gunicorn.log")
    srv.url, srv.backend = url, request.param  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()
        if request.param == "redis":
            with shmkv.connect(url) as t:
                t.clear()


def test_sessions_are_shared_by_every_worker(server) -> None:
    deadline = time.monotonic() + 3 * JOIN_TIMEOUT
    status, _, sid = server.request("POST", "/login", body=ADA)
    assert status == 303 and sid, server.log_text()
    status, _, _ = server.request("POST", "/login",
                                  body=urlencode({"login": "ada", "password": "wrong"}))
    assert status == 401

    # One login, then the admin page 60 times: always authorised, by more than one worker.
    answers = server.admin_many(sid, 60)
    assert [status for status, _ in answers] == [200] * 60
    served_by = {pid for _, pid in answers}
    # The kernel chooses the worker; should it pick one for all 60, keep asking (bounded).
    while len(served_by) < 2:
        more = until(lambda: server.admin_many(sid, 12), "a second worker", deadline)
        assert [status for status, _ in more] == [200] * len(more)
        served_by |= {pid for _, pid in more}
    workers = until(server.all_workers, "three workers", deadline)
    assert served_by <= workers

    # A worker killed outright is replaced, and its replacement knows the session.
    victim = next(iter(served_by))
    os.kill(victim, signal.SIGKILL)

    newcomers = until(lambda: server.admin_by_others(sid, workers),
                      "the replacement of a killed worker", deadline)
    assert victim not in newcomers

    # Logout in one worker: every worker, the new one included, refuses the old id at once.
    status, _, cleared = server.request("POST", "/logout", sid)
    assert status == 303 and cleared == ""
    workers = server.workers()
    refused_by: set[int] = set()
    while not workers <= refused_by:
        answers = until(lambda: server.admin_many(sid, 12), "every worker to answer", deadline)
        assert [status for status, _ in answers] == [401] * len(answers)
        refused_by |= {pid for _, pid in answers}
        workers = server.workers() or workers
    assert newcomers & refused_by


def test_the_master_creates_the_table_and_removes_it_at_exit(server) -> None:
    status, _, sid = server.request("POST", "/login", body=ADA)
    assert status == 303, server.log_text()
    name = server.url.split("//", 1)[1].split("?")[0]
    if server.backend == "shm":
        with shmkv.attach(name) as t:  # made by the master, with the URL's geometry
            assert (t.capacity, t.key_size, t.value_size, t.on_full) == (1000, 64, 1024,
                                                                         "evict")
            assert len(t) == 1
    assert server.stop() == 0, server.log_text()
    if server.backend == "shm":
        with pytest.raises(FileNotFoundError):
            shmkv.attach(name)
    else:  # Redis sessions outlive one server
        with shmkv.connect(server.url) as t:
            assert len(t) == 1


def test_a_preloaded_app_and_a_reload_keep_the_sessions(make_name, tmp_path: Path) -> None:
    # --preload imports the app in the master before on_starting creates the table: the
    # session interface must connect in each worker, not at import. A HUP replaces every
    # worker; the master, and so the table, stay.
    deadline = time.monotonic() + 3 * JOIN_TIMEOUT
    url = f"shm://{make_name()}?capacity=100&key_size=64&value_size=1024"
    server = Server(url, tmp_path / "gunicorn.log", "--preload")
    try:
        status, _, sid = server.request("POST", "/login", body=ADA)
        assert status == 303 and sid, server.log_text()
        before = until(server.all_workers, "three workers", deadline)
        server.proc.send_signal(signal.SIGHUP)
        until(lambda: server.admin_by_others(sid, before), "a worker started by the reload",
              deadline)
    finally:
        assert server.stop() == 0, server.log_text()


# ---------------------------------------------------------------------- the exit hook alone


class FakeArbiter:
    """What the hooks read of gunicorn's Arbiter."""

    def __init__(self, reexec_pid: int = 0, master_pid: int = 0) -> None:
        self.reexec_pid, self.master_pid = reexec_pid, master_pid
        self.log = self

    def info(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("arbiter, removed", [
    (FakeArbiter(), True),                      # a plain stop
    (FakeArbiter(reexec_pid=4242), False),      # the old master of a USR2 upgrade
    (FakeArbiter(master_pid=4242), False),      # a new master not yet promoted (a rollback)
])
def test_the_exit_hook_keeps_a_table_an_upgrade_still_uses(monkeypatch, make_name, arbiter,
                                                           removed: bool) -> None:
    from shmkv.contrib import gunicorn_conf

    name = make_name()
    monkeypatch.setattr(gunicorn_conf, "SHMKV_URL", f"shm://{name}?capacity=10")
    gunicorn_conf.on_starting(arbiter)
    gunicorn_conf.on_exit(arbiter)
    if removed:
        with pytest.raises(FileNotFoundError):
            shmkv.attach(name)
    else:
        shmkv.attach(name).close()


def test_the_exit_hook_keeps_a_table_another_live_server_created(make_name,
                                                                 mp_context) -> None:
    name = make_name()
    url = f"shm://{name}?capacity=10"
    with shmkv.connect(url) as other:  # this process plays the other server's master
        # The hooks run in a child, as the second server's master would.
        child = mp_context.Process(target=start_and_exit, args=(url,))
        child.start()
        assert join_all([child]) == [0]
        assert other.stats()["creator_pid"] == os.getpid()
        shmkv.attach(name).close()  # still there


def start_and_exit(url: str) -> None:
    from shmkv.contrib import gunicorn_conf

    gunicorn_conf.SHMKV_URL = url
    gunicorn_conf.on_starting(FakeArbiter())
    gunicorn_conf.on_exit(FakeArbiter())
