"""shmkv.contrib.django.ShmkvCache: Django's own BaseCacheTests on both backends (run from
the source distribution of the installed Django, in a process of their own), the value
encoding, atomic incr across processes, the async methods, one table per process, the
README's configuration, and Django's cache sessions in a real gunicorn with 3 workers."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import JOIN_TIMEOUT, fetch_sdist, join_all

django = pytest.importorskip("django", reason="Django is in the test extra: "
                                              "pip install -e '.[test]'")

from django.conf import settings  # noqa: E402

if not settings.configured:  # the tests below build caches by hand; Django needs settings
    settings.configure(USE_TZ=True)

import shmkv  # noqa: E402
from shmkv.contrib import django as shmkv_django  # noqa: E402
from shmkv.contrib.django import ShmkvCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUITE = Path(__file__).resolve().parent / "django_cache_suite.py"
WORKERS = 4
INCREMENTS = 500
CULL_TESTS = {"test_cull", "test_zero_cull", "test_cull_delete_when_store_empty"}


@pytest.fixture
def url(store_url: str) -> str:
    """A fresh table of either backend, with room for Django's values."""
    return store_url.replace("key_size=32", "key_size=64").replace("value_size=64",
                                                                   "value_size=4096")


@pytest.fixture
def cache(url: str) -> ShmkvCache:
    return ShmkvCache(url, {})


# ---------------------------------------------------------------------- Django's own tests


@pytest.fixture(scope="session")
def django_tests_dir() -> Path:
    """The tests/ folder of the source distribution of the installed Django, holding its
    cache/ tests (conftest.fetch_sdist)."""
    return fetch_sdist("django", django.__version__, "tests/cache/") / "tests"


def test_djangos_base_cache_tests_pass(url: str, django_tests_dir: Path, capsys) -> None:
    """BaseCacheTests, unmodified, on this backend; only culling's tests skip (Django's own
    skip, for backends without MAX_ENTRIES culling, as for memcached and Redis)."""
    location = url.replace("capacity=64", "capacity=1000")
    out = subprocess.run([sys.executable, str(SUITE), str(django_tests_dir), location],
                         capture_output=True, text=True, timeout=JOIN_TIMEOUT * 5,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    with capsys.disabled():  # the counts belong in every run's output, CI's included
        print(f"\nDjango {django.__version__} BaseCacheTests on {location.split(':')[0]}: "
              f"{counts['run'] - len(counts['skipped'])} passed, "
              f"{len(counts['skipped'])} skipped")
    assert counts["failures"] == counts["errors"] == 0
    assert counts["run"] >= 50
    skipped = {test.rsplit(".", 1)[1]: reason for test, reason in counts["skipped"]}
    assert skipped == {name: "Culling isn't implemented." for name in CULL_TESTS}


# ---------------------------------------------------------------------- values and keys


def test_an_int_is_the_tables_own_counter(cache: ShmkvCache, url: str) -> None:
    cache.set("n", 41)
    table = cache.table
    k = cache.make_key("n").encode()
    if isinstance(table, shmkv.Table):
        assert table[k] == (41).to_bytes(8, "little", signed=True)
    else:
        assert table[k] == b"41"  # Redis's INCRBY reads it
    assert table.incr(k) == 42  # the table's incr and Django's read one counter
    assert cache.get("n") == 42
    assert cache.incr("n", 8) == 50


@pytest.mark.parametrize("protocol", [pickle.HIGHEST_PROTOCOL, 2])
def test_a_pickled_value_is_never_taken_for_a_counter(cache: ShmkvCache, protocol: int,
                                                      monkeypatch) -> None:
    """Counters are exactly 8 bytes; a tagged pickle that would be 8 bytes gets a pad byte.
    No pickle of protocol 4 or 5 is 7 bytes long (a frame takes 9), so protocol 2, where
    some are, exercises the pad; every value comes back as it went in."""
    monkeypatch.setattr(shmkv_django, "_PROTOCOL", protocol)
    values: list[Any] = [None, True, False, 1.5, b"", "", "a", "ab", "abc", (), [], {},
                         (None,), (True,), ((),), 2**63, -(2**63) - 1, 2**64, b"abcdefgh",
                         "abcdefgh"]
    seven = [v for v in values if len(pickle.dumps(v, protocol)) == 7]
    assert bool(seven) == (protocol == 2)
    for value in values:
        cache.set("v", value)
        stored = cache.table[cache.make_key("v").encode()]
        assert len(stored) != 8 and stored[:1] == b"p"
        got = cache.get("v")
        assert got == value and type(got) is type(value)
    for value in (0, -1, 2**63 - 1, -(2**63)):
        cache.set("v", value)
        assert cache.get("v") == value


@pytest.mark.filterwarnings("ignore::django.core.cache.backends.base.CacheKeyWarning")
def test_long_keys_are_stored_as_a_hash(cache: ShmkvCache) -> None:
    key = "k" * 500  # far past the table's 64-byte keys
    cache.set(key, "long")
    assert cache.get(key) == "long" and cache.has_key(key)
    assert cache.get("k" * 499) is None
    assert cache.get_many([key, "short"]) == {key: "long"}
    assert cache.incr_version(key) == 2
    assert cache.get(key, version=2) == "long" and cache.get(key) is None
    assert cache.delete(key, version=2)


def test_a_table_with_keys_too_short_for_a_hash_is_refused(make_name) -> None:
    cache = ShmkvCache(f"shm://{make_name()}?capacity=10&key_size=16", {})
    with pytest.raises(ValueError, match="key_size >= 33"):
        cache.get("x")


def test_a_value_that_does_not_fit_deletes_the_old_one(make_name) -> None:
    cache = ShmkvCache(f"shm://{make_name()}?capacity=10&value_size=256", {})
    big = "x" * 1000
    cache.set("k", "small")
    cache.set("k", big)  # says nothing, as memcached's set
    assert cache.get("k") is None  # and no stale value survives
    assert cache.add("k", big) is False
    assert cache.set_many({"a": 1, "b": big, "c": "c"}) == ["b"]
    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "c": "c"}


