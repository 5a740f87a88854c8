"""The benchmark suite: shmkv beside what users would pick instead, in one run on one machine.

    python bench/suite.py [--seconds S] [--reps N] [--keys N] [--chart PATH] [--quick]
                          [--baseline REV]

`bench/run` is the one command for a fresh machine: it installs what this needs (lmdb, redis-py
with hiredis, matplotlib, redis-server) and runs this. Workloads, with 16-byte keys and
`--keys` keys preloaded (values of 100 bytes unless said):

    W1  get of present keys, one process          W2  overwrite, one process
    W3  get with 1,000-byte values                W5  get_many of 100 keys, cost per key
    W4  N processes (1, 2, ... cores) doing 90% gets and 10% sets on one store, all together

Stores: a plain dict (the ceiling; not shared), the floor of shmkv's design (a cffi API-mode
function that copies a stored value into a buffer and returns bytes: no lock, no hashing),
shmkv, shmkv's fixed-slot core (built from git revision `--baseline`, see bench/baseline.py),
multiprocessing.Manager().dict(), lmdb on /dev/shm with one transaction per
operation, Redis on a unix socket (persistence off; redis-py with hiredis), and UltraDict when
installed. A store that is missing is skipped with a message. Each figure is the median of
`--reps` repetitions (at least 3), each at least `--seconds` long (at least 0.5 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from baseline import build_baseline
from bench_basic import measure

import shmkv

KEY_SIZE = 16
SMALL, LARGE = 100, 1000
BATCH = 100
WRITE_SHARE = 0.1  # W4: one op in ten is a set
FIXED_SLOT_REV = "688536b"  # the last commit of main whose core has fixed-size value slots
FIXED = "shmkv (fixed-slot)"  # its label


def keys_of(n: int) -> list[bytes]:
    return [b"%016d" % i for i in range(n)]


# ---------------------------------------------------------------------- stores
#
# A store is opened by a picklable spec in any process (W4's workers open their own), and
# offers get(key), set(key, value) and get_many(keys), the fastest way each library has.


class Store:
    name = ""
    shared = True  # may several processes use it at once (W4)?
    batch = True  # has a batch get (W5)?

    def get(self, key: bytes) -> Any:
        raise NotImplementedError

    def set(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def get_many(self, keys: list[bytes]) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DictStore(Store):
    name, shared = "dict", False

    def __init__(self) -> None:
        self.d: dict[bytes, bytes] = {}
        self.get = self.d.__getitem__  # type: ignore[method-assign]
        self.set = self.d.__setitem__  # type: ignore[method-assign]

    def get_many(self, keys: list[bytes]) -> Any:
        d = self.d
        return {k: d[k] for k in keys}


FLOOR_C = r"""
#include <string.h>
static char *store;
static unsigned store_n, store_size, *lens;
int floor_init(unsigned n, unsigned size)
{
    store = calloc(n, size);
    lens = calloc(n, sizeof *lens);
    store_n = n;
    store_size = size;
    return store == NULL || lens == NULL ? -1 : 0;
}
/* The key is the decimal number of its slot (keys_of() makes them so): no hashing, no lock,
 * and every key a slot of its own, as in a table. */
