"""Shared fixtures: every test gets table names of its own, removed afterwards."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from shmkv._core import lib

import shmkv

# Every join and every wait in a multi-process test is bounded by this, so that a deadlock
# fails the test instead of hanging the run.
JOIN_TIMEOUT = 60.0

START_METHODS = ["fork", "spawn"]


def pytest_report_header() -> str:
    return f"shmkv {shmkv.__version__} from {Path(shmkv.__file__).parent}"


def pytest_configure(config: pytest.Config) -> None:
    """With SHMKV_EXPECT_INSTALLED=1 (CI's run against the wheel), the tests must import an
    installed shmkv, not a source tree that happens to be on sys.path."""
    if os.environ.get("SHMKV_EXPECT_INSTALLED") == "1":
        where = Path(shmkv.__file__).resolve().parent.parent
        installed = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
        if where not in installed:
            raise pytest.UsageError(f"SHMKV_EXPECT_INSTALLED=1, but shmkv was imported from "
                                    f"{where}, not from {sorted(map(str, installed))}")


# A process that outlives its join gets this signal before it is killed, and prints where its
# threads are in Python (forked children inherit the handler; spawned ones import this module).
STACK_SIGNAL = signal.SIGUSR2
faulthandler.register(STACK_SIGNAL, all_threads=True)

# A fork beside a thread that is still ending. Thread.join() returns once the thread's Python
# state is gone, while its OS thread may still run its C teardown. Under AddressSanitizer that
# teardown hands the thread's allocator cache back under the allocator's locks, and GCC 12's
# libasan takes no lock around fork(): a child forked at that moment inherits a held lock and
# blocks in its first malloc of that size for ever. It happened in the sanitized CI run: a
# writer forked by test_optimistic's first test, just after test_namespaces' thread test, hung
# in malloc (in a loaded reproduction, 3 forks in 2,537 hung; none of 2,153 that waited). So
# before every os.fork() of the test process, this waits until each of its OS threads is a
# live Python thread. A thread that no Python thread accounts for within FOREIGN_AFTER
# seconds is taken to be a C library's own, and is not waited for again.
FOREIGN_AFTER = 2.0
_foreign_tids: set[int] = set()


def settle_threads() -> None:
    deadline = time.monotonic() + FOREIGN_AFTER
    while True:
        live = {t.native_id for t in threading.enumerate()}
        ending = {int(tid) for tid in os.listdir("/proc/self/task")} - live - _foreign_tids
        if not ending:
            return
        if time.monotonic() > deadline:
            _foreign_tids.update(ending)
            return
        time.sleep(0.001)  # no event marks the end of another thread's C teardown


os.register_at_fork(before=settle_threads)


def unique_name(prefix: str = "shmkv-test") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove(name: str) -> None:
    """Unlinks the segment of name, if it exists."""
    from shmkv import _segment

    try:
        _segment.unlink_segment(name, tracked=False)
    except FileNotFoundError:
        pass


def sleep_past(deadline: float) -> None:
    """Waits until time.monotonic() has passed a TTL's deadline: the passing of time is what
    the expiry tests are about. Never used to wait for another process (pipes do that)."""
    while time.monotonic() < deadline:
        time.sleep(deadline - time.monotonic() + 0.01)


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


def boot_clock_ns() -> int:
    """The real clock of deadlines, as the C core reads it: CLOCK_BOOTTIME, in ns."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Clock:
    """The clock of deadlines in this process, stopped and moved by hand, in whole ns.

    It stops where the real boot clock stands (or at start_ns), never at a fixed value: no
    test may depend on how long ago the machine booted, and a process that runs on the real
    clock reads about the same time. A child process that must see the stopped clock is
    given `ns` and makes a Clock(ns) of its own: the stopped clock is per process, and a
    spawned child does not inherit it. Whole ns, not float seconds, so that deadlines are
    exact however large the clock's reading."""

    def __init__(self, start_ns: int | None = None) -> None:
        self.ns = boot_clock_ns() if start_ns is None else start_ns
        lib.shmkv_testing_set_clock(self.ns)

    def advance(self, seconds: float) -> None:
        """Moves the clock on by seconds (converted to ns as a ttl is)."""
        self.ns += seconds * 10**9 if type(seconds) is int else round(seconds * 1e9)
        lib.shmkv_testing_set_clock(self.ns)

    @staticmethod
    def restart() -> None:
        """Returns this process to the real clock."""
        lib.shmkv_testing_set_clock(0)


@pytest.fixture
def clock() -> Iterator[Clock]:
    """Stops the clock of deadlines for one test (and restarts it afterwards)."""
    yield Clock()
    Clock.restart()


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


def describe_stuck(pid: int) -> str:
    """What a process that outlived its join is doing, for the failing test's log: its state,
    where it waits in the kernel, its native stack if gdb is installed, and its Python stack."""
    lines = [f"process {pid} outlived its join:"]
    for field in ("stat", "wchan", "syscall", "stack"):  # stack: the kernel's, root only
        try:
            with open(f"/proc/{pid}/{field}") as f:
                lines.append(f"  {field}: {f.read().strip()}")
        except OSError as e:
            lines.append(f"  {field}: {e}")
    try:  # every thread of the stuck process, and of ours, which forked it
        for who in (pid, os.getpid()):
            for tid in sorted(os.listdir(f"/proc/{who}/task"), key=int):
                with open(f"/proc/{who}/task/{tid}/comm") as f, \
                        open(f"/proc/{who}/task/{tid}/wchan") as g:
                    lines.append(f"  {who} thread {tid} {f.read().strip()}: {g.read()}")
    except OSError as e:
        lines.append(f"  threads: {e}")
    lines.append(f"  our Python threads: {threading.enumerate()}")
    print("\n".join(lines), file=sys.stderr, flush=True)  # before gdb, which may hang too
    lines = []
    gdb = shutil.which("gdb")
    if gdb is not None:
        try:
            # Not under the sanitized run's LD_PRELOAD of libasan: gdb hangs under it.
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            out = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-iex", "set auto-load off",
                                  "-ex", "thread apply all bt 25"], capture_output=True,
                                 text=True, timeout=15, env=env)
            lines.append(out.stdout[:8000])
        except subprocess.TimeoutExpired:
            lines.append("  gdb timed out attaching (the process may be in the kernel)")
    try:
        os.kill(pid, STACK_SIGNAL)  # faulthandler prints its Python stack to our stderr
    except OSError:
        pass
    return "\n".join(lines)


