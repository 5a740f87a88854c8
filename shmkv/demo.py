"""The shmkv demo: a master and its workers sharing login sessions and a counter.

    python -m shmkv.demo [--workers N] [--ops N]

The master creates a table; each worker attaches to it by name, logs some users in (a
session per user, visible at once to every other worker), validates sessions that other
workers created, counts page views in one shared counter, and writes its own report into the
table. No message passes between the processes: everything goes through shared memory.
The master prints what each worker saw, the exact final count and each worker's ops/s, and
removes the table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
import time
from typing import Any

import shmkv

SESSION = "session:"
SESSION_TTL = 1800  # seconds: a session lives half an hour from its last use


def worker(name: str, index: int, logins: int, ops: int, barrier: Any) -> None:
    table = shmkv.attach(name)
    sessions = shmkv.SharedDict(table, codec="json")
    barrier.wait()

    # Log users in: a random, unguessable session id per login, shared by every worker, that
    # expires after SESSION_TTL seconds unless a request touches it.
    mine = []
    for i in range(logins):
        sid = secrets.token_urlsafe(16)
        sessions.set(SESSION + sid, {"user": f"user{index}.{i}", "worker": index,
                                     "pid": os.getpid()}, ttl=SESSION_TTL)
        mine.append(sid)
    barrier.wait()  # every worker has logged its users in

    # Validate the sessions other workers created, as a request routed here would.
    seen = sessions.get_many([key for key in sessions if key.startswith(SESSION)])
    by_others = sum(1 for value in seen.values() if value["worker"] != index)

    # Serve `ops` requests: look a session up, count a page view.
    keys = [key.encode() for key in seen]
    start = time.perf_counter()
    for i in range(ops // 2):
        if table.get(keys[i % len(keys)]) is None:
            raise SystemExit(f"worker {index}: a session vanished")
        table.incr(b"page_views")
    elapsed = time.perf_counter() - start
    for key in keys:  # each session was used: it lives SESSION_TTL seconds from now
        table.touch(key, SESSION_TTL)
    sessions[f"report:{index}"] = {
        "pid": os.getpid(), "logins": len(mine), "seen": len(seen), "by_others": by_others,
        "ops": 2 * (ops // 2), "ops_per_s": 2 * (ops // 2) / elapsed,
    }
    table.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmkv.demo",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--logins", type=int, default=25, help="logins per worker (default 25)")
    parser.add_argument("--ops", type=int, default=200_000,
                        help="operations per worker: half session reads, half counter "
                             "increments (default 200,000)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.logins < 1 or args.ops < 2:
        parser.error("--workers and --logins must be >= 1, --ops >= 2")

    name = f"shmkv-demo-{os.getpid()}"
    capacity = args.workers * (args.logins + 1) + 1
    table = shmkv.create(name, capacity=capacity, key_size=64, value_size=256)
    try:
        print(f"master (pid {os.getpid()}): created table {name!r}: capacity {capacity}, "
              f"{table.stats()['segment_size']:,} bytes of shared memory")
        ctx = multiprocessing.get_context()
        barrier = ctx.Barrier(args.workers)
        procs = [ctx.Process(target=worker, args=(name, w, args.logins, args.ops, barrier))
                 for w in range(args.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            print(f"error: {len(failed)} worker(s) failed (exit codes {failed})", file=sys.stderr)
            return 1
        reports = shmkv.SharedDict(table, codec="json")
        print(f"{args.workers} workers attached by name; every one saw every session:\n")
        print(f"  {'worker':>6}  {'pid':>7}  {'logins':>6}  {'sessions seen':>13}  "
              f"{'by others':>9}  {'ops':>9}  {'ops/s':>11}")
        total_rate = 0.0
        for w in range(args.workers):
            r = reports[f"report:{w}"]
            total_rate += r["ops_per_s"]
            print(f"  {w:>6}  {r['pid']:>7}  {r['logins']:>6}  {r['seen']:>13}  "
                  f"{r['by_others']:>9}  {r['ops']:>9,}  {r['ops_per_s']:>11,.0f}")
        expected = args.workers * (args.ops // 2)
        views = table.incr(b"page_views", 0)
        print(f"\n  page views counted: {views:,} (expected {expected:,}: "
              f"{'exact' if views == expected else 'WRONG'})")
        print(f"  sum of workers' rates: {total_rate:,.0f} ops/s")
        table.check()
        stats = table.stats()
        print(f"  table: {stats['len']} entries, {stats['hits']:,} hits, "
              f"{stats['misses']} misses, invariant check passed")
        left = min(table.ttl(key) or 0 for key in table if key.startswith(SESSION.encode()))
        print(f"  sessions expire {SESSION_TTL} s after their last use: the soonest in "
              f"{left:,.0f} s")
        return 0 if views == expected else 1
    finally:
        table.unlink()
        table.close()


if __name__ == "__main__":
    sys.exit(main())
