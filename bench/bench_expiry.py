"""What expiry and eviction cost: shmkv's operations with and without deadlines, inserts that
evict, and the walk that reclaims expired room, in one process.

    python bench/bench_expiry.py [--keys N] [--value-size B] [--seconds S]

16-byte keys, N keys preloaded (default 100,000), values of B bytes (default 100). Rates are
the median of 3 repetitions of at least S seconds (default 0.5), as in bench_basic.py; the
walk is timed once per repetition, 9 repetitions, median.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

from bench_basic import measure, parse_args, print_header

import shmkv


def table(name: str, keys: int, value_size: int, **kwargs: object) -> shmkv.Table:
    return shmkv.create(name, capacity=keys, key_size=16, value_size=value_size, **kwargs)


def time_once(setup: Callable[[], None], action: Callable[[], object], reps: int = 9) -> float:
    """Median seconds of action over reps runs, each after its own setup."""
    times = []
    for _ in range(reps):
        setup()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    n, seconds = args.keys, args.seconds

    keys = [b"%016d" % i for i in range(n)]
    fresh = [b"n%015d" % i for i in range(n)]
    value = os.urandom(args.value_size)
    base = f"shmkv-bench-{os.getpid()}"
    rows: list[tuple[str, float]] = []
    walks: list[tuple[str, float]] = []

    with table(base + "-plain", n, args.value_size) as plain, \
            table(base + "-ttl", n, args.value_size) as expiring:
        try:
            plain.set_many(dict.fromkeys(keys, value))
            expiring.set_many(dict.fromkeys(keys, value), ttl=3600)
            rows += [
                ("get, key without a deadline", measure(plain.__getitem__, keys, seconds)),
                ("get, key with a deadline", measure(expiring.__getitem__, keys, seconds)),
                ("set, no ttl", measure(lambda k: plain.set(k, value), keys, seconds)),
                ("set, ttl=3600", measure(lambda k: expiring.set(k, value, ttl=3600), keys,
                                          seconds)),
                ("touch(key, 3600)", measure(lambda k: expiring.touch(k, 3600), keys, seconds)),
                ("ttl(key)", measure(expiring.ttl, keys, seconds)),
            ]
        finally:
            plain.unlink()
            expiring.unlink()

    with table(base + "-evict", n, args.value_size, on_full="evict") as cache:
        try:
            cache.set_many(dict.fromkeys(keys, value))
            # Every insert of a new key into the full table evicts one (keys cycle through).
            rows.append(("set of a new key, evicting one",
                         measure(lambda k: cache.set(k, value), fresh + keys, seconds)))
            assert cache.stats()["evictions"] > n
            # The same, with one key in ten expiring after 1 ms (a rate-limit counter beside
            # the sessions, say): each insert finds room by walking the pool a little.
            rows.append(("the same, 1 key in 10 with ttl=0.001",
                         measure(lambda k: cache.set(k, value, ttl=0.001 if k[-1] == 48
                                                     else None), fresh + keys, seconds)))
        finally:
            cache.unlink()

    with table(base + "-walk", n, args.value_size) as full:
        try:
            full.set_many(dict.fromkeys(keys[:-1], value))

            def one_expired() -> None:
                full.pop(b"new", None)
                full.set(b"short", value, ttl=1e-6)  # the table is full again
                time.sleep(1e-4)

            # The expired key sits where the last walk passed: this insert walks a whole turn.
            walks.append((f"insert into a full table, its 1 expired key of {n:,} a turn away",
                          time_once(one_expired, lambda: full.set(b"new", value))))

            def half_expired() -> None:
                full.clear()
                full.set_many(dict.fromkeys(keys[: n // 2], value))
                full.set_many(dict.fromkeys(keys[n // 2:], value), ttl=1e-6)
                time.sleep(1e-4)

            walks.append((f"purge_expired() reclaiming {n // 2:,} of {n:,} keys",
                          time_once(half_expired, full.purge_expired)))
            walks.append((f"purge_expired() with nothing due, {n:,} keys",
                          time_once(lambda: None, full.purge_expired)))
        finally:
            full.unlink()

    print_header(args)
    print(f"{'operation':<44} {'ops/s':>12} {'ns/op':>8}")
    for what, rate in rows:
        print(f"{what:<44} {rate:>12,.0f} {1e9 / rate:>8.0f}")
    print(f"{'one call':<72} {'time':>10}")
    for what, secs in walks:
        print(f"{what:<72} {secs * 1e3:>8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
