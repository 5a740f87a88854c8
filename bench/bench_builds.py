"""Two builds of shmkv, A/B: bench_basic.py's get and set under each interpreter in turn.

    python bench/bench_builds.py [--rounds N] NAME=PYTHON NAME=PYTHON [-- BENCH_BASIC ARGS]

Each PYTHON is the interpreter of a virtualenv that has one build of shmkv installed (say, the
wheel of `make wheel`, compiled by zig cc for glibc 2.17, and an editable build compiled by
the machine's gcc). Two builds of one package cannot share a process, so the rounds alternate
between them, A B A B ..., and each figure is the median of its build's rounds: this VM's
speed drifts between minutes, and alternating spreads the drift over both builds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

BASIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_basic.py")
ROW = re.compile(r"^(get|set)\s+(dict|shmkv)\s+[\d,]+\s+(\d+)", re.MULTILINE)


def one_round(python: str, extra: list[str]) -> dict[tuple[str, str], int]:
    """ns/op of each (op, store) row that bench_basic.py printed under python."""
    out = subprocess.run([python, BASIC, *extra], capture_output=True, text=True, check=True,
                         cwd="/").stdout  # not the checkout: each python imports its own build
    return {(op, store): int(ns) for op, store, ns in ROW.findall(out)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("builds", nargs=2, metavar="NAME=PYTHON")
    args = parser.parse_args(own)
    builds = [tuple(b.split("=", 1)) for b in args.builds]

    rounds: dict[str, list[dict[tuple[str, str], int]]] = {name: [] for name, _ in builds}
    for _ in range(args.rounds):
        for name, python in builds:
            rounds[name].append(one_round(python, extra))
    (a, _), (b, _) = builds
    print(f"# medians of {args.rounds} alternating rounds of bench/bench_basic.py",
          *extra)
    print(f"{'op':<4} {'store':<6} {a + ' ns':>12} {b + ' ns':>12} {b + '/' + a:>12}")
    for key in rounds[a][0]:
        ma = statistics.median(r[key] for r in rounds[a])
        mb = statistics.median(r[key] for r in rounds[b])
        print(f"{key[0]:<4} {key[1]:<6} {ma:>12,.0f} {mb:>12,.0f} {mb / ma:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
