"""shmkv.contrib.limits: the shmkv:// storage of the limits library. Its strategies on a
stopped clock, several processes hitting one limit at once, and the README's Flask-Limiter
app in a real gunicorn with 3 workers: 10 requests of 30 admitted with shmkv://, 10 per
worker with limits' memory:// (the bug it fixes). limits' own tests: test_limits_suite.py."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from conftest import JOIN_TIMEOUT, join_all

pytest.importorskip("limits", reason="limits is in the test extra: pip install -e '.[test]'")

import limits  # noqa: E402
from limits.storage import storage_from_string  # noqa: E402
from limits.strategies import (  # noqa: E402
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

import shmkv  # noqa: E402
from shmkv.contrib.limits import AsyncShmkvStorage, ShmkvStorage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START = 1_800_000_000.0  # a wall-clock time to start the injected clock at


class WallClock:
    """The time the storage reads (seconds since the epoch), moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def url(make_name: Callable[[], str]) -> str:
    return f"shmkv://{make_name()}?capacity=100&key_size=64&value_size=256"


@pytest.fixture
def wall() -> WallClock:
    return WallClock()


@pytest.fixture
def storage(url: str, wall: WallClock) -> ShmkvStorage:
    made = storage_from_string(url, clock=wall)
    assert isinstance(made, ShmkvStorage)
    return made


def test_the_scheme_and_its_url(url: str) -> None:
    assert isinstance(storage_from_string(url), ShmkvStorage)
    assert isinstance(storage_from_string("async+" + url), AsyncShmkvStorage)
    with pytest.raises(ValueError, match="unknown option"):
        storage_from_string(url + "&colour=red").check()
    with pytest.raises(FileNotFoundError):  # no capacity: the table must exist
        storage_from_string(url.split("?")[0] + "-absent").check()


def test_fixed_window_on_the_tables_clock(storage: ShmkvStorage, clock, wall) -> None:
    limiter = FixedWindowRateLimiter(storage)
    item = limits.parse("3/minute")
    assert [limiter.hit(item, "a") for _ in range(4)] == [True, True, True, False]
    assert limiter.hit(item, "b")  # another key, another counter
    assert limiter.get_window_stats(item, "a").reset_time == pytest.approx(START + 60)
    clock.advance(59.9)
    assert not limiter.hit(item, "a")
    clock.advance(0.1)  # the window's deadline: a new counter
    assert limiter.hit(item, "a")
    assert storage.get(item.key_for("a")) == 1


def test_moving_window_forgets_hits_one_by_one(storage: ShmkvStorage, wall) -> None:
    limiter = MovingWindowRateLimiter(storage)
    item = limits.parse("3/minute")
    for _ in range(3):
        assert limiter.hit(item)
        wall.now += 10
    assert not limiter.hit(item)
    assert limiter.get_window_stats(item) == (START + 60, 0)
    wall.now = START + 60  # the first hit is 60 s old: still inside
    assert not limiter.hit(item)
    wall.now = START + 60.5
    assert limiter.hit(item)
    assert storage.get_moving_window(item.key_for(), 3, 60) == (START + 10, 3)
    assert not limiter.hit(item, cost=2)
    storage.clear(item.key_for())
    assert limiter.hit(item, cost=3)


def test_a_long_moving_window_merges_its_oldest_hits_strictly(storage: ShmkvStorage,
                                                               wall) -> None:
    # value_size 256 holds 16 (time, cost) pairs; 40 hits a second apart merge into 16 pairs
    # whose oldest counts as late as the hits merged into it: never more than the limit.
    limiter = MovingWindowRateLimiter(storage)
    item = limits.parse("40/minute")
    for _ in range(40):
        assert limiter.hit(item)
        wall.now += 1
    assert not limiter.hit(item)
    assert len(storage.table[b"limits.m:" + item.key_for().encode()]) == 256
    start, count = storage.get_moving_window(item.key_for(), 40, 60)
    assert count == 40 and start > START + 1
    wall.now = START + 61.5  # the first two hits are out: exact hits would leave 2 places,
    assert limiter.get_window_stats(item).remaining == 0  # the merged ones count on
    wall.now = START + 100  # every hit is older than the window
    assert limiter.get_window_stats(item).remaining == 40


def test_sliding_window_counter_weighs_the_previous_window(storage: ShmkvStorage,
                                                           wall) -> None:
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = limits.parse("10/minute")
    wall.now = 60 * 30_000_000.0  # the start of a window
    assert all(limiter.hit(item) for _ in range(10))
    assert not limiter.hit(item)
    wall.now += 60 + 30  # half way through the next window: the previous one weighs 5
    assert [limiter.hit(item) for _ in range(6)] == [True] * 5 + [False]
    previous, previous_ttl, current, _ = storage.get_sliding_window(item.key_for(), 60)
    assert (previous, previous_ttl, current) == (10, pytest.approx(30), 5)
    wall.now += 60  # a window on: those 5 are the previous window's, weighing 2.5
    assert limiter.get_window_stats(item).remaining == 8
    wall.now += 60  # two windows on: all forgotten
    assert limiter.get_window_stats(item).remaining == 10
    limiter.clear(item)


