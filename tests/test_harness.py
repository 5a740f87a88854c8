"""The harness's own promises: before every fork, the test process waits until each of its
OS threads is a live Python thread (conftest.settle_threads, and why)."""

from __future__ import annotations

import _thread
import os
import threading

import conftest


def raw_thread(release: threading.Event) -> int:
    """A thread that threading does not know of (as one ending is no longer known): its tid."""
    started: list[int] = []
    ready = threading.Event()

    def run() -> None:
        started.append(threading.get_native_id())
        ready.set()
        release.wait()

    _thread.start_new_thread(run, ())
    assert ready.wait(conftest.JOIN_TIMEOUT)
    return started[0]


def tids() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def test_a_fork_waits_for_a_thread_still_ending() -> None:
    release = threading.Event()
    tid = raw_thread(release)
    timer = threading.Timer(0.05, release.set)  # ends it while the fork waits
    timer.start()
    conftest.settle_threads()
    assert tid not in tids() and tid not in conftest._foreign_tids
    timer.join()


def test_a_thread_that_does_not_end_is_waited_for_once() -> None:
    release = threading.Event()
    tid = raw_thread(release)
    try:
        conftest.settle_threads()  # gives up after FOREIGN_AFTER: a C library's own thread
        assert tid in tids() and tid in conftest._foreign_tids
        conftest.settle_threads()  # and does not wait for it again
    finally:
        release.set()
        conftest._foreign_tids.discard(tid)
