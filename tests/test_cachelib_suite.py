"""cachelib's own generic backend tests (CommonTests, HasTests, ClearTests,
SerializerTests, DeleteManyWithPrefixTests from its sdist's tests/) run against ShmkvCache,
on both backends. pip fetches the sdist on first use (conftest.fetch_sdist)."""

from __future__ import annotations

import pytest
from host_suites import load, sdist_tests, shim_conftest

pytest.importorskip("flask_caching", reason="Flask-Caching is in the test extra")

from conftest import Clock  # noqa: E402

from shmkv.contrib.flask_caching import ShmkvCache  # noqa: E402

SUITE = sdist_tests("cachelib")
_SHIM = shim_conftest(SUITE / "conftest.py", ("TestData", "under_uwsgi"))
common = load(SUITE / "common.py", "cachelib_suite_common", _SHIM)
has = load(SUITE / "has.py", "cachelib_suite_has", _SHIM)
clear = load(SUITE / "clear.py", "cachelib_suite_clear", _SHIM)
serializer = load(SUITE / "serializer.py", "cachelib_suite_serializer", _SHIM)
with_prefix = load(SUITE / "delete_many_with_prefix.py", "cachelib_suite_prefix", _SHIM)


@pytest.fixture(autouse=True, params=[None, "test-key-prefix:"],
                ids=["no_key_prefix", "with_key_prefix"])
def cache_factory(request: pytest.FixtureRequest, cache_url: str):  # type: ignore[no-untyped-def]
    """As cachelib's test_redis_cache.py does: a factory of caches over one fresh table,
    with and without a key prefix. On shared memory, the suite's sleep() moves the stopped
    clock of deadlines instead of waiting (on Redis it waits)."""
    made: list[ShmkvCache] = []

    def factory(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("key_prefix", request.param)
        cache = ShmkvCache(cache_url, *args, **kwargs)
        made.append(cache)
        return cache

    request.cls.cache_factory = factory
    clock = None
    if cache_url.startswith("shm://"):
        clock = Clock()
        request.getfixturevalue("monkeypatch").setattr(common, "sleep", clock.advance)
    yield
    if clock is not None:
        Clock.restart()
    for cache in made:
        cache.table.close()


class TestCachelibSuite(common.CommonTests, has.HasTests, clear.ClearTests,
                        serializer.SerializerTests, with_prefix.DeleteManyWithPrefixTests):
    pass
