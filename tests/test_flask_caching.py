"""shmkv.contrib.flask_caching: Flask-Caching loading the backend by import path, cachelib's
timeout rules (0 is forever, None the default, negative at once), values that do not fit,
and inc() shared by processes. cachelib's and Flask-Caching's own generic tests run against
it in test_cachelib_suite.py and test_flask_caching_suite.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import JOIN_TIMEOUT, join_all

flask = pytest.importorskip("flask", reason="Flask is in the test extra")
flask_caching = pytest.importorskip("flask_caching", reason="Flask-Caching is in the test extra")

import shmkv  # noqa: E402
from shmkv.contrib.flask_caching import ShmkvCache  # noqa: E402

WORKERS = 4
INCS = 200


@pytest.fixture
def app(cache_url: str) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="shmkv.contrib.flask_caching.ShmkvCache",
                      CACHE_SHMKV_URL=cache_url, CACHE_DEFAULT_TIMEOUT=120)
    return app


@pytest.fixture
def cache(app: flask.Flask) -> flask_caching.Cache:
    return flask_caching.Cache(app)


def test_flask_caching_loads_it_by_import_path(app, cache) -> None:
    backend = cache.cache
    assert isinstance(backend, ShmkvCache)
    assert backend.default_timeout == 120
    assert backend.key_prefix == "flask_cache_"  # CACHE_KEY_PREFIX's default
    with app.app_context():
        assert cache.set("user", {"name": "ada"})
        assert cache.get("user") == {"name": "ada"}
    # The entry is in the table, under the prefix, pickled.
    assert backend.table.get(b"flask_cache_user") is not None


def test_cached_view_and_memoize(app, cache) -> None:
    calls: list[int] = []

    @app.get("/slow")
    @cache.cached(timeout=60)
    def slow():  # type: ignore[no-untyped-def]
        calls.append(1)
        return f"computed {len(calls)}"

    @cache.memoize(60)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    client = app.test_client()
    assert client.get("/slow").text == "computed 1"
    assert client.get("/slow").text == "computed 1"
    with app.app_context():
        assert square(4) == square(4) == 16
    assert calls == [1, 4]


def test_no_url_is_a_clear_error() -> None:
    app = flask.Flask(__name__)
    app.config["CACHE_TYPE"] = "shmkv.contrib.flask_caching.ShmkvCache"
    with pytest.raises(ValueError, match="CACHE_SHMKV_URL"):
        flask_caching.Cache(app)


def test_timeout_zero_is_forever_and_none_is_the_default(cache) -> None:
    backend, table = cache.cache, cache.cache.table
    backend.set("forever", 1, timeout=0)
    backend.set("default", 1)  # None: CACHE_DEFAULT_TIMEOUT, 120 s
    backend.set("ten", 1, timeout=10)
    backend.set("delta", 1, timeout=timedelta(minutes=2))
    backend.add("added", 1, timeout=0)
    backend.set_many({"many": 1}, timeout=0)
    assert table.ttl(b"flask_cache_forever") is None
    assert table.ttl(b"flask_cache_added") is None
    assert table.ttl(b"flask_cache_many") is None
    assert 115 < table.ttl(b"flask_cache_default") <= 120
    assert 5 < table.ttl(b"flask_cache_ten") <= 10
    assert 115 < table.ttl(b"flask_cache_delta") <= 120


def test_default_timeout_zero_is_forever(cache_url: str) -> None:
    backend = ShmkvCache(cache_url, default_timeout=0)
    backend.set("k", "v")
    assert backend.table.ttl(b"k") is None


def test_negative_timeout_expires_at_once(cache) -> None:
    backend = cache.cache
    backend.set("k", "old")
    assert backend.set("k", "new", timeout=-1)
    assert backend.get("k") is None and not backend.has("k")
    assert backend.set_many({"a": 1, "b": 2}, timeout=-5) == ["a", "b"]
    assert backend.get_many("a", "b") == [None, None]


def test_expiry_on_the_stopped_clock(make_name, clock) -> None:
    backend = ShmkvCache(f"shm://{make_name()}?capacity=10")
    backend.set("short", 1, timeout=1)
    backend.set("forever", 1, timeout=0)
    backend.set("default", 1)  # cachelib's default timeout: 300 s
    clock.advance(1.5)
    assert backend.get_many("short", "forever", "default") == [None, 1, 1]
    clock.advance(300)
    assert backend.get_many("forever", "default") == [1, None]


def test_a_value_that_does_not_fit_is_a_backend_error(make_name) -> None:
    backend = ShmkvCache(f"shm://{make_name()}?capacity=2&value_size=100")
    assert backend.set("small", "x")
    assert backend.set("big", "x" * 200) is False
    assert backend.add("big", "x" * 200) is False
    assert backend.get("big") is None
    assert backend.set_many({"a": 1, "big": "x" * 200}) == ["a"]
    assert backend.set("third", 3) is False  # full, and the table does not evict
    assert backend.get_many("small", "a") == ["x", 1]


def test_clear_removes_only_its_prefix(cache_url: str) -> None:
    backend = ShmkvCache(cache_url, key_prefix="cache:")
    backend.table[b"session:1"] = b"kept"
    backend.set_many({"a": 1, "b": 2})
    assert backend.clear()
    assert list(backend.table) == [b"session:1"]


def test_inc_keeps_the_deadline(cache) -> None:
    backend, table = cache.cache, cache.cache.table
    assert backend.inc("new") == 1  # an absent key: the default timeout
    assert 115 < table.ttl(b"flask_cache_new") <= 120
    backend.set("n", 10, timeout=0)
    assert backend.inc("n", 5) == 15 and backend.dec("n", 20) == -5
    assert table.ttl(b"flask_cache_n") is None
    with pytest.raises(TypeError):
        backend.set("text", "abc")
        backend.inc("text")


def increment(url: str, barrier) -> None:
    backend = ShmkvCache(url)
    barrier.wait(JOIN_TIMEOUT)
    for _ in range(INCS):
        backend.inc("hits")
    backend.table.close()


def test_inc_is_atomic_across_processes(mp_context, make_name) -> None:
    url = f"shm://{make_name()}?capacity=10"
    backend = ShmkvCache(url)
    barrier = mp_context.Barrier(WORKERS)
    procs = [mp_context.Process(target=increment, args=(url, barrier))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    assert join_all(procs) == [0] * WORKERS
    assert backend.get("hits") == WORKERS * INCS
    assert isinstance(backend.table, shmkv.Table)
    backend.table.check()