static unsigned slot(const char *key, unsigned klen)
{
    unsigned long long i = 0;
    unsigned k;
    for (k = 0; k < klen; k++)
        i = i * 10 + (unsigned)(key[k] - '0');
    return (unsigned)(i % store_n);
}
int floor_get(const char *key, unsigned klen, char *out, unsigned outcap)
{
    unsigned s = slot(key, klen), n = lens[s];
    if (n > outcap)
        return -1;
    memcpy(out, store + (size_t)s * store_size, n);
    return (int)n;
}
int floor_set(const char *key, unsigned klen, const char *value, unsigned vlen)
{
    unsigned s = slot(key, klen);
    if (vlen > store_size)
        return -1;
    memcpy(store + (size_t)s * store_size, value, vlen);
    lens[s] = vlen;
    return 0;
}
"""


def build_floor(workdir: str) -> Any:
    """Compiles the floor, cffi API mode like shmkv's core, and imports it."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef("int floor_init(unsigned, unsigned);"
             "int floor_get(const char *, unsigned, char *, unsigned);"
             "int floor_set(const char *, unsigned, const char *, unsigned);")
    ffi.set_source("_shmkv_floor", "#include <stdlib.h>\n" + FLOOR_C,
                   extra_compile_args=["-O2"])
    path = ffi.compile(tmpdir=workdir)
    spec = importlib.util.spec_from_file_location("_shmkv_floor", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class FloorStore(Store):
    name, shared, batch = "floor", False, False

    def __init__(self, module: Any, n: int, value_size: int) -> None:
        ffi, lib = module.ffi, module.lib
        lib.floor_init(n, value_size)
        buf = ffi.new("char[]", value_size)
        view = ffi.buffer(buf)
        fget, self._fset = lib.floor_get, lib.floor_set

        def get(key: bytes) -> bytes:
            # What Table.get does around its C call, minus the table: one call, one slice.
            n = fget(key, len(key), buf, value_size)
            return view[0:n]

        self.get = get  # type: ignore[method-assign]

    def set(self, key: bytes, value: bytes) -> None:
        self._fset(key, len(key), value, len(value))


class ShmkvStore(Store):
    name = "shmkv"

    def __init__(self, table_name: str, module: Any = shmkv) -> None:
        self.t = module.attach(table_name)
        self.get = self.t.__getitem__  # type: ignore[method-assign]
        self.set = self.t.__setitem__  # type: ignore[method-assign]
        self.get_many = self.t.get_many  # type: ignore[method-assign]

    def close(self) -> None:
        self.t.close()


class FixedSlotStore(ShmkvStore):
    """A table of the fixed-slot core, imported as shmkv_fixed by build_baseline() before (a
    W4 worker is forked, so it has the module and the sys.path entry already)."""

    name = FIXED

    def __init__(self, table_name: str) -> None:
        super().__init__(table_name, importlib.import_module("shmkv_fixed"))


class ManagerStore(Store):
    name, batch = "Manager().dict()", False

    def __init__(self, proxy: Any) -> None:
        self.d = proxy
        self.get = proxy.__getitem__  # type: ignore[method-assign]
        self.set = proxy.__setitem__  # type: ignore[method-assign]


class LmdbStore(Store):
    name = "lmdb"

    def __init__(self, path: str) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 30, sync=False, metasync=False,
                             max_readers=64, lock=True)
        begin = self.env.begin

        def get(key: bytes) -> Any:
            with begin() as txn:
                return txn.get(key)

        def set(key: bytes, value: bytes) -> None:
            with begin(write=True) as txn:
                txn.put(key, value)

        def get_many(keys: list[bytes]) -> Any:
            with begin() as txn:
                return {k: txn.get(k) for k in keys}

        self.get, self.set, self.get_many = get, set, get_many  # type: ignore[method-assign]

    def close(self) -> None:
        self.env.close()


class RedisStore(Store):
    name = "Redis (unix socket)"

    def __init__(self, socket_path: str) -> None:
        import redis

        self.r = redis.Redis(unix_socket_path=socket_path)
        self.get = self.r.get  # type: ignore[method-assign]
        self.set = self.r.set  # type: ignore[method-assign]
        self.get_many = self.r.mget  # type: ignore[method-assign]

    def close(self) -> None:
        self.r.close()


class UltraDictStore(Store):
    name, batch = "UltraDict", False

    def __init__(self, shared_name: str) -> None:
        from UltraDict import UltraDict

        self.d = UltraDict(name=shared_name, create=False, shared_lock=True)
        self.get = self.d.__getitem__  # type: ignore[method-assign]
        self.set = self.d.__setitem__  # type: ignore[method-assign]


