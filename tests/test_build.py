"""What every build of the core must be, the wheel's above all: `make wheel` compiles against
glibc 2.17's symbols, so that the wheel runs on any glibc since, yet it must not lose what a
build against the running glibc has; and its extension must be the limited-API one that the
wheel's cp39-abi3 tag promises to every CPython from 3.9 on."""

from __future__ import annotations

import os
import time

import pytest

from shmkv import _core


def glibc_version() -> tuple[int, ...] | None:
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError):  # not glibc
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def test_lock_waits_are_timed_on_the_monotonic_clock_where_glibc_can() -> None:
    """pthread_mutex_clocklock came with glibc 2.30; a core built against 2.17 looks it up at
    run time, so that a change of the wall clock cannot stretch or cut short a lock wait."""
    version = glibc_version()
    if version is None or version < (2, 30):
        pytest.skip(f"the running C library has no pthread_mutex_clocklock (glibc {version})")
    assert _core.lib.shmkv_testing_lock_clock() == time.CLOCK_MONOTONIC


def test_the_core_uses_only_the_limited_api() -> None:
    """cffi builds against Py_LIMITED_API unless told otherwise: the file says so."""
    assert _core.__file__.endswith(".abi3.so"), _core.__file__