def test_a_full_table_that_raises_stores_what_fits(make_name) -> None:
    cache = ShmkvCache(f"shm://{make_name()}?capacity=2&value_size=256", {})
    assert cache.set_many({"a": 1, "b": 2, "c": 3}) == ["c"]
    cache.set("d", 4)
    assert cache.get("d") is None and cache.get_many(["a", "b"]) == {"a": 1, "b": 2}


def test_timeouts(cache: ShmkvCache, clock) -> None:
    table = cache.table
    cache.set("default", 1)  # DEFAULT_TIMEOUT: the TIMEOUT setting, 300 s
    cache.set("never", 1, None)
    cache.set("short", 1, 10)
    cache.set("now", 1, 0)
    assert not cache.has_key("now")
    assert cache.add("gone", 1, -1) is True and not cache.has_key("gone")
    assert cache.add("never", 2, 0) is False
    if isinstance(table, shmkv.Table):  # the stopped clock is the shared-memory table's
        assert table.ttl(cache.make_key("default").encode()) == 300
        assert table.ttl(cache.make_key("never").encode()) is None
        clock.advance(11)
        assert cache.get_many(["default", "never", "short"]) == {"default": 1, "never": 1}
        assert cache.touch("default", 5) and table.ttl(cache.make_key("default").encode()) == 5
    assert cache.touch("default", None)
    assert cache.touch("never", 0) is True and not cache.has_key("never")
    assert cache.touch("never") is False


def test_incr_keeps_the_deadline_and_creates_nothing(cache: ShmkvCache) -> None:
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    assert not cache.has_key("missing")
    cache.set("n", 1, 100)
    assert cache.incr("n") == 2
    assert 99 < cache.table.ttl(cache.make_key("n").encode()) <= 100  # type: ignore[operator]
    cache.set("f", 1.5)
    assert cache.decr("f") == 0.5
    cache.set("big", 2**63 - 1)
    assert cache.incr("big") == 2**63  # past 64 bits, as Django's other backends
    assert cache.get("big") == 2**63
    cache.set("none", None)
    with pytest.raises(TypeError):
        cache.incr("none")


