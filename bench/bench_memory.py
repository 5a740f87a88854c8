"""Memory benchmark: what 100,000 sessions of varied sizes cost, and whether churn calcifies.

    python bench/bench_memory.py [--quick] [--seed N] [--phase W] [--writes W] [--anchors-only]

Part 1, memory. 100,000 keys of 43 bytes (b"session:" and a 35-character token, like a Flask
session id) with log-normal value sizes: median 300 bytes, 1 % above 4 KiB, at most 64 KiB.
D is the sum of their key and value bytes. Issue 13's target: they all fit in a segment of at
most 1.25 D + 64 N + the index's bytes (N = 100,000). The script reads the index's slots and
the segment header's size from a probe table, creates the table with exactly that `memory`,
stores every session, then bisects over `memory` for the smallest segment that holds them
all. Beside it, the bytes per entry that memcached, nginx's lua shared dict and Redis would
take for the same sizes, modelled from their allocators' rules (not measured).

Part 2, churn. A table of 32 MiB (8 MiB with --quick) is held at about 70 % full of its data
area while value sizes switch every --phase writes (100,000; 25,000 with --quick) between
"small" (log-normal, median 100 bytes) and "large" (median 8 KiB). Whenever the data area is
above 70 %, live keys are deleted at random until it is not; a write is a new key while it
is below 65 %, else a new key or an overwrite of a live one, half and half (always half and
half, small phases would never fill again). Room freed by small values must serve large ones
and the reverse; any TableFull there is a failure (calcification). One million writes
(100,000 with --quick); each phase's seconds are printed.

Needs the variable-size core (issue 13: create(memory=...), stats()'s data-area figures). On
the fixed-slot core it says so and exits with 2; --anchors-only needs no table at all.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import string
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import NormalDist
from typing import Any

from suite import cpu

import shmkv

N = 100_000
SESSION_PREFIX = b"session:"
TOKEN_LEN = 35  # 8 + 35 = 43-byte keys
SESSION_MEDIAN = 300
# P(size > 4096) = 1 % with median 300: ln(4096 / 300) / z(0.99) = 1.123. Part 2 uses it too.
SIGMA = math.log(4096 / SESSION_MEDIAN) / NormalDist().inv_cdf(0.99)
VALUE_CAP = 65536
KIB, MIB = 1024, 1024 * 1024

# The new core's cost of an entry (issue 13): a 32-byte header, the key rounded up to 8 bytes,
# the value, all rounded up to 16 bytes; the index has 8-byte slots, the next power of two
# above 1.5 x capacity.
ENTRY_HEADER, KEY_ALIGN, UNIT, SLOT_BYTES = 32, 8, 16, 8

# Part 2
FILL = 0.70
REFILL = 0.65  # below it, every write is a new key
RESYNC = 4096  # writes between two reads of stats()["bytes_used"]
CHURN_KEY_SIZE = 32
PHASES = (("small", 100), ("large", 8 * KIB))  # name, median value bytes

REQUIRED_STATS = ("segment_size", "data_size", "index_slots", "len", "bytes_stored",
                  "bytes_used", "bytes_free", "largest_free", "fragmentation", "compactions")


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def next_pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def entry_cost(key_len: int, value_len: int) -> int:
    """Data-area bytes one entry takes in the new core."""
    return round_up(ENTRY_HEADER + round_up(key_len, KEY_ALIGN) + value_len, UNIT)


def model_index_slots(capacity: int) -> int:
    return next_pow2(math.ceil(1.5 * capacity))


def lognormal_size(rng: random.Random, median: int, cap: int) -> int:
    return min(max(round(rng.lognormvariate(math.log(median), SIGMA)), 1), cap)


def sessions(seed: int) -> tuple[list[bytes], list[int]]:
    """N distinct 43-byte session keys and their value sizes, drawn from Random(seed)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "-_"
    keys: dict[bytes, None] = {}
    while len(keys) < N:
        keys[SESSION_PREFIX + "".join(rng.choices(alphabet, k=TOKEN_LEN)).encode()] = None
    sizes = [lognormal_size(rng, SESSION_MEDIAN, VALUE_CAP) for _ in range(N)]
    return list(keys), sizes