def join_all(processes: list, timeout: float = JOIN_TIMEOUT) -> list[int | None]:
    """Joins every process within timeout (in all); kills stragglers; returns exit codes."""
    import time

    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in processes:
        if p.is_alive():
            print(describe_stuck(p.pid), file=sys.stderr, flush=True)
            p.join(2)  # a moment for its Python stack to print (a failure's path only)
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


# ---------------------------------------------------------------------- a real redis-server

REDIS_SKIP = ("no redis-server on PATH: the Redis backend's tests need one "
              "(apt-get install redis-server; .ci/run installs it)")


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a unix socket in directory, persistence off, and its
    socket path; returns once the server says it accepts connections (read from its log
    through a pipe, within JOIN_TIMEOUT)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip(REDIS_SKIP)
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--save", "",
         "--appendonly", "no", "--dir", directory, "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log = b""
    deadline = time.monotonic() + JOIN_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"ready to accept connections" not in log.lower():  # 7.0 and 7.2+ differ
            left = deadline - time.monotonic()
            chunk = os.read(proc.stdout.fileno(), 4096) if selector.select(left) else b""
            if not chunk or left <= 0:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"redis-server did not start:\n{log.decode(errors='replace')}")
            log += chunk
    # Its later log lines go nowhere: nobody reads the pipe, and a full pipe would stop it.
    proc.stdout.close()
    return proc, sock


