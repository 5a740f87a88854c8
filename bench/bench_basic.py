"""First benchmark: get and set ops/s of shmkv beside a plain dict, in one process.

    python bench/bench_basic.py [--keys N] [--value-size B] [--seconds S]

16-byte keys, N keys preloaded (default 100,000), values of B bytes (default 100). Each
figure is the median of 3 repetitions of at least S seconds (default 0.5). The plain dict is
the ceiling, not a competitor: it is not shared. The full comparison (Manager, lmdb, Redis,
several processes) is the job of the later benchmark suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import shmkv


def measure(op: Callable[[Any], object], args: list[Any], seconds: float, reps: int = 3,
            per_call: int = 1) -> float:
    """Median ops/s over reps runs, each cycling over args for at least `seconds` (the clock
    is read every 1,000 calls, so that slow stores do not run far past it); a call that does
    per_call operations counts as that many."""
    chunks = [args[i:i + 1000] for i in range(0, len(args), 1000)]
    rates = []
    for _ in range(reps):
        done, elapsed = 0, 0.0
        start = time.perf_counter()
        while elapsed < seconds:
            for chunk in chunks:
                for a in chunk:
                    op(a)
                done += len(chunk)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
        rates.append(done * per_call / elapsed)
    return statistics.median(rates)


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options every one-process benchmark here takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.5)
    return parser.parse_args(argv)


def print_header(args: argparse.Namespace) -> None:
    """The date, machine and workload of a run, above its table."""
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"Python {platform.python_version()}  shmkv {shmkv.__version__}  cores {os.cpu_count()}")
    print(f"# {args.keys:,} keys of 16 bytes, values of {args.value_size} bytes, one process")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)

    keys = [b"%016d" % i for i in range(args.keys)]
    value = os.urandom(args.value_size)
    plain: dict[bytes, bytes] = dict.fromkeys(keys, value)
    name = f"shmkv-bench-{os.getpid()}"
    table = shmkv.create(name, capacity=args.keys, key_size=16, value_size=args.value_size)
    try:
        table.update(plain)
        rows = [
            ("get", "dict", measure(plain.__getitem__, keys, args.seconds)),
            ("get", "shmkv", measure(table.__getitem__, keys, args.seconds)),
            ("set", "dict", measure(lambda k: plain.__setitem__(k, value), keys, args.seconds)),
            ("set", "shmkv", measure(lambda k: table.__setitem__(k, value), keys, args.seconds)),
        ]
    finally:
        table.unlink()
        table.close()

    print_header(args)
    print(f"{'op':<5} {'store':<6} {'ops/s':>12} {'ns/op':>8} {'vs dict':>8}")
    ceiling = {op: rate for op, store, rate in rows if store == "dict"}
    for op, store, rate in rows:
        print(f"{op:<5} {store:<6} {rate:>12,.0f} {1e9 / rate:>8.0f} "
              f"{ceiling[op] / rate:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