KINDS: dict[str, type[Store]] = {"shmkv": ShmkvStore, "fixed": FixedSlotStore,
                                 "manager": ManagerStore, "lmdb": LmdbStore,
                                 "redis": RedisStore, "ultradict": UltraDictStore}


def open_store(spec: tuple[str, Any]) -> Store:
    kind, arg = spec
    return KINDS[kind](arg)  # type: ignore[call-arg]


# ---------------------------------------------------------------------- servers and setup


@contextmanager
def redis_server(workdir: str) -> Iterator[str | None]:
    """A private redis-server on a unix socket, persistence off; None if there is none."""
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        print("skipped Redis: redis-py is not installed (pip install 'redis[hiredis]')")
        yield None
        return
    if exe is None:
        print("skipped Redis: no redis-server on PATH (bench/run installs it)")
        yield None
        return
    sock = os.path.join(workdir, "redis.sock")
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm",
                             "700", "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=sock)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        client.close()
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def hiredis_note() -> str:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return " (without hiredis)"
    return ""


def load(store: Store, keys: list[bytes], value: bytes) -> None:
    if isinstance(store, RedisStore):
        pipe = store.r.pipeline(transaction=False)
        for i in range(0, len(keys), 1000):
            pipe.mset(dict.fromkeys(keys[i:i + 1000], value))
        pipe.execute()
    elif isinstance(store, LmdbStore):
        with store.env.begin(write=True) as txn:
            for key in keys:
                txn.put(key, value)
    elif isinstance(store, ShmkvStore):
        store.t.set_many(dict.fromkeys(keys, value))
    elif isinstance(store, ManagerStore):
        for i in range(0, len(keys), 10_000):
            store.d.update(dict.fromkeys(keys[i:i + 10_000], value))
    else:
        for key in keys:
            store.set(key, value)


# ---------------------------------------------------------------------- measuring


def mixed_ops(keys: list[bytes], n: int, seed: int) -> list[tuple[bool, bytes]]:
    rng = random.Random(seed)
    return [(rng.random() < WRITE_SHARE, rng.choice(keys)) for _ in range(n)]


def w4_worker(spec: tuple[str, Any], keys: list[bytes], value: bytes, seed: int,
              seconds: float, barrier: Any, conn: Any) -> None:
    store = open_store(spec)
    ops = mixed_ops(keys, 20_000, seed)
    get, set_ = store.get, store.set
    barrier.wait(120)
    chunks = [ops[i:i + 1000] for i in range(0, len(ops), 1000)]
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for chunk in chunks:
            for write, key in chunk:
                if write:
                    set_(key, value)
                else:
                    get(key)
            done += len(chunk)
            if time.perf_counter() - start >= seconds:
                break
    conn.send(done / (time.perf_counter() - start))
    store.close()


def w4(spec: tuple[str, Any], procs: int, keys: list[bytes], value: bytes, seconds: float,
       reps: int) -> float:
    """Median over reps of the aggregate ops/s of procs processes working at once."""
    ctx = multiprocessing.get_context("fork")
    totals = []
    for rep in range(reps):
        barrier = ctx.Barrier(procs)
        pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
        workers = [ctx.Process(target=w4_worker, args=(spec, keys, value, 1000 * rep + i,
                                                       seconds, barrier, pipes[i][1]))
                   for i in range(procs)]
        for w in workers:
            w.start()
        rates = []
        for reader, _ in pipes:
            if not reader.poll(seconds * 10 + 120):
                raise RuntimeError(f"a W4 worker of {spec[0]} never reported")
            rates.append(reader.recv())
        for w in workers:
            w.join(60)
        totals.append(sum(rates))
    return statistics.median(totals)


# ---------------------------------------------------------------------- the run


