"""The example app (examples/sessions_app.py) in a real gunicorn with 3 workers, configured by
shmkv.contrib.gunicorn_conf: one login is known to every worker, one logout to every worker,
and a worker that replaces a killed one knows the sessions that were there before it.

gunicorn forks its workers itself, so there is no spawn variant here; the server listens on a
socket this test binds first (fd://), so that requests wait in its backlog until a worker
takes them, with no sleep and no port race. Every wait is bounded by JOIN_TIMEOUT."""

from __future__ import annotations

import http.client
import os
import selectors
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
from shmkv import _segment

pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
pytest.importorskip("flask", reason="Flask is in the test extra: pip install -e '.[test]'")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKERS = 3
ADA = urlencode({"login": "ada", "password": "correct horse battery staple"})
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="workers of another user need a "
                               "root master (gunicorn --user), and handing them the table a "
                               "chown")


class Server:
    """gunicorn running the example app on a loopback socket."""

    def __init__(self, url: str, log: Path, *options: str, app: str = "sessions_app:app",
                 pythonpath: tuple[Path, ...] = (), env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
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
                 "--pythonpath", ",".join(map(str, (EXAMPLES, *pythonpath))), *options, app],
                env={**os.environ, "SHMKV_URL": url, **(env or {})}, pass_fds=[fd, *pass_fds],
                stdout=out, stderr=out)

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


class FakeConfig:
    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid


class FakeArbiter:
    """What the hooks read of gunicorn's Arbiter: the workers' user and group are gunicorn's
    resolved ``user`` and ``group`` settings (the master's own by default)."""

    def __init__(self, reexec_pid: int = 0, master_pid: int = 0, uid: int | None = None,
                 gid: int | None = None) -> None:
        self.reexec_pid, self.master_pid = reexec_pid, master_pid
        self.cfg = FakeConfig(os.geteuid() if uid is None else uid,
                              os.getegid() if gid is None else gid)
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
    monkeypatch.setenv("SHMKV_URL", f"shm://{name}?capacity=10")
    gunicorn_conf.on_starting(arbiter)
    gunicorn_conf.on_exit(arbiter)
    if removed:
        with pytest.raises(FileNotFoundError):
            shmkv.attach(name)
    else:
        shmkv.attach(name).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a group other than one's own needs root")
def test_the_hooks_keep_the_urls_own_group_and_mode(monkeypatch, make_name) -> None:
    """A URL that shares its table by group (group= and mode=0660) keeps that group: the
    hooks add gunicorn's user and group only where the URL names none, or the workers,
    which connect with the URL alone, would refuse the table."""
    from shmkv.contrib import gunicorn_conf

    name = make_name()
    url = f"shm://{name}?capacity=10&group=65534&mode=660"
    monkeypatch.setenv("SHMKV_URL", url)
    arbiter = FakeArbiter(uid=0, gid=0)
    gunicorn_conf.on_starting(arbiter)
    try:
        st = os.stat(f"/dev/shm/{name}")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 65534, 0o660)
        shmkv.connect(url).close()  # what a worker does
    finally:
        gunicorn_conf.on_exit(arbiter)


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

    os.environ["SHMKV_URL"] = url
    gunicorn_conf.on_starting(FakeArbiter())
    gunicorn_conf.on_exit(FakeArbiter())


# ---------------------------------------------------------------------- workers of another user


def _master(conn, killed: bool) -> None:
    """A master whose workers run as nobody (gunicorn --user/--group): its on_starting; then
    it is killed (no hook runs) or stops (on_exit). Sends the table's hit counter."""
    from shmkv.contrib import gunicorn_conf

    arbiter = FakeArbiter(uid=NOBODY, gid=NOBODY)
    try:
        gunicorn_conf.on_starting(arbiter)
        conn.send(gunicorn_conf._table.incr(b"hits", 0))
    except Exception as e:
        conn.send(repr(e))
    if killed:
        os._exit(0)
    gunicorn_conf.on_exit(arbiter)


def _worker(conn) -> None:
    """A worker: drops to nobody after the fork, as gunicorn's do, then connects to the URL
    as the app does, with no owner named, and counts a hit."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        with shmkv.connect(os.environ["SHMKV_URL"]) as t:
            conn.send(t.incr(b"hits"))
    except Exception as e:
        conn.send(repr(e))


def run_child(target, *args):
    """Runs target(conn, *args) in a forked child; returns what it sent."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args))
    process.start()
    got = parent.recv() if parent.poll(JOIN_TIMEOUT) else "timeout"
    assert join_all([process]) == [0]
    return got