def count_up(url: str, barrier, n: int) -> None:
    """A child process: n increments of one counter through a ShmkvCache of its own."""
    cache = ShmkvCache(url, {})
    barrier.wait(JOIN_TIMEOUT)
    for _ in range(n):
        cache.incr("hits")
    cache.decr("hits", 0)


def test_incr_is_atomic_across_processes(url: str, mp_context) -> None:
    cache = ShmkvCache(url, {})
    cache.set("hits", 0)
    barrier = mp_context.Barrier(WORKERS)
    processes = [mp_context.Process(target=count_up, args=(url, barrier, INCREMENTS))
                 for _ in range(WORKERS)]
    for p in processes:
        p.start()
    assert join_all(processes) == [0] * WORKERS
    assert cache.get("hits") == WORKERS * INCREMENTS
    if isinstance(cache.table, shmkv.Table):
        cache.table.check()


# ---------------------------------------------------------------------- the table per process


def test_every_thread_shares_one_table_and_close_keeps_it(url: str) -> None:
    caches = [ShmkvCache(url, {}) for _ in range(4)]  # Django makes one per thread
    tables = []

    def use(cache: ShmkvCache) -> None:
        cache.set("k", "v")
        tables.append(cache.table)
        cache.close()  # after each request

    threads = [threading.Thread(target=use, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert len(tables) == 4 and all(t is tables[0] for t in tables)
    assert not tables[0].closed and caches[0].get("k") == "v"


def report_table(cache: ShmkvCache, conn) -> None:
    conn.send((id(cache.table), cache.get("k")))


def test_a_forked_process_connects_anew(url: str) -> None:
    cache = ShmkvCache(url, {})
    cache.set("k", "parent's")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=report_table, args=(cache, child))
    process.start()
    assert parent.poll(JOIN_TIMEOUT)
    table_id, value = parent.recv()
    assert join_all([process]) == [0]
    assert value == "parent's" and table_id != id(cache.table)


def test_options_go_to_connect(make_name) -> None:
    name = make_name()
    cache = ShmkvCache(f"shm://{name}?capacity=10",
                       {"OPTIONS": {"lock_timeout": 0.5, "MAX_ENTRIES": 5}})
    assert cache.table.lock_timeout == 0.5


# ---------------------------------------------------------------------- async


def test_the_async_methods(cache: ShmkvCache) -> None:
    async def run() -> None:
        assert await cache.aadd("a", 1) is True
        assert await cache.aadd("a", 2) is False
        await cache.aset("b", "two")
        assert await cache.aget("b") == "two"
        assert await cache.aincr("a", 9) == 10
        assert await cache.adecr("a") == 9
        assert await cache.aset_many({"c": 3, "d": 4}) == []
        assert await cache.aget_many(["a", "b", "c", "x"]) == {"a": 9, "b": "two", "c": 3}
        assert await cache.ahas_key("c") and not await cache.ahas_key("x")
        assert await cache.atouch("c", 100) is True
        assert await cache.adelete("c") is True
        await cache.adelete_many(["a", "d"])
        assert await cache.aget_or_set("e", 5) == 5
        assert await cache.aincr_version("e") == 2
        await cache.aclear()
        assert await cache.aget("b") is None
        await cache.aclose()
        with pytest.raises(ValueError):
            await cache.aincr("missing")

    asyncio.run(run())


def test_aincr_is_atomic_and_not_djangos_get_then_set(cache: ShmkvCache) -> None:
    cache.set("n", 0)

    async def run() -> None:
        await asyncio.gather(*(cache.aincr("n") for _ in range(50)))

    asyncio.run(run())
    assert cache.get("n") == 50
    assert type(cache).aincr is not shmkv_django.BaseCache.aincr


# ---------------------------------------------------------------------- the README


def test_the_readmes_configuration_runs(make_name) -> None:
    """The README's CACHES, as written, but for the table's name (a test's table is its
    own): Django makes the cache from it, and it caches."""
    from django.core.cache import CacheHandler

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Django's cache", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    location = namespace["CACHES"]["default"]["LOCATION"]
    assert location.startswith("shm://cache?")
    name = make_name()
    namespace["CACHES"]["default"]["LOCATION"] = location.replace("cache", name, 1)
    cache = CacheHandler(namespace["CACHES"])["default"]
    assert isinstance(cache, ShmkvCache)
    page = "x" * 20_000  # a cached page
    cache.set("page", page)
    assert cache.get("page") == page
    assert cache.table.on_full == "evict"  # type: ignore[union-attr]


# ---------------------------------------------------------------------- sessions in gunicorn

# A Django app whose sessions live in the cache, the cache in the table the gunicorn master
# makes from $SHMKV_URL (shmkv.contrib.gunicorn_conf). /admin answers 200 to a logged-in
# session and 401 otherwise; every answer names its worker.
DJANGO_APP = """\
import os

import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(
    SECRET_KEY="test_django",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
    SESSION_ENGINE="django.contrib.sessions.backends.cache",
    SESSION_COOKIE_NAME="session",
    CACHES={"default": {"BACKEND": "shmkv.contrib.django.ShmkvCache",
                        "LOCATION": os.environ["SHMKV_URL"]}},
)
django.setup()


def answer(status):
    response = HttpResponse(status=status)
    response["X-Worker-Pid"] = str(os.getpid())
    return response


def login(request):
    request.session.cycle_key()
    request.session["user"] = "ada"
    return answer(303)


def admin(request):
    return answer(200 if request.session.get("user") == "ada" else 401)


def logout(request):
    request.session.flush()
    return answer(303)


urlpatterns = [path("login", login), path("admin", admin), path("logout", logout)]

from django.core.wsgi import get_wsgi_application  # noqa: E402

app = get_wsgi_application()
"""


@pytest.mark.parametrize("backend", ["shm", "redis"])
def test_django_sessions_are_shared_by_every_gunicorn_worker(backend: str, make_name,
                                                             tmp_path: Path,
                                                             request) -> None:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra")
    from test_gunicorn import WORKERS as SERVER_WORKERS
    from test_gunicorn import Server, until

    name = make_name()
    if backend == "shm":
        url = f"shm://{name}?capacity=1000&key_size=128&value_size=4096&on_full=evict"
    else:
        url = f"unix://{request.getfixturevalue('redis_socket')}?name={name}"
    (tmp_path / "django_app.py").write_text(DJANGO_APP)
    deadline = time.monotonic() + 3 * JOIN_TIMEOUT
    server = Server(url, tmp_path / "gunicorn.log", app="django_app:app",
                    pythonpath=(tmp_path,))
    try:
        status, _, sid = server.request("POST", "/login")
        assert status == 303 and sid, server.log_text()

        # The login is known to every worker: ask until each of the three has said so.
        workers = until(server.all_workers, "three workers", deadline)
        assert len(workers) == SERVER_WORKERS
        authorised: set[int] = set()
        while not workers <= authorised:
            answers = until(lambda: server.admin_many(sid, 12), "answers", deadline)
            assert [status for status, _ in answers] == [200] * len(answers)
            authorised |= {pid for _, pid in answers}

        # One logout, in one worker: every worker refuses the session from then on.
        status, _, _ = server.request("POST", "/logout", sid)
        assert status == 303
        refused: set[int] = set()
        while not workers <= refused:
            answers = until(lambda: server.admin_many(sid, 12), "answers", deadline)
            assert [status for status, _ in answers] == [401] * len(answers)
            refused |= {pid for _, pid in answers}
    finally:
        assert server.stop() == 0, server.log_text()
        if backend == "redis":
            with shmkv.connect(url) as t:
                t.clear()
    if backend == "shm":
        with pytest.raises(FileNotFoundError):  # the master removed the table at exit
            shmkv.attach(name)