def test_reset_removes_only_rate_limits(storage: ShmkvStorage) -> None:
    storage.table[b"session:x"] = b"kept"
    storage.incr("a", 60)
    storage.acquire_entry("b", 5, 60)
    storage.acquire_sliding_window_entry("c", 5, 60)
    assert storage.reset() == 3
    assert list(storage.table) == [b"session:x"]


def test_a_key_longer_than_the_table_allows_is_hashed(storage: ShmkvStorage) -> None:
    key = "LIMITER/" + "2001:db8::1/" * 10 + "10/1/minute"
    assert storage.incr(key, 60) == 1 and storage.incr(key, 60) == 2
    assert storage.get(key) == 2
    [stored] = list(storage.table)
    assert stored.startswith(b"limits.c:#") and len(stored) <= 64


def test_the_async_storage(url: str, wall) -> None:
    async def main() -> None:
        from limits.aio.strategies import MovingWindowRateLimiter as AsyncMoving

        storage = storage_from_string("async+" + url, clock=wall)
        limiter = AsyncMoving(storage)
        item = limits.parse("2/hour")
        assert [await limiter.hit(item) for _ in range(3)] == [True, True, False]
        assert await storage.incr("k", 60) == 1
        assert await storage.reset() == 2

    asyncio.run(main())


# ---------------------------------------------------------------------- several processes

HITS = 50


def hit_many(url: str, strategy: str, barrier, admitted) -> None:
    """A child process: HITS hits on one limit of 30 per hour; counts those admitted."""
    storage = storage_from_string(url)
    limiter = {"fixed": FixedWindowRateLimiter, "moving": MovingWindowRateLimiter,
               "sliding": SlidingWindowCounterRateLimiter}[strategy](storage)
    item = limits.parse("30/hour")
    barrier.wait(JOIN_TIMEOUT)
    mine = sum(limiter.hit(item, "shared") for _ in range(HITS))
    with admitted.get_lock():
        admitted.value += mine


@pytest.mark.parametrize("strategy", ["fixed", "moving", "sliding"])
def test_processes_together_admit_exactly_the_limit(strategy: str, mp_context,
                                                    make_name) -> None:
    name = make_name()
    url = f"shmkv://{name}?capacity=100&value_size=1024"
    workers = 4
    barrier = mp_context.Barrier(workers)
    admitted = mp_context.Value("i", 0)
    processes = [mp_context.Process(target=hit_many, args=(url, strategy, barrier, admitted))
                 for _ in range(workers)]
    for p in processes:
        p.start()
    assert join_all(processes) == [0] * workers
    assert admitted.value == 30
    with shmkv.attach(name) as table:
        table.check()


# ---------------------------------------------------------------------- the README, in gunicorn

WORKER_PID = '''
import os
from limits_app import app

@app.after_request
def worker_pid(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response
'''


def readme_app() -> str:
    """The README's Flask-Limiter app, as written (and as examples/limits_app.py has it)."""
    readme = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(# limits_app\.py\n.*?)```", readme, re.S).group(1)


def test_the_readme_app_is_the_example() -> None:
    assert readme_app() == (ROOT / "examples" / "limits_app.py").read_text()


@pytest.fixture
def limited_server(request, make_name, tmp_path: Path):
    from test_gunicorn import Server

    source = readme_app()
    assert source.count('"shmkv://ratelimits?capacity=100000"') == 1
    name = make_name()
    # The only change: a table name of this test's own (or limits' memory://).
    uri = f"shmkv://{name}?capacity=100000" if request.param == "shmkv" else "memory://"
    (tmp_path / "limits_app.py").write_text(
        source.replace("shmkv://ratelimits?capacity=100000", uri))
    (tmp_path / "pids.py").write_text(WORKER_PID)
    srv = Server(f"shm://{make_name()}?capacity=10", tmp_path / "gunicorn.log",
                 app="pids:app", pythonpath=(tmp_path,))
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_text()


def many(server, n: int) -> list[tuple[int, int]]:
    """n requests for /, six at a time: (status, worker pid) of each."""
    with ThreadPoolExecutor(6) as pool:
        return [(status, pid) for status, pid, _ in
                pool.map(lambda _: server.request("GET", "/"), range(n))]


@pytest.mark.parametrize("limited_server", ["shmkv"], indirect=True)
def test_gunicorn_workers_share_one_limit(limited_server) -> None:
    answers = many(limited_server, 30)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 10 + [429] * 20, limited_server.log_text()


@pytest.mark.parametrize("limited_server", ["memory"], indirect=True)
def test_with_memory_each_worker_counts_alone(limited_server) -> None:
    # The kernel picks the worker of each request, so it takes as many requests as it takes
    # for every worker to have refused one: then each has admitted its own 10, 30 in all.
    deadline = time.monotonic() + 3 * JOIN_TIMEOUT
    admitted: dict[int, int] = {}
    refused: set[int] = set()
    while len(refused) < 3:
        assert time.monotonic() < deadline, (admitted, refused)
        for status, pid in many(limited_server, 30):
            assert status in (200, 429)
            if status == 200:
                admitted[pid] = admitted.get(pid, 0) + 1
            else:
                refused.add(pid)
    assert sorted(admitted.values()) == [10, 10, 10]
    assert sum(admitted.values()) == 30