@ROOT_ONLY
def test_the_master_hands_the_table_to_the_workers_user(make_name, monkeypatch) -> None:
    name = make_name()
    monkeypatch.setenv("SHMKV_URL", f"shm://{name}?capacity=10&key_size=64&value_size=256")
    assert run_child(_master, True) == 0  # makes the table for nobody; then killed
    st = os.stat(f"{_segment.SHM_DIR}/{name}")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)
    assert run_child(_worker) == 1
    assert run_child(_worker) == 2
    with pytest.raises(shmkv.UntrustedTable):
        shmkv.attach(name)  # nobody's table: root takes it only when told whose it is
    # A master that restarts attaches to it again (its sessions and all), and removes it.
    assert run_child(_master, False) == 2
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name, user=NOBODY)


# The example app for workers that run as nobody: imported by the master as root
# (--preload), with a module the workers would import lazily from the standard library,
# which this machine keeps where nobody cannot read (a Python under /root).
APP_FOR_NOBODY = """\
import encodings.idna  # noqa: F401

from sessions_app import app  # noqa: F401
"""


@ROOT_ONLY
def test_a_real_gunicorn_hands_the_table_to_its_workers_user(make_name, tmp_path: Path) -> None:
    name = make_name()
    url = f"shm://{name}?capacity=100&key_size=64&value_size=1024"
    (tmp_path / "app_for_nobody.py").write_text(APP_FOR_NOBODY)

    def start(log: str) -> Server:
        return Server(url, tmp_path / log, "--user", str(NOBODY), "--group", str(NOBODY),
                      "--preload", app="app_for_nobody:app", pythonpath=(tmp_path,))

    first = start("first.log")
    try:
        status, pid, sid = first.request("POST", "/login", body=ADA)
        assert status == 303 and sid, first.log_text()
        assert os.stat(f"/proc/{pid}").st_uid == NOBODY  # a worker of nobody stored it
        st = os.stat(f"{_segment.SHM_DIR}/{name}")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)
        # The server is killed outright: no hook runs, and the table stays.
        workers = until(first.all_workers, "three workers", time.monotonic() + JOIN_TIMEOUT)
        first.proc.kill()
        for worker in workers:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        first.stop()
    second = start("second.log")  # attaches to nobody's table again: the login is known
    try:
        status, _, _ = second.request("GET", "/admin", sid)
        assert status == 200, second.log_text()
    finally:
        assert second.stop() == 0, second.log_text()
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name, user=NOBODY)


# ---------------------------------------------------------------------- an app that fails


# Every worker says it is importing the app, then waits until the test lets them all fail
# at once: the master halts at the first failure, and its shutdown (Arbiter.stop) reaps the
# others, which failed too; that raises HaltServer again, out of halt(), before on_exit.
# The workers block the SIGTERM that the shutdown sends them, so that each one's failure is
# an exit with gunicorn's WORKER_BOOT_ERROR, never a death by that signal (which a worker
# meets when it arrives during the interpreter's exit, after the handlers are gone).
FAILING_APP = """\
import os
import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
os.write(int(os.environ["READY_FD"]), b"x")
os.read(int(os.environ["GO_FD"]), 1)
raise RuntimeError("this app fails to import")
"""


def test_a_master_whose_workers_fail_to_boot_removes_the_table(make_name,
                                                               tmp_path: Path) -> None:
    name = make_name()
    (tmp_path / "failing_app.py").write_text(FAILING_APP)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        server = Server(f"shm://{name}?capacity=10", tmp_path / "gunicorn.log",
                        app="failing_app:app", pythonpath=(tmp_path,),
                        env={"READY_FD": str(ready_w), "GO_FD": str(go_r)},
                        pass_fds=(ready_w, go_r))
        os.close(ready_w)
        os.close(go_r)
        ready_w = go_r = -1
        try:
            deadline = time.monotonic() + JOIN_TIMEOUT
            started = b""
            with selectors.DefaultSelector() as selector:
                selector.register(ready_r, selectors.EVENT_READ)
                while len(started) < WORKERS and selector.select(deadline - time.monotonic()):
                    started += os.read(ready_r, WORKERS)
            assert len(started) == WORKERS, server.log_text()
            shmkv.attach(name).close()  # the master made the table
            os.write(go_w, b"x" * WORKERS)
            code = server.proc.wait(JOIN_TIMEOUT)
        finally:
            server.stop()
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
    assert code != 0 and "Worker failed to boot" in server.log_text()
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)
