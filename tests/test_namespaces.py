"""Processes of different PID namespaces sharing a table (containers of one pod share the IPC
namespace, and their main processes are all pid 1): they wait for each other's lock like any
two processes, and a lock timeout never names a wrong process.

The processes are started with ``unshare --pid --fork`` (root, or user namespaces, needed);
the tests skip, saying why, where that does not work. They are subprocesses, not
multiprocessing children, so there is no fork/spawn variant to run."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import JOIN_TIMEOUT

import shmkv

HOLDER = """
import sys, shmkv
t = shmkv.attach(sys.argv[1])
t._hold_lock_for_testing()
print("held", __import__("os").getpid(), flush=True)
sys.stdin.readline()
t._hold_lock_for_testing(False)
t.close()
print("released", flush=True)
"""

WAITER = """
import sys, shmkv
t = shmkv.attach(sys.argv[1], lock_timeout=0.2)
try:
    t[b"k"] = b"first"
    print("stored at once", flush=True)
except shmkv.LockTimeout as exc:
    print("LockTimeout", __import__("os").getpid(), str(exc), flush=True)
except shmkv.Error as exc:
    print(type(exc).__name__, str(exc), flush=True)
sys.stdin.readline()
t.lock_timeout = 60.0
t[b"k"] = b"second"
t.close()
print("stored", flush=True)
"""


def unshare_pid() -> list[str]:
    """The command prefix that runs a process as pid 1 of a new PID namespace, or a skip."""
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("no unshare(1) on PATH: cannot make PID namespaces here")
    cmd = [exe, "--pid", "--fork"]
    probe = subprocess.run([*cmd, "sh", "-c", "echo $$"], capture_output=True, text=True,
                           timeout=JOIN_TIMEOUT)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip("unshare --pid --fork does not work here (needs root or user namespaces): "
                    + probe.stderr.strip()[:200])
    return cmd


def start(cmd: list[str], script: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*cmd, sys.executable, "-c", script, name], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def read_line(proc: subprocess.Popen[str]) -> str:
    """The next line the process prints, waiting at most JOIN_TIMEOUT."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(JOIN_TIMEOUT):
            proc.kill()
            raise AssertionError("no answer from the child within JOIN_TIMEOUT")
    return proc.stdout.readline().strip()


def tell(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(JOIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_pid_1_of_two_namespaces_wait_for_each_other(name) -> None:
    """A holder that is pid 1 of one namespace holds the lock; a writer that is pid 1 of
    another gets LockTimeout (not "already held by this thread?" at once), told that the
    holder is a thread of another PID namespace, not some local process; once the holder
    releases, the writer's write goes through."""
    cmd = unshare_pid()
    with shmkv.create(name, capacity=8, key_size=8, value_size=16) as t:
        holder = start(cmd, HOLDER, name)
        waiter = None
        try:
            assert read_line(holder) == "held 1"
            waiter = start(cmd, WAITER, name)
            answer = read_line(waiter)
            kind, pid, message = answer.split(" ", 2)
            assert (kind, pid) == ("LockTimeout", "1"), answer
            assert "held by thread 1 (process 1 there) of another PID namespace" in message
            assert "held by process" not in message and "this thread" not in message
            tell(holder)
            assert read_line(holder) == "released"
            tell(waiter)
            assert read_line(waiter) == "stored"
        finally:
            for proc in (holder, waiter):
                if proc is not None:
                    if proc.poll() is None and proc.stdin is not None:
                        proc.stdin.close()
                    assert finish(proc) == 0
        assert t[b"k"] == b"second"
        t.check()
        t.unlink()


def test_another_thread_of_this_process_waits_too(name) -> None:
    """The relock check is per thread: another thread of the holder's process waits for the
    lock and times out, with a message naming this process."""
    t = shmkv.create(name, capacity=8, key_size=8, value_size=16, lock_timeout=0.2)
    t._hold_lock_for_testing()
    caught: list[BaseException] = []

    def write() -> None:
        try:
            t[b"k"] = b"v"
        except BaseException as exc:
            caught.append(exc)

    try:
        th = threading.Thread(target=write)
        th.start()
        th.join(JOIN_TIMEOUT)
    finally:
        t._hold_lock_for_testing(False)
    assert len(caught) == 1 and isinstance(caught[0], shmkv.LockTimeout), caught
    assert f"held by process {os.getpid()} (alive)" in str(caught[0])
    t[b"k"] = b"v"
    t.check()
    t.unlink()
    t.close()


def test_the_same_thread_relocking_is_told_at_once(name) -> None:
    """A thread that holds the lock and locks again is told so at once (LockError), not
    after the lock timeout: the check the error-checking mutex used to make."""
    t = shmkv.create(name, capacity=8, key_size=8, value_size=16, lock_timeout=JOIN_TIMEOUT)
    t._hold_lock_for_testing()
    try:
        with pytest.raises(shmkv.LockError, match="already held by this thread"):
            t[b"k"] = b"v"  # a wait would end in LockTimeout, after a minute
    finally:
        t._hold_lock_for_testing(False)
    t[b"k"] = b"v"
    t.check()
    t.unlink()
    t.close()
