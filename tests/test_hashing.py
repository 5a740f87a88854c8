"""Hash flooding: every table hashes with its own random SipHash key, and key patterns an
attacker or an unlucky application would produce keep probe sequences short."""

from __future__ import annotations

import pytest

import shmkv
from shmkv import _segment

SEED_OFFSET, SEED_SIZE = 96, 16  # struct shmkv_header.seed, csrc/layout.h
N = 30_000


def seed_of(name: str) -> bytes:
    raw = _segment.open_segment(name, create=False, track=False)
    try:
        return bytes(raw.buf[SEED_OFFSET:SEED_OFFSET + SEED_SIZE])
    finally:
        raw.close()


def test_every_table_has_its_own_seed(make_name) -> None:
    names = [make_name() for _ in range(3)]
    tables = [shmkv.create(n, capacity=10, key_size=8, value_size=8) for n in names]
    try:
        seeds = {seed_of(n) for n in names}
        assert len(seeds) == 3 and bytes(SEED_SIZE) not in seeds
    finally:
        for t in tables:
            t.unlink()
            t.close()


PATTERNS = {
    "sequential": lambda i: b"%d" % i,
    "fixed-width": lambda i: b"%016d" % i,
    "common-prefix": lambda i: b"session:" + b"0" * 48 + b"%08d" % i,
    "one-bit-apart": lambda i: i.to_bytes(8, "little"),
    "strides": lambda i: (i * 65536).to_bytes(8, "big"),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_adversarial_key_patterns_keep_probes_short(make_name, pattern: str) -> None:
    with shmkv.create(make_name(), capacity=N, key_size=64, value_size=1, reserve=False) as t:
        make = PATTERNS[pattern]
        for start in range(0, N, 5000):
            t.set_many({make(i): b"" for i in range(start, start + 5000)})
        assert len(t) == N
        hist = t.probe_lengths()
        assert sum(hist) == N
        mean = sum((i + 1) * n for i, n in enumerate(hist)) / N
        # Load is N / 65,536 slots = 0.46: linear probing with a good hash expects ~1.4 probes
        # on average and very few long ones (the single longest varies from seed to seed).
        assert mean < 2.0, hist
        assert sum(hist[8:]) < N // 100, hist
        # Deleting half keeps it so (backward-shift deletion leaves no tombstones).
        for start in range(0, N, 2):
            del t[make(start)]
        hist = t.probe_lengths()
        assert sum(hist) == N // 2
        assert sum((i + 1) * n for i, n in enumerate(hist)) / (N // 2) < 2.0
        t.check()
        t.unlink()
