"""Flask-Caching's own generic backend tests (GenericCacheTests from its sdist's
tests/test_backend_cache.py) run against ShmkvCache, on both backends. pip fetches the sdist
on first use (conftest.fetch_sdist)."""

from __future__ import annotations

import pytest
from host_suites import load, sdist_tests

pytest.importorskip("flask_caching", reason="Flask-Caching is in the test extra")

from shmkv.contrib.flask_caching import ShmkvCache  # noqa: E402

SUITE = sdist_tests("Flask-Caching")
backend_tests = load(SUITE / "test_backend_cache.py", "flask_caching_suite_backend")


class TestFlaskCachingSuite(backend_tests.GenericCacheTests):  # type: ignore[misc]
    """Its `sleep` fixture advances the `clock` fixture, which here is conftest's stopped
    clock of deadlines: on shared memory no test waits. Redis keeps its own time, so there
    the suite sleeps for real (as it does for its own RedisCache)."""

    @pytest.fixture
    def make_cache(self, cache_url: str):  # type: ignore[no-untyped-def]
        self._can_use_fast_sleep = cache_url.startswith("shm://")
        cache = ShmkvCache(cache_url, key_prefix="flask-caching-suite:")
        yield lambda: cache
        cache.table.close()
