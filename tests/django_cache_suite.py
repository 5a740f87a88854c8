"""Django's own cache tests (BaseCacheTests, from tests/cache/tests.py of Django's source
distribution, unmodified) against shmkv.contrib.django.ShmkvCache, run by Django's test
runner in a process of its own. tests/test_django.py fetches the sdist and runs this:

    python tests/django_cache_suite.py DJANGO_TESTS_DIR LOCATION...

DJANGO_TESTS_DIR is the sdist's tests/ folder (holding cache/); each LOCATION is a URL for
shmkv.connect() that the suite runs against, a table given to it alone (the tests clear it).
The last line printed is JSON: the counts, and each skipped test with its reason.

What does not apply is left out as Django leaves it out for memcached and Redis: the
"cull" and "zero_cull" caches (MAX_ENTRIES culling; a table's capacity and on_full="evict"
bound it instead), whose tests then skip saying "Culling isn't implemented."
"""

from __future__ import annotations

import json
import sys
import unittest

BACKEND = "shmkv.contrib.django.ShmkvCache"
# As Django's memcached and Redis tests exclude them (memcached_excluded_caches).
EXCLUDED = {"cull", "zero_cull"}


def configure(tests_dir: str) -> None:
    sys.path.insert(0, tests_dir)  # Django's tests import each other as "cache.tests"
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="django_cache_suite",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "cache"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        MIDDLEWARE=[],
        USE_TZ=True,
    )
    django.setup()


def suite_for(locations: list[str]) -> unittest.TestSuite:
    from cache.tests import BaseCacheTests, caches_setting_for_tests
    from django.test import TestCase, override_settings

    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for i, location in enumerate(locations):
        scheme = location.split(":", 1)[0]
        caches = caches_setting_for_tests(BACKEND=BACKEND, LOCATION=location, exclude=EXCLUDED)
        cls = type(f"ShmkvCacheTests_{i}_{scheme}", (BaseCacheTests, TestCase),
                   {"__module__": __name__})
        suite.addTests(loader.loadTestsFromTestCase(override_settings(CACHES=caches)(cls)))
    return suite


def main(argv: list[str]) -> int:
    tests_dir, *locations = argv
    configure(tests_dir)
    from django.test.runner import DiscoverRunner

    runner = DiscoverRunner(verbosity=1, interactive=False)
    runner.setup_test_environment()
    databases = runner.setup_databases()
    try:
        result = runner.run_suite(suite_for(locations))
    finally:
        runner.teardown_databases(databases)
        runner.teardown_test_environment()
    print(json.dumps({
        "run": result.testsRun,
        "failures": len(result.failures),
        "errors": len(result.errors),
        "skipped": [[test.id(), reason] for test, reason in result.skipped],
    }))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