# ---------------------------------------------------------------------- anchors
#
# Bytes that other stores would take for the same keys and values, from their allocators'
# rules as their sources state them. Models, not measurements: they leave out what does not
# grow with the entries (server processes, buffers) and the allocators' per-page bookkeeping.

MEMCACHED_ITEM = 48 + 8  # sizeof(item) on 64-bit + the CAS field (items.h, ITEM_ntotal)
MEMCACHED_PAGE = MIB  # slab_page_size
MEMCACHED_CHUNK_MAX = MEMCACHED_PAGE // 2  # slab_chunk_size_max; larger items are chunked


def memcached_classes() -> list[int]:
    """memcached 1.6's slab class sizes with default settings (slabs.c, slabs_init): from
    sizeof(item) + chunk_size = 96, each class 1.25 times the last (truncated, then aligned
    up to 8), until one reaches slab_chunk_size_max / 1.25; the last is slab_chunk_size_max."""
    classes, size = [], 96
    while size < MEMCACHED_CHUNK_MAX / 1.25:
        size = round_up(size, 8)
        classes.append(size)
        size = int(size * 1.25)
    return [*classes, MEMCACHED_CHUNK_MAX]


def memcached_bytes(key_lens: list[int], sizes: list[int]) -> int:
    """Each item is ITEM_ntotal = header + key + 1 + value + 2 ("\\r\\n"), in the smallest
    slab class that holds it; a class takes whole 1 MiB pages. The hash table has 8-byte
    buckets, 2**16 at first, doubled when items exceed 1.5 x buckets (assoc.c)."""
    classes = memcached_classes()
    per_class: Counter[int] = Counter()
    for k, v in zip(key_lens, sizes):
        ntotal = MEMCACHED_ITEM + k + 1 + v + 2
        assert ntotal <= MEMCACHED_CHUNK_MAX, "chunked items are not modelled"
        per_class[classes[bisect_left(classes, ntotal)]] += 1
    pages = sum(math.ceil(n / (MEMCACHED_PAGE // c)) for c, n in per_class.items())
    buckets = 1 << 16
    while len(sizes) > buckets * 1.5:
        buckets *= 2
    return pages * MEMCACHED_PAGE + 8 * buckets


# offsetof(ngx_rbtree_node_t, color) = 32 (key, left, right, parent) + offsetof(
# ngx_http_lua_shdict_node_t, data) = 36 (color, value_type, key_len, value_len, expires,
# queue, user_flags): the n that ngx_http_lua_shdict_set_helper asks ngx_slab_alloc_locked for.
NGINX_NODE = 32 + 36
NGINX_PAGE = 4 * KIB


def nginx_bytes(key_lens: list[int], sizes: list[int]) -> int:
    """ngx_slab (ngx_slab.c): up to half a page, the next power of two (at least 8 bytes);
    above, whole 4 KiB pages. The red-black tree and LRU queue live in the node."""
    total = 0
    for k, v in zip(key_lens, sizes):
        n = NGINX_NODE + k + v
        total += max(8, next_pow2(n)) if n <= NGINX_PAGE // 2 else round_up(n, NGINX_PAGE)
    return total


def jemalloc(n: int) -> int:
    """jemalloc 5's size class for n bytes on x86-64 (16-byte quantum, 4 KiB pages): 8, then
    multiples of 16 up to 128, then four classes per doubling (160, 192, 224, 256, 320, ...),
    which continue through the large classes (16 KiB, 20 KiB, 24 KiB, 28 KiB, 32 KiB, ...)."""
    if n <= 8:
        return 8
    if n <= 128:
        return round_up(n, 16)
    base = 1 << ((n - 1).bit_length() - 1)  # n is in (base, 2 base]
    return round_up(n, base // 4)


def sds_header(n: int) -> int:
    """Redis 7's sds header for a string of n bytes (sds.c, sdsReqType): sdshdr5/8/16/32."""
    return 1 if n < 32 else 3 if n < 256 else 5 if n < 65536 else 9


def redis_bytes(key_lens: list[int], sizes: list[int], ttl: bool) -> int:
    """Redis 7.0 with jemalloc, one string key each (SET; SETEX with ttl): a dictEntry of 24
    bytes; the key's sds (header + key + NUL); the value as an embstr (robj of 16 bytes and
    sdshdr8 in one allocation) up to 44 bytes, else a robj and its own sds. The dict's bucket
    array is the power of two >= N, 8 bytes a bucket. A TTL adds an entry (and buckets) in
    the expires dict, which shares the key. Not modelled: slack a value >= 32 KiB may keep
    from the query buffer (up to 10 %), the second table during a rehash."""
    total = 0
    for k, v in zip(key_lens, sizes):
        total += jemalloc(24) + jemalloc(sds_header(k) + k + 1)
        if v <= 44:
            total += jemalloc(16 + 3 + v + 1)
        else:
            total += jemalloc(16) + jemalloc(sds_header(v) + v + 1)
        if ttl:
            total += jemalloc(24)
    return total + 8 * next_pow2(len(sizes)) * (2 if ttl else 1)


def print_sizes(keys: list[bytes], sizes: list[int]) -> None:
    d = sum(map(len, keys)) + sum(sizes)
    ranked = sorted(sizes)
    print(f"sessions: N {len(keys):,}, keys of {len(keys[0])} bytes, values log-normal "
          f"(median {SESSION_MEDIAN}, sigma {SIGMA:.3f}), clamped to [1, {VALUE_CAP:,}]")
    print(f"  value bytes: median {statistics.median(sizes):,.0f}  mean {d / N - len(keys[0]):,.0f}"
          f"  p99 {ranked[int(0.99 * (N - 1))]:,}  max {ranked[-1]:,}  "
          f"above 4 KiB {sum(s > 4096 for s in sizes) / N:.2%}")
    print(f"  D = key + value bytes = {d:,} ({d / N:,.1f} per entry)")


def print_anchors(keys: list[bytes], sizes: list[int]) -> None:
    key_lens = [len(k) for k in keys]
    d = sum(key_lens) + sum(sizes)
    slots = model_index_slots(N)
    rows = [
        ("key + value bytes", d),
        ("shmkv, new core (its cost formula)",
         sum(map(entry_cost, key_lens, sizes)) + SLOT_BYTES * slots),
        ("memcached 1.6 (CAS, 1 MiB pages)", memcached_bytes(key_lens, sizes)),
        ("nginx lua shared dict", nginx_bytes(key_lens, sizes)),
        ("Redis 7 + jemalloc, SET", redis_bytes(key_lens, sizes, ttl=False)),
        ("Redis 7 + jemalloc, SETEX", redis_bytes(key_lens, sizes, ttl=True)),
    ]
    print("\nAnchors: modelled from each store's allocation rules on these sizes, NOT measured")
    print(f"{'store':<34} {'bytes/entry':>11} {'x (key+value)':>14}")
    for store, total in rows:
        print(f"{store:<34} {total / N:>11,.1f} {total / d:>14.2f}")
    target = 1.25 * d + 64 * N + SLOT_BYTES * slots
    print(f"target: segment <= 1.25 D + 64 N + index = {target:,.0f} bytes "
          f"({target / N:,.1f} per entry, {target / d:.2f} x D; index {slots:,} slots of 8, "
          "segment header not counted)")


# ---------------------------------------------------------------------- tables


class NoMemoryCore(Exception):
    """This shmkv is the fixed-slot core: no memory= and no data-area statistics."""


class Table:
    """A table made for this run, with the figures of stats() checked present."""

    count = 0

    def __init__(self, capacity: int, key_size: int, value_size: int, memory: int) -> None:
        Table.count += 1
        name = f"shmkv-bench-memory-{os.getpid()}-{Table.count}"
        try:
            self.t: Any = shmkv.create(name, capacity, key_size, value_size, memory=memory,
                                       on_full="error")
        except TypeError as exc:
            if "memory" in str(exc):
                raise NoMemoryCore from exc
            raise
        missing = [k for k in REQUIRED_STATS if k not in self.t.stats()]
        if missing:
            self.close()
            raise NoMemoryCore(f"stats() lacks {', '.join(missing)}")

    def stats(self) -> dict[str, Any]:
        return self.t.stats()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.t.unlink()
        self.t.close()


@contextmanager
def table(capacity: int, key_size: int, value_size: int, memory: int) -> Iterator[Table]:
    t = Table(capacity, key_size, value_size, memory)
    try:
        yield t
    finally:
        t.close()


def kind_of(exc: Exception) -> str:
    return str(getattr(exc, "kind", "?"))


def counted(full: Counter[str]) -> str:
    """The TableFull count, by kind when there were any."""
    n = sum(full.values())
    return f"{n:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(full.items()))})" if n else "0"


def fill(t: Table, keys: list[bytes], values: list[bytes], stop_when_full: bool) -> Counter[str]:
    """Stores every session; the TableFull count by kind."""
    full: Counter[str] = Counter()
    store = t.t.__setitem__
    for k, v in zip(keys, values):
        try:
            store(k, v)
        except shmkv.TableFull as exc:
            full[kind_of(exc)] += 1
            if stop_when_full:
                break
    return full


def fits(memory: int, keys: list[bytes], values: list[bytes]) -> bool:
    try:
        with table(N, 64, VALUE_CAP, memory) as t:
            return not fill(t, keys, values, stop_when_full=True)
    except ValueError:  # too small even for the index and header
        return False


def memory_part(keys: list[bytes], sizes: list[int], seed: int) -> None:
    d = sum(map(len, keys)) + sum(sizes)
    rng = random.Random(seed + 1)
    values = [rng.randbytes(s) for s in sizes]
    with table(N, 64, VALUE_CAP, 4 * d) as probe:
        s = probe.stats()
    slots, header = s["index_slots"], s["segment_size"] - s["data_size"] - 8 * s["index_slots"]
    target = int(1.25 * d + 64 * N + 8 * slots + header)
    print(f"\nPart 1: {N:,} sessions in one table (capacity {N:,}, key_size 64, value_size "
          f"{VALUE_CAP:,})")
    print(f"probe table: index {slots:,} slots x 8 = {8 * slots:,} bytes, segment header "
          f"{header:,} bytes")
    print(f"memory = int(1.25 * D + 64 * N + 8 * index_slots + header) = int(1.25 * {d:,} + "
          f"64 * {N:,} + 8 * {slots:,} + {header:,}) = {target:,}")
    start = time.perf_counter()
    with table(N, 64, VALUE_CAP, target) as t:
        full = fill(t, keys, values, stop_when_full=False)
        seconds = time.perf_counter() - start
        s = t.stats()
        sample = random.Random(seed + 2).sample(range(N), 1000)
        wrong = sum(t.t[keys[i]] != values[i] for i in sample)
    model = sum(entry_cost(len(k), v) for k, v in zip(keys, sizes))
    n_full = sum(full.values())
    print(f"stored {s['len']:,} of {N:,} in {seconds:.2f} s; TableFull {counted(full)} "
          f"(target 0); wrong values in a sample of 1,000: {wrong}")
    print(f"  segment_size {s['segment_size']:,} = {s['segment_size'] / N:,.1f} bytes/entry, "
          f"{s['segment_size'] - d:,} beyond key + value = "
          f"{(s['segment_size'] - d) / N:,.1f} per entry (budget {(target - d) / N:,.1f})")
    print(f"  data area {s['data_size']:,}: bytes_used {s['bytes_used']:,} = "
          f"{s['bytes_used'] / N:,.1f}/entry, of which "
          f"{(s['bytes_used'] - s['bytes_stored']) / N:,.1f} header and padding "
          f"(the cost formula predicts bytes_used {model:,})")
    print(f"  bytes_stored {s['bytes_stored']:,} (D {d:,}), bytes_free {s['bytes_free']:,}, "
          f"largest_free {s['largest_free']:,}, fragmentation {s['fragmentation']:.3f}, "
          f"compactions {s['compactions']:,}")
    met = n_full == 0 and s["len"] == N and wrong == 0 and s["segment_size"] <= target
    print(f"  target: all {N:,} fit in <= 1.25 D + 64 N + index: {'MET' if met else 'NOT MET'}")

    # The smallest memory that holds them all, bisected between D + index + header (which
    # cannot hold them) and the target (or above it, if the target failed).
    lo, hi = d + 8 * slots + header, target
    tries = 0
    while not fits(hi, keys, values) and tries < 4:
        lo, hi, tries = hi, 2 * hi, tries + 1
    for _ in range(8):
        mid = (lo + hi) // 2
        if fits(mid, keys, values):
            hi = mid
        else:
            lo = mid
    print(f"smallest memory found that holds all {N:,} (bisection, {hi - lo:,} bytes apart): "
          f"{hi:,} = {hi / d:.3f} x D, {(hi - d) / N:,.1f} bytes per entry beyond key + value")


# ---------------------------------------------------------------------- churn


def churn_part(args: argparse.Namespace) -> None:
    memory = 8 * MIB if args.quick else 32 * MIB
    capacity = 50_000 if args.quick else 200_000
    writes = args.writes or (100_000 if args.quick else 1_000_000)
    phase_len = args.phase or (25_000 if args.quick else 100_000)
    rng = random.Random(args.seed + 3)
    blob = rng.randbytes(2 * VALUE_CAP)  # values are slices of it
    print(f"\nPart 2: churn in {memory // MIB} MiB (capacity {capacity:,}, key_size "
          f"{CHURN_KEY_SIZE}, value_size {VALUE_CAP:,}), held at {FILL:.0%} of the data area")
    print(f"{writes:,} writes (new keys below {REFILL:.0%}, else new key or overwrite half and "
          f"half), value sizes log-normal (sigma {SIGMA:.3f}) switching every {phase_len:,} "
          "writes between " + " and ".join(f"{name} (median {m:,} B)" for name, m in PHASES))
    with table(capacity, CHURN_KEY_SIZE, VALUE_CAP, memory) as t:
        store, delete = t.t.__setitem__, t.t.__delitem__
        s = t.stats()
        limit, refill = FILL * s["data_size"], REFILL * s["data_size"]
        keys: list[bytes] = []  # live keys, and beside them their entries' cost
        costs: list[int] = []
        pos: dict[bytes, int] = {}

        def forget(i: int) -> None:
            del pos[keys[i]]
            last_key, last_cost = keys.pop(), costs.pop()
            if i < len(keys):
                keys[i], costs[i] = last_key, last_cost
                pos[last_key] = i

        model_used = drift = next_id = deletes = 0
        full: Counter[str] = Counter()
        print(f"data area {s['data_size']:,} bytes; {FILL:.0%} = {limit:,.0f}")
        print(f"{'phase':>5} {'sizes':<6} {'writes':>9} {'deletes':>9} {'full':>5} "
              f"{'compact':>7} {'live':>7} {'used':>6} {'frag':>6} {'seconds':>8}")
        start = phase_start = time.perf_counter()
        phase_deletes, phase_full, compactions = 0, 0, s["compactions"]
        for w in range(writes):
            name, median = PHASES[(w // phase_len) % 2]
            if w % RESYNC == 0:
                drift = t.stats()["bytes_used"] - model_used
            while model_used + drift > limit and keys:
                i = rng.randrange(len(keys))
                delete(keys[i])
                model_used -= costs[i]
                forget(i)
                deletes += 1
                phase_deletes += 1
            size = lognormal_size(rng, median, VALUE_CAP)
            off = rng.randrange(len(blob) - size + 1)
            value = blob[off:off + size]
            if model_used + drift >= refill and keys and rng.random() < 0.5:
                i = rng.randrange(len(keys))
                key = keys[i]
            else:
                i, key = -1, b"churn:%d" % next_id
                next_id += 1
            cost = entry_cost(len(key), size)
            try:
                store(key, value)
            except shmkv.TableFull as exc:
                full[kind_of(exc)] += 1
                phase_full += 1
                if i >= 0:  # an overwrite that failed: what is left of the key?
                    try:
                        cost = entry_cost(len(key), len(t.t[key]))
                    except KeyError:
                        model_used -= costs[i]
                        forget(i)
                    else:
                        model_used += cost - costs[i]
                        costs[i] = cost
            else:
                if i >= 0:
                    model_used += cost - costs[i]
                    costs[i] = cost
                else:
                    pos[key] = len(keys)
                    keys.append(key)
                    costs.append(cost)
                    model_used += cost
            if (w + 1) % phase_len == 0 or w + 1 == writes:
                now = time.perf_counter()
                s = t.stats()
                print(f"{w // phase_len + 1:>5} {name:<6} {(w % phase_len) + 1:>9,} "
                      f"{phase_deletes:>9,} {phase_full:>5,} "
                      f"{s['compactions'] - compactions:>7,} {s['len']:>7,} "
                      f"{s['bytes_used'] / s['data_size']:>6.1%} {s['fragmentation']:>6.3f} "
                      f"{now - phase_start:>8.2f}")
                phase_start, phase_deletes, phase_full = now, 0, 0
                compactions = s["compactions"]
        seconds = time.perf_counter() - start
        s = t.stats()
    n_full = sum(full.values())
    print(f"writes {writes:,}, deletes {deletes:,}, TableFull {counted(full)} "
          f"(target 0: {'MET' if n_full == 0 else 'NOT MET'})")
    print(f"compactions {s['compactions']:,}, final fragmentation {s['fragmentation']:.3f}, "
          f"{writes / seconds:,.0f} writes/s ({seconds:.1f} s, deletes included)")
    print(f"cost formula vs stats()['bytes_used'] at the end: {model_used:,} vs "
          f"{s['bytes_used']:,}")


# ---------------------------------------------------------------------- main


def print_header(args: argparse.Namespace) -> None:
    """The date, machine and versions of a run, above its figures."""
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu()}, "
          f"{os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"# Python {platform.python_version()}, shmkv {shmkv.__version__}; seed {args.seed}"
          + ("; --quick" if args.quick else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="part 2 in 8 MiB with 100,000 writes, phases of 25,000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--phase", type=int, default=0,
                        help="writes per phase of part 2 (default 100,000; 25,000 with --quick)")
    parser.add_argument("--writes", type=int, default=0,
                        help="writes of part 2 (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("--anchors-only", action="store_true",
                        help="the size distribution and the modelled anchors; no table")
    args = parser.parse_args(argv)

    print_header(args)
    keys, sizes = sessions(args.seed)
    print_sizes(keys, sizes)
    print_anchors(keys, sizes)
    if args.anchors_only:
        return 0
    try:
        memory_part(keys, sizes, args.seed)
        churn_part(args)
    except NoMemoryCore as exc:
        why = f" ({exc})" if str(exc) else ""
        print(f"this shmkv has no memory= (fixed-slot core){why}: nothing to measure",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