def shm_shortfall(n: int, baseline: bool) -> str | None:
    """Why /dev/shm cannot hold the shared stores of n keys, or None if it can. Docker gives
    containers 64 MB by default, which would fail the run half way with an unclear error."""
    try:
        import UltraDict  # noqa: F401
        copies = 5  # shmkv, lmdb's pages (up to twice the data), UltraDict's buffer (twice)
    except ImportError:
        copies = 3
    if baseline:
        copies += 1  # the fixed-slot table
    needed = n * (LARGE + 64) * copies
    stat = os.statvfs("/dev/shm")
    free = stat.f_bavail * stat.f_frsize
    if free >= needed:
        return None
    return (f"/dev/shm has {free / 2**20:,.0f} MiB free; the stores of {n:,} keys need about "
            f"{needed / 2**20:,.0f} MiB. Give it more room (in Docker: docker run "
            f"--shm-size=1g), or run fewer keys with --keys (the figures then differ from "
            f"the recorded run's).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per repetition (>= 0.5)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (>= 3)")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--chart", default="bench/throughput.png",
                        help="W4 chart to write ('' for none)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.1 s, 1 repetition, 10,000 keys (no claims)")
    parser.add_argument("--baseline", default=FIXED_SLOT_REV, metavar="REV",
                        help="git revision of the fixed-slot core to measure beside this one "
                             f"(default {FIXED_SLOT_REV}; '' for none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.reps, args.keys = 0.1, 1, 10_000
    elif args.seconds < 0.5 or args.reps < 3:
        parser.error("figures need --seconds >= 0.5 and --reps >= 3 (or --quick)")
    seconds, reps, n = args.seconds, args.reps, args.keys
    short = shm_shortfall(n, bool(args.baseline))
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    keys = keys_of(n)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    small, large = os.urandom(SMALL), os.urandom(LARGE)
    batches = [shuffled[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores})

    results: dict[tuple[str, str], float] = {}  # (workload, store) -> ops/s
    w4_rates: dict[str, dict[int, float]] = {}

    def round_robin(workload: str, ops: dict[str, tuple[Callable[[Any], object], list[Any]]],
                    per_call: int = 1) -> None:
        # Each repetition measures every store in turn, so that the machine's slow and fast
        # moments fall on all of them alike and the ratios hold still.
        samples: dict[str, list[float]] = {label: [] for label in ops}
        for _ in range(reps):
            for label, (op, args_) in ops.items():
                samples[label].append(measure(op, args_, seconds, 1, per_call))
        for label, xs in samples.items():
            results[(workload, label)] = statistics.median(xs)

    with ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="shmkv-bench-",
                                                                  dir="/dev/shm"))
        specs: list[tuple[str, Any]] = []  # (kind, argument) of each shared store
        stores: dict[str, Store] = {"dict": DictStore()}  # the in-process ones too
        try:  # built outside /dev/shm, which may be mounted noexec
            builddir = stack.enter_context(tempfile.TemporaryDirectory(prefix="shmkv-floor-"))
            stores["floor"] = FloorStore(build_floor(builddir), n, LARGE)
        except Exception as exc:  # a compiler problem is a skip, not a failure
            print(f"skipped the floor: {exc}")

        name = f"shmkv-bench-{os.getpid()}"
        table = shmkv.create(name, capacity=n, key_size=KEY_SIZE, value_size=LARGE)
        stack.callback(table.close)
        stack.callback(table.unlink)
        specs.append(("shmkv", name))
        memory = table.stats()

        if args.baseline:  # the same geometry, measured in the same round robins, W4 too
            try:  # built outside /dev/shm, like the floor
                basedir = stack.enter_context(tempfile.TemporaryDirectory(prefix="shmkv-base-"))
                fixed = build_baseline(args.baseline, basedir)
                fixed_name = f"shmkv-bench-fixed-{os.getpid()}"
                fixed_table = fixed.create(fixed_name, capacity=n, key_size=KEY_SIZE,
                                           value_size=LARGE)
            except Exception as exc:  # no git history, no compiler: a skip, not a failure
                print(f"skipped the fixed-slot baseline: {exc}")
            else:
                stack.callback(fixed_table.close)
                stack.callback(fixed_table.unlink)
                specs.append(("fixed", fixed_name))

        manager = stack.enter_context(multiprocessing.get_context("fork").Manager())
        specs.append(("manager", manager.dict()))

        try:
            import lmdb  # noqa: F401
        except ImportError:
            print("skipped lmdb: the lmdb package is not installed (pip install lmdb)")
        else:
            specs.append(("lmdb", os.path.join(workdir, "lmdb")))

        sock = stack.enter_context(redis_server(workdir))
        if sock is not None:
            specs.append(("redis", sock))

        try:
            from UltraDict import UltraDict
        except ImportError:
            print("skipped UltraDict: not installed")
        else:
            ultra = UltraDict(name=f"ud{os.getpid()}", buffer_size=n * (LARGE + 64) * 2,
                              shared_lock=True)
            stack.callback(ultra.unlink)
            specs.append(("ultradict", ultra.name))

        # One process: W3, then W1, W2 and W5, every store in each repetition.
        for spec in specs:
            stores[KINDS[spec[0]].name] = open_store(spec)
        print("measuring W1, W2, W3, W5 ...", file=sys.stderr)
        for store in stores.values():
            load(store, keys, large)
        round_robin("W3", {label: (st.get, shuffled) for label, st in stores.items()})
        for store in stores.values():
            load(store, keys, small)
        round_robin("W1", {label: (st.get, shuffled) for label, st in stores.items()})
        round_robin("W2", {label: (lambda k, st=st: st.set(k, small), shuffled)
                           for label, st in stores.items()})
        round_robin("W5", {label: (st.get_many, batches) for label, st in stores.items()
                           if st.batch}, BATCH)
        for store in stores.values():
            store.close()  # lmdb must not be open in a process that forks its workers

        # Several processes: W4, one store at a time.
        for spec in specs:
            label = KINDS[spec[0]].name
            print(f"measuring W4 on {label} ...", file=sys.stderr)
            w4_rates[label] = {p: w4(spec, p, keys, small, seconds, reps) for p in counts}
            for p, value in w4_rates[label].items():
                results[(f"W4 x{p}", label)] = value

    report(args, results, w4_rates, counts, memory)
    if args.chart and w4_rates:
        chart(args.chart, w4_rates, counts)
    return 0


