"""The time of a cached Django view hit (cache_page) on shmkv.contrib.django.ShmkvCache, against
LocMemCache (one process's memory: the ceiling) and django-redis on a local redis-server
over a unix socket, in one process.

    python bench/bench_django.py [--requests N] [--page-size B]

Each backend serves the same view through ``cache_page``: one request fills the cache, then N
hits (default 20,000) of a page of B bytes (default 4,096) are timed; ns per request is the
median of 5 repetitions. "no cache" is the view itself, called without caching, for scale.
Needs django and django-redis (bench/requirements.txt) and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REQUESTS = 20_000
PAGE_SIZE = 4096
REPEATS = 5
START_TIMEOUT = 30.0


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a unix socket, returned once it accepts connections."""
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no", "--dir", directory, "--logfile", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log, deadline = b"", time.monotonic() + START_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"ready to accept connections" not in log.lower():
            left = deadline - time.monotonic()
            chunk = os.read(proc.stdout.fileno(), 4096) if selector.select(left) else b""
            if not chunk or left <= 0:
                proc.kill()
                sys.exit(f"redis-server did not start:\n{log.decode(errors='replace')}")
            log += chunk
    proc.stdout.close()
    return proc, sock


def ns_per_call(call: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(n):
            call()
        times.append((time.perf_counter_ns() - start) / n)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE)
    args = parser.parse_args(argv)

    import django
    from django.conf import settings

    name = f"bench-django-{os.getpid()}"
    with tempfile.TemporaryDirectory() as directory:
        redis, sock = start_redis(directory)
        try:
            settings.configure(
                SECRET_KEY="bench",
                ALLOWED_HOSTS=["*"],
                CACHES={
                    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                    "shmkv": {"BACKEND": "shmkv.contrib.django.ShmkvCache",
                              "LOCATION": f"shm://{name}?capacity=1000&value_size=65536"
                                          "&on_full=evict"},
                    "django-redis": {"BACKEND": "django_redis.cache.RedisCache",
                                     "LOCATION": f"unix://{sock}"},
                },
            )
            django.setup()
            run(args.requests, args.page_size)
        finally:
            import shmkv

            try:
                shmkv.unlink(name)
            except FileNotFoundError:
                pass
            redis.terminate()
            redis.wait(START_TIMEOUT)
    return 0


def run(n: int, page_size: int) -> None:
    from django.core.cache import caches
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import cache_page

    page = "x" * page_size

    def view(request: Any) -> HttpResponse:
        return HttpResponse(page)

    request = RequestFactory().get("/page")
    print(f"Django {django_version()}, a cache_page hit of a {page_size:,}-byte page, "
          f"{n:,} requests, median of {REPEATS}")
    print(f"{'backend':<14}{'ns/request':>12}{'x LocMem':>10}")
    results = {"no cache": ns_per_call(lambda: view(request), n)}
    for alias, label in (("default", "LocMemCache"), ("shmkv", "ShmkvCache"),
                         ("django-redis", "django-redis")):
        cached = cache_page(60, cache=alias)(view)
        caches[alias].clear()
        cached(request)  # a miss: fills the cache
        assert cached(request).content == page.encode()
        results[label] = ns_per_call(lambda cached=cached: cached(request), n)
    locmem = results["LocMemCache"]
    for label, ns in results.items():
        print(f"{label:<14}{ns:>12,.0f}{ns / locmem:>10.2f}")


def django_version() -> str:
    import django

    return str(django.__version__)


if __name__ == "__main__":
    sys.exit(main())
