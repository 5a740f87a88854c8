"""Shared fixtures: every test gets table names of its own, removed afterwards."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from typing import Callable

import pytest

import shmkv

# Every join and every wait in a multi-process test is bounded by this, so that a deadlock
# fails the test instead of hanging the run.
JOIN_TIMEOUT = 60.0

START_METHODS = ["fork", "spawn"]


def unique_name(prefix: str = "shmkv-test") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove(name: str) -> None:
    """Unlinks the segment and the creation semaphore of name, if they exist."""
    from shmkv import _segment

    _segment.unlink_semaphore(name)
    try:
        _segment.unlink_segment(name, tracked=False)
    except FileNotFoundError:
        pass


@pytest.fixture
def make_name() -> Iterator[Callable[[], str]]:
    """Returns a factory of fresh table names; each one is unlinked at teardown."""
    names: list[str] = []

    def make() -> str:
        name = unique_name()
        names.append(name)
        return name

    yield make
    for name in names:
        remove(name)


@pytest.fixture
def name(make_name: Callable[[], str]) -> str:
    return make_name()


@pytest.fixture
def table(name: str) -> Iterator[shmkv.Table]:
    """A small table, created untracked-safe and unlinked at teardown."""
    t = shmkv.create(name, capacity=64, key_size=32, value_size=64)
    yield t
    try:
        t.unlink()
    except FileNotFoundError:
        pass
    t.close()


class Clock:
    """The clock of deadlines in this process, stopped at `now` seconds and moved by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        shmkv.Table._set_clock_for_testing(self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        shmkv.Table._set_clock_for_testing(self.now)


@pytest.fixture
def clock() -> Iterator[Clock]:
    """Stops the clock of deadlines for one test (and restarts it afterwards)."""
    yield Clock()
    shmkv.Table._set_clock_for_testing(None)


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context(request.param)


def hold_lock(name: str, ready, done, die: bool, writer: bool = True) -> None:
    """A child process: takes the table's lock (as a writer, or as a reader that optimistic
    gets do not wait for), sets ready, waits for done; then dies still holding the lock (die)
    or releases it and returns."""
    t = shmkv.attach(name)
    t._hold_lock_for_testing(writer=writer)
    ready.set()
    done.wait(JOIN_TIMEOUT)
    if die:
        os._exit(0)
    t._hold_lock_for_testing(False)
    t.close()


def join_all(processes: list, timeout: float = JOIN_TIMEOUT) -> list[int | None]:
    """Joins every process within timeout (in all); kills stragglers; returns exit codes."""
    import time

    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes
