"""A pytest plugin for running the limits library's own storage and strategy tests (from its
source distribution) against shmkv:// — loaded by tests/test_limits_suite.py into a pytest
run inside the unpacked sdist, never by our own suite.

limits parametrises its tests over storage URIs: ``tests/utils.py`` keeps them in the dicts
ALL_STORAGES and ALL_STORAGES_ASYNC (the decorators ``all_storage`` etc. hold views of
them, or lists made from them), and ``TestConcreteStorages`` in ``tests/test_storage.py``
lists its own. Every storage but the in-memory one has a fixture that starts a docker-compose
service (its conftest.py, which also imports pymongo, pymemcache and valkey). So this
plugin runs with ``--noconftest``, adds a ``shmkv`` parameter to each of those lists, skips
the other storages' parameters saying why, clears the shmkv table before each test, runs
coroutine tests with ``asyncio.run`` (what pytest-asyncio's auto mode does for these), and
stands in for ``pytest_lazy_fixtures.lf`` when it is not installed (only the skipped
parameters use it).

The table is named by $SHMKV_LIMITS_TABLE; the run's ini file (written by the test) registers
limits' markers."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import types
from typing import Any

import pytest

import shmkv
from shmkv.contrib.limits import AsyncShmkvStorage, ShmkvStorage  # registers shmkv://

NAME = os.environ["SHMKV_LIMITS_TABLE"]
# Room for every test's keys; moving windows of up to 256 (time, cost) pairs.
URL = f"shmkv://{NAME}?capacity=10000&key_size=128&value_size=4096"
ASYNC_URL = f"async+{URL}"

OTHERS = ("a storage of limits' own, whose fixture starts a docker-compose service (redis, "
          "memcached, mongodb, valkey) or, for memory://, limits' in-process storage: this "
          "run tests shmkv://")


if "pytest_lazy_fixtures" not in sys.modules:
    try:
        import pytest_lazy_fixtures  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest_lazy_fixtures")

        class _Lazy:
            def __init__(self, name: str) -> None:
                self.name = name

            def __repr__(self) -> str:
                return f"lf({self.name!r})"

        stub.lf = _Lazy  # type: ignore[attr-defined]
        sys.modules["pytest_lazy_fixtures"] = stub


def _param(*values: Any) -> Any:
    return pytest.param(*values, marks=pytest.mark.shmkv, id="shmkv")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shmkv: runs against shmkv://")
    # tests/utils.py is limits' (the sdist's root is on sys.path: rootdir, prepend mode).
    sys.path.insert(0, str(config.rootpath))
    from tests import utils

    utils.ALL_STORAGES["shmkv"] = _param(URL, {}, None)
    utils.ALL_STORAGES_ASYNC["shmkv"] = _param(ASYNC_URL, {}, None)
    # The moving-window decorators hold lists made from the dicts at import: add to them.
    for decorator, url in ((utils.moving_window_storage, URL),
                           (utils.async_moving_window_storage, ASYNC_URL)):
        values = decorator.mark.args[1]
        if not any(getattr(value, "id", None) == "shmkv" for value in values):
            values.append(_param(url, {}, None))


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """TestConcreteStorages (sync and async) lists its storages inline, with the class each
    must make: add shmkv's."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        if marker.args[0] != "uri, args, expected_instance, fixture":
            continue
        values = marker.args[1]
        if any(getattr(value, "id", None) == "shmkv" for value in values):
            continue
        is_async = any(str(getattr(value, "values", ("",))[0]).startswith("async+")
                       for value in values)
        values.append(_param(ASYNC_URL, {}, AsyncShmkvStorage, None) if is_async
                      else _param(URL, {}, ShmkvStorage, None))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=OTHERS)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "uri" in callspec.params and \
                item.get_closest_marker("shmkv") is None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _empty_table(request: pytest.FixtureRequest) -> None:
    """Each shmkv test starts on an empty table, as limits' fixtures flush their servers."""
    if request.node.get_closest_marker("shmkv") is not None:
        with shmkv.connect(URL.replace("shmkv://", "shm://", 1)) as table:
            table.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs a coroutine test in a new event loop (limits' tests of limits.aio)."""
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    arguments = {name: pyfuncitem.funcargs[name]
                 for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(function(**arguments))
    return True


def pytest_unconfigure(config: pytest.Config) -> None:
    try:
        shmkv.unlink(NAME)
    except FileNotFoundError:
        pass