# ---------------------------------------------------------------------- the report


def versions() -> str:
    found = [f"Python {platform.python_version()}", f"shmkv {shmkv.__version__}"]
    for module in ("cffi", "lmdb", "redis", "hiredis"):
        try:
            found.append(f"{module} {__import__(module).__version__}")
        except Exception:
            pass
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        found.append("redis-server " + next((w[2:] for w in out.split() if w.startswith("v=")),
                                            "?"))
    return ", ".join(found)


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args: argparse.Namespace, results: dict[tuple[str, str], float],
           w4_rates: dict[str, dict[int, float]], counts: list[int],
           memory: dict[str, Any]) -> None:
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}")
    print(f"# {versions()}{hiredis_note()}"
          + (f"; {FIXED} built from {args.baseline}" if ("W1", FIXED) in results else ""))
    print(f"# {args.keys:,} keys of {KEY_SIZE} bytes; values of {SMALL} bytes ({LARGE} in W3); "
          f"median of {args.reps} runs of >= {args.seconds} s each"
          + ("  [--quick: a smoke run, no claims]" if args.quick else ""))
    workloads = ["W1", "W2", "W3", "W5"] + [f"W4 x{p}" for p in counts]
    stores = list(dict.fromkeys(store for _, store in results))
    print(f"\n{'workload':<10} {'store':<22} {'ops/s':>12} {'ns/op':>9} {'ns/shmkv':>9}")
    for w in workloads:
        base = results.get((w, "shmkv"))
        for s in stores:
            r = results.get((w, s))
            if r is None:
                continue
            ratio = f"{base / r:>8.1f}x" if base else ""
            print(f"{w:<10} {s:<22} {r:>12,.0f} {1e9 / r:>9,.0f} {ratio:>9}")
        print()

    def ns(w: str, s: str) -> float | None:
        r = results.get((w, s))
        return 1e9 / r if r else None

    def check(label: str, value: float | None, limit: float, better: str) -> None:
        if value is None:
            print(f"  {label:<58} n/a (a store was skipped)")
            return
        ok = value <= limit if better == "<=" else value >= limit
        print(f"  {label:<58} {value:>7.2f}  target {better} {limit:<5g} "
              f"{'MET' if ok else 'NOT MET'}")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    print("Targets (ratios of this run)")
    check("W1 shmkv get ns / floor get ns", ratio(ns("W1", "shmkv"), ns("W1", "floor")),
          1.5, "<=")
    check("W1 lmdb get ns / shmkv get ns", ratio(ns("W1", "lmdb"), ns("W1", "shmkv")), 2, ">=")
    check("W1 Redis get ns / shmkv get ns",
          ratio(ns("W1", "Redis (unix socket)"), ns("W1", "shmkv")), 50, ">=")
    check("W1 Manager get ns / shmkv get ns",
          ratio(ns("W1", "Manager().dict()"), ns("W1", "shmkv")), 100, ">=")
    check("W2 shmkv set ns / floor set ns", ratio(ns("W2", "shmkv"), ns("W2", "floor")),
          2, "<=")
    check("W2 lmdb put ns / shmkv set ns", ratio(ns("W2", "lmdb"), ns("W2", "shmkv")), 4, ">=")
    if ("W1", FIXED) in results:
        check("W1 shmkv get ns / fixed-slot get ns", ratio(ns("W1", "shmkv"), ns("W1", FIXED)),
              1.10, "<=")
        check("W2 shmkv set ns / fixed-slot set ns", ratio(ns("W2", "shmkv"), ns("W2", FIXED)),
              1.10, "<=")
    shm = w4_rates.get("shmkv", {})
    check("W4 shmkv 2 processes / 1 process (aggregate ops/s)",
          ratio(shm.get(2), shm.get(1)), 1.6, ">=")
    fixed = w4_rates.get(FIXED, {})
    if fixed.get(2) and shm.get(2):
        check("W4 shmkv 2 processes / fixed-slot 2 processes (ops/s)",
              ratio(shm.get(2), fixed.get(2)), 0.9, ">=")
    check("W5 shmkv get_many ns per key / get ns", ratio(ns("W5", "shmkv"), ns("W1", "shmkv")),
          0.5, "<=")
    per_entry = (memory["segment_size"] / memory["capacity"]
                 - memory["key_size"] - memory["value_size"])
    check(f"memory: segment bytes per entry beyond key + value (value_size={LARGE})",
          per_entry, 64, "<=")
    slots = memory["index_slots"]
    formula = 1664 + slots * 8 + (memory["capacity"] + 1) * -(-(
        32 + -(-memory["key_size"] // 8) * 8 + memory["value_size"]) // 16) * 16
    print(f"  {'memory: README formula = stats()/shmkv-inspect segment_size':<58} "
          f"{formula:,} vs {memory['segment_size']:,}  "
          f"{'MET' if formula == memory['segment_size'] else 'NOT MET'}")


def chart(path: str, w4_rates: dict[str, dict[int, float]], counts: list[int]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_count in w4_rates.items():
        ax.plot(counts, [by_count[p] for p in counts], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xticks(counts)
    ax.set_xlabel("processes")
    ax.set_ylabel("aggregate ops/s (log scale)")
    ax.set_title(f"W4: 90% get / 10% set, one store shared ({time.strftime('%Y-%m-%d')})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


if __name__ == "__main__":
    sys.exit(main())