@pytest.fixture(scope="session")
def redis_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The unix socket of a redis-server that this test run started, and stops."""
    proc, sock = start_redis(str(tmp_path_factory.mktemp("redis")))
    yield sock
    proc.terminate()
    proc.wait(JOIN_TIMEOUT)


def table_url(request: pytest.FixtureRequest, name: str, shm: str, redis: str) -> Iterator[str]:
    """A URL for shmkv.connect() naming the fresh table `name`, in shared memory (with the
    query `shm`) or on Redis (with `redis`), as request.param says; a Redis table's keys are
    removed afterwards."""
    if request.param == "shm":
        yield f"shm://{name}?{shm}"
        return
    sock = request.getfixturevalue("redis_socket")
    url = f"unix://{sock}?name={name}&{redis}"
    yield url
    with shmkv.connect(url) as t:
        t.clear()


@pytest.fixture(params=["shm", "redis"])
def store_url(request: pytest.FixtureRequest, make_name: Callable[[], str]) -> Iterator[str]:
    """A URL for shmkv.connect() naming a fresh table, in shared memory or on Redis: the
    table contract holds for both. Limits: 64 entries (shm), keys of 32 bytes, values of 64."""
    yield from table_url(request, make_name(), "capacity=64&key_size=32&value_size=64",
                         "key_size=32&value_size=64")


@pytest.fixture
def store(store_url: str) -> Iterator[shmkv.Table | shmkv.RedisTable]:
    """A fresh table of either backend (see store_url)."""
    t = shmkv.connect(store_url)
    yield t
    t.close()


@pytest.fixture(params=["shm", "redis"])
def cache_url(request: pytest.FixtureRequest, make_name: Callable[[], str]) -> Iterator[str]:
    """A URL naming a fresh table sized for a cache (1,000 keys of up to 250 bytes, values
    of up to 4 KiB, evicting when full), in shared memory or on Redis."""
    yield from table_url(request, make_name(),
                         "capacity=1000&key_size=250&value_size=4096&on_full=evict",
                         "key_size=250&value_size=4096")


# ---------------------------------------------------------------------- host libraries' suites


def fetch_sdist(distribution: str, version: str, only: str = "") -> Path:
    """The unpacked source distribution of distribution==version, whose tests (which wheels
    do not ship) the adapters' tests run against shmkv: fetched with pip on first use into
    $SHMKV_HOST_SUITES (or a per-user temporary folder) and kept there. Only the members
    under `only` (e.g. "tests/cache/") are unpacked. Skips the caller, saying why, if pip
    cannot fetch it, except under CI (CI set), where that fails."""
    base = Path(os.environ.get("SHMKV_HOST_SUITES")
                or Path(tempfile.gettempdir(), f"shmkv-host-suites-{os.getuid()}"))
    where = base / f"{distribution}-{version}"
    done = where / ".unpacked"
    if done.exists():
        return Path(done.read_text())
    where.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
         ":all:", "--disable-pip-version-check", "--dest", str(where),
         f"{distribution}=={version}"],
        capture_output=True, text=True, timeout=JOIN_TIMEOUT * 10)
    archives = sorted(where.glob("*.tar.gz"))
    if fetched.returncode != 0 or not archives:
        why = (f"pip could not fetch the source distribution of {distribution} {version}, "
               f"whose own tests run against shmkv here: {fetched.stderr.strip()[-500:]}")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why, allow_module_level=True)
    with tarfile.open(archives[0]) as archive:
        top = archive.getnames()[0].split("/")[0]
        members = [m for m in archive.getmembers()
                   if m.isfile() and m.name.startswith(f"{top}/{only}")]
        archive.extractall(where, members=members)  # noqa: S202 - plain files, one folder
    done.write_text(str(where / top))
    return where / top
