"""Segments: what attach does with a segment that is not (or no longer) a usable table, what a
corrupted body does to every operation, the resource-tracker trap, and the life of a name
(create, attach, unlink; FileExistsError, FileNotFoundError).

Damage is done by hand, through a second untracked mapping of the segment, at the offsets of
``struct shmkv_header`` and ``struct shmkv_block`` (csrc/layout.h) that this build reports
(shmkv_testing_offset), checked against a real table by the first test. Every operation on a
damaged body runs in a child process, so that a crash shows up as a failed test with the
signal's name instead of killing the run.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]
import contextlib
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from multiprocessing import get_context, shared_memory
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import JOIN_TIMEOUT
from shmkv._core import ffi, lib

import shmkv
from shmkv import _segment

# Seconds a child process may take; a hang fails the test instead of the run.
CHILD_TIMEOUT = 60.0
# Short lock and readiness waits wherever a test expects one to run out.
SHORT_WAIT = 0.2


def offset(field: str) -> int:
    """Where this build puts a header field (or, for "block.*", a block field)."""
    at = int(lib.shmkv_testing_offset(field.encode()))
    assert at >= 0, f"the build knows no field {field!r}"
    return at


# struct shmkv_header (csrc/layout.h): field -> (offset, struct format), native byte order.
FIELDS: dict[str, tuple[int, str]] = {
    field: (offset(field), fmt)
    for field, fmt in {
        "magic": "8s", "version": "I", "header_size": "I", "signature": "Q",
        "total_size": "Q", "capacity": "Q", "memory": "Q", "nslots": "Q", "key_size": "Q",
        "value_size": "Q", "index_offset": "Q", "data_offset": "Q", "data_units": "Q",
        "flags": "I", "ready": "I", "count": "Q", "free_units": "Q", "stored_bytes": "Q",
        "intent_old": "Q", "intent_new": "Q", "move_from": "Q", "move_to": "Q",
        "move_units": "Q", "move_done": "Q", "clearing": "Q", "broken": "Q",
        "next_expiry": "Q", "clock_hand": "Q", "purge_cursor": "Q", "turn_min": "Q",
        "seq": "Q",
    }.items()
}
# struct shmkv_block: field -> (offset from the block's start, struct format).
BLOCK: dict[str, tuple[int, str]] = {
    field: (offset("block." + field), fmt)
    for field, fmt in {
        "size": "I", "prev_size": "I", "state": "I", "referenced": "I", "key_len": "I",
        "value_len": "I", "expires": "Q", "next": "I", "prev": "I",
    }.items()
}
BLOCK_HEADER = offset("block.key")  # the key follows the block's header
MAGIC = b"SHMKVTB1"
FORMAT_VERSION = 5
# The free lists: binmap (u64 words, a bit per non-empty bin), then bins (u32 heads, unit + 1
# of a bin's first free block). NBINS is layout.h's: exact bins for 0..63 units, then eight
# per power of two up to 2^31.
BINMAP = offset("binmap")
BINS = offset("bins")
EXACT_BINS = 64
NBINS = EXACT_BINS + 26 * 8
BINMAP_WORDS = (NBINS + 63) // 64
# The pthread_mutex_t, on its own 64-byte line at the end of the header.
LOCK_OFFSET = offset("lock")
UNIT = 16  # the data area's unit: block sizes, slot units and links count these
MIN_BLOCK_UNITS = 2
FREE, BUSY, USED = lib.SHMKV_BLOCK_FREE, lib.SHMKV_BLOCK_BUSY, lib.SHMKV_BLOCK_USED
REF_PINNED = 2
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

ABSENT = [b"absent-1", b"absent-2"]


def up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def value_start(key_len: int) -> int:
    """Where a block's value starts, from the block's start."""
    return BLOCK_HEADER + up(key_len, 8)


def entry_units(key_len: int, value_len: int) -> int:
    """Units a block holding this key and value needs (layout.h's entry_units)."""
    return up(value_start(key_len) + value_len, UNIT) // UNIT


def bin_of(units: int) -> int:
    """The free list of a free block of this many units (alloc.c's bin_of)."""
    if units < EXACT_BINS:
        return units
    fl = units.bit_length() - 1
    return EXACT_BINS + (fl - 6) * 8 + ((units >> (fl - 3)) & 7)


# ---------------------------------------------------------------------- segment helpers


def layout(t: shmkv.Table) -> Any:
    """The geometry (struct shmkv_geometry) the C core computes for t's parameters."""
    g = ffi.new("struct shmkv_geometry *")
    memory = t.stats(wait=False)["memory"] or 0
    assert lib.shmkv_layout(t.capacity, t.key_size, t.value_size, memory, g) == 0
    return g


def read_segment(name: str) -> bytes:
    """A copy of the whole segment, read through an untracked mapping."""
    seg = _segment.open_segment(name, create=False, track=False)
    try:
        return bytes(seg.buf)
    finally:
        seg.close()


def poke(name: str, offset: int, data: bytes) -> None:
    """Overwrites bytes of the live segment, as a stray or hostile process would."""
    seg = _segment.open_segment(name, create=False, track=False)
    try:
        seg.buf[offset : offset + len(data)] = data
    finally:
        seg.close()


def pack_field(field: str, value: int | bytes) -> bytes:
    return struct.pack("=" + FIELDS[field][1], value)


def set_field(name: str, field: str, value: int | bytes) -> None:
    poke(name, FIELDS[field][0], pack_field(field, value))


def patched(image: bytes, field: str, value: int | bytes) -> bytes:
    offset = FIELDS[field][0]
    data = pack_field(field, value)
    return image[:offset] + data + image[offset + len(data) :]


class Image:
    """A copy of a table's segment, and where its parts are."""

    def __init__(self, t: shmkv.Table) -> None:
        self.name = t.name
        self.g = layout(t)
        self.data = read_segment(t.name)
        self.data_offset = int(self.g.data_offset)
        self.data_units = int(self.g.data_size) // UNIT

    def field(self, field: str) -> Any:
        offset, fmt = FIELDS[field]
        return struct.unpack_from("=" + fmt, self.data, offset)[0]

    def slot_offset(self, i: int) -> int:
        return int(self.g.index_offset) + 8 * i

    def slots(self) -> list[int]:
        return [U64.unpack_from(self.data, self.slot_offset(i))[0] for i in range(self.g.nslots)]

    def block_offset(self, unit: int) -> int:
        return self.data_offset + UNIT * unit

    def block(self, unit: int, field: str) -> int:
        at, fmt = BLOCK[field]
        return int(struct.unpack_from("=" + fmt, self.data, self.block_offset(unit) + at)[0])

    def blocks(self) -> list[tuple[int, int, int]]:
        """(unit, size, state) of every block, walking the chain of sizes over the area."""
        found, unit, prev = [], 0, 0
        while unit < self.data_units:
            size, state = self.block(unit, "size"), self.block(unit, "state")
            assert MIN_BLOCK_UNITS <= size <= self.data_units - unit, (unit, size)
            assert self.block(unit, "prev_size") == prev and state in (FREE, USED), unit
            found.append((unit, size, state))
            prev = size
            unit += size
        return found

    def used_blocks(self) -> list[int]:
        return [unit for unit, _, state in self.blocks() if state == USED]

    def free_blocks(self) -> list[int]:
        return [unit for unit, _, state in self.blocks() if state == FREE]

    def key_of(self, unit: int) -> bytes:
        start = self.block_offset(unit) + BLOCK_HEADER
        return self.data[start : start + self.block(unit, "key_len")]

    def block_of(self, key: bytes) -> int:
        for unit in self.used_blocks():
            if self.key_of(unit) == key:
                return unit
        raise AssertionError(f"{key!r} is in no block")

    def bin_head(self, n: int) -> int:
        return int(U32.unpack_from(self.data, BINS + 4 * n)[0])

    def binmap_bit(self, n: int) -> bool:
        return bool((U64.unpack_from(self.data, BINMAP + 8 * (n // 64))[0] >> (n % 64)) & 1)

    def bin_list(self, n: int) -> list[int]:
        """The units of bin n's free list, in order (links are unit + 1)."""
        units, link = [], self.bin_head(n)
        while link and len(units) <= self.data_units:
            units.append(link - 1)
            link = self.block(link - 1, "next")
        return units

    def used_end(self) -> int:
        """The unit after the last USED block."""
        return max((unit + size for unit, size, state in self.blocks() if state == USED),
                   default=0)


def poke_block(name: str, img: Image, unit: int, field: str, value: int) -> None:
    """Overwrites a field of the block at unit."""
    at, fmt = BLOCK[field]
    poke(name, img.block_offset(unit) + at, struct.pack("=" + fmt, value))


def set_bin_head(name: str, n: int, link: int) -> None:
    poke(name, BINS + 4 * n, U32.pack(link))


@contextlib.contextmanager
def foreign_segment(name: str, data: bytes) -> Iterator[None]:
    """A segment holding exactly ``data``, made with SharedMemory as any program would make
    one (so tracked by this process), and unlinked on the way out."""
    shm = shared_memory.SharedMemory(name, create=True, size=len(data))
    try:
        shm.buf[: len(data)] = data
        yield
    finally:
        shm.close()
        shm.unlink()


def fill(t: shmkv.Table) -> dict[bytes, bytes]:
    """Stores keys of several value lengths and a counter; returns what t must now hold."""
    expected = {b"key-%02d" % i: b"value-%02d" % i * (i % 4 + 1) for i in range(20)}
    t.update(expected)
    expected[b"counter"] = (5).to_bytes(8, "little", signed=True)
    assert t.incr(b"counter", 5) == 5
    return expected


HOLES = (b"key-03", b"key-11", b"key-16")


def make_holes(t: shmkv.Table, expected: dict[bytes, bytes]) -> None:
    """Deletes HOLES: free blocks of 5, 5 and 3 units between live ones, in two free lists
    (key-11's block heads bin 5, linked to key-03's) besides the free end of the area."""
    for key in HOLES:
        del t[key]
        del expected[key]


@pytest.fixture
def filled(table: shmkv.Table) -> tuple[shmkv.Table, dict[bytes, bytes]]:
    """The conftest table with fill()'s keys in it."""
    return table, fill(table)


@contextlib.contextmanager
def new_table(name: str) -> Iterator[shmkv.Table]:
    """A table shaped like the `table` fixture's, unlinked and closed on the way out."""
    t = shmkv.create(name, capacity=64, key_size=32, value_size=64)
    try:
        yield t
    finally:
        with contextlib.suppress(FileNotFoundError):
            t.unlink()
        t.close()


# ---------------------------------------------------------------------- the child process

# Attaches to argv[1] and runs every kind of operation, each in its own try: prints a JSON
# object {operation: outcome}. An outcome is "ok", "KeyError", the class name of a shmkv.Error,
# "wrong: ..." for a value that differs from what the table held, or "UNEXPECTED ..." for any
# other exception. A crash prints nothing and leaves a negative return code.
CHILD = textwrap.dedent(
    r"""
    import json, sys
    import shmkv

    name, payload = sys.argv[1], json.loads(sys.argv[2])
    expected = {bytes.fromhex(k): bytes.fromhex(v) for k, v in payload["expected"].items()}
    absent = [bytes.fromhex(k) for k in payload["absent"]]
    ANY = object()
    log = {}

    def run(op, fn, want=ANY):
        try:
            got = fn()
        except KeyError:
            log[op] = "KeyError"
            return None
        except shmkv.Error as exc:
            log[op] = type(exc).__name__
            if isinstance(exc, shmkv.CheckFailed):
                log[op + " invariant"] = str(exc.invariant)
            return None
        except BaseException as exc:
            log[op] = "UNEXPECTED %s: %s" % (type(exc).__name__, exc)
            return None
        log[op] = "ok" if want is ANY or got == want else "wrong: %r" % (got,)
        return got

    def roundtrip(t, key, value):
        t[key] = value
        return t[key]

    def overview(t, phase):
        run(phase + "len", lambda: len(t))
        run(phase + "iter", lambda: sorted(t))
        run(phase + "items", lambda: dict(t.items()))
        run(phase + "get_many", lambda: t.get_many(list(expected) + absent))
        run(phase + "stats", t.stats)
        run(phase + "check", t.check)

    t = run("attach", lambda: shmkv.attach(name, lock_timeout=payload["lock_timeout"]))
    if t is not None:
        for key, value in expected.items():
            run("get " + key.hex(), lambda: t[key], value)
            run("in " + key.hex(), lambda: key in t, True)
        for key in absent:
            run("absent get " + key.hex(), lambda: t.get(key, b"<absent>"), b"<absent>")
            run("absent in " + key.hex(), lambda: key in t, False)
        run("len", lambda: len(t), len(expected))
        run("iter", lambda: sorted(t), sorted(expected))
        run("items", lambda: dict(t.items()), expected)
        run("get_many", lambda: t.get_many(list(expected) + absent), expected)
        run("stats", t.stats)
        run("check", t.check)
        first = sorted(expected)[:4] + [b"no-such-key"] * 4
        run("replace", lambda: roundtrip(t, first[0], b"replaced"), b"replaced")
        run("insert", lambda: roundtrip(t, b"new-1", b"n1"), b"n1")
        run("add", lambda: t.add(b"new-2", b"n2"))
        run("setdefault", lambda: t.setdefault(b"new-3", b"n3"))
        run("incr", lambda: t.incr(b"new-counter", 2, initial=40), 42)
        run("cas", lambda: t.compare_and_swap(first[1], expected.get(first[1]), b"swapped"))
        run("pop", lambda: t.pop(first[2]))
        run("del", lambda: t.__delitem__(first[3]))
        run("set_many", lambda: t.set_many({b"many-1": b"m1", first[0]: b"again"}))
        run("popitem", t.popitem)
        overview(t, "after writes: ")
        run("clear", t.clear)
        run("after clear: insert", lambda: roundtrip(t, b"fresh", b"f"), b"f")
        overview(t, "after clear: ")
        t.close()
    print(json.dumps(log))
    """
)


def run_child(
    name: str, expected: dict[bytes, bytes], lock_timeout: float = SHORT_WAIT,
    script: str = CHILD, timeout: float = CHILD_TIMEOUT,
) -> dict[str, str]:
    """Runs CHILD (or another script of its kind) on table `name`; fails on a signal, a hang
    or an unexpected exception, and returns the outcome of each operation."""
    payload = {
        "expected": {k.hex(): v.hex() for k, v in expected.items()},
        "absent": [k.hex() for k in ABSENT],
        "lock_timeout": lock_timeout,
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, name, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode < 0:
        pytest.fail(f"child killed by {signal.Signals(-proc.returncode).name}:\n{proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    log: dict[str, str] = json.loads(proc.stdout)
    unexpected = {op: outcome for op, outcome in log.items() if outcome.startswith("UNEXPECTED")}
    assert not unexpected, "operations raised what is not a shmkv.Error"
    return log


def get_op(key: bytes) -> str:
    return "get " + key.hex()


# ---------------------------------------------------------------------- the layout we poke at


def test_header_offsets_match_this_build(filled: tuple[shmkv.Table, dict[bytes, bytes]]) -> None:
    """The offsets this file pokes at are those of the build: every header field, slot,
    block and free list read back from a real table holds what the table says it holds."""
    t, expected = filled
    holes = {key: Image(t).block_of(key) for key in HOLES}
    make_holes(t, expected)
    img = Image(t)
    stats = t.stats()
    g = img.g
    assert img.field("magic") == MAGIC
    assert img.field("version") == stats["version"] == FORMAT_VERSION
    assert img.field("ready") == 1
    for field in ("header_size", "total_size", "capacity", "memory", "nslots", "key_size",
                  "value_size", "index_offset", "data_offset"):
        assert img.field(field) == getattr(g, field), field
    assert img.field("data_units") * UNIT == g.data_size == stats["data_size"]
    assert img.field("total_size") == stats["segment_size"] == len(img.data)
    assert img.field("count") == len(expected) == stats["len"]
    assert img.field("free_units") * UNIT == stats["bytes_free"]
    assert img.field("stored_bytes") == stats["bytes_stored"] == sum(
        len(k) + len(v) for k, v in expected.items())
    for field in ("intent_old", "intent_new", "move_from", "clearing", "broken",
                  "next_expiry", "purge_cursor", "clock_hand"):
        assert img.field(field) == 0, field
    assert img.field("seq") > 0 and img.field("seq") % 2 == 0  # written, and at rest
    # The free lists, seq and the mutex lie in the header, in this order, before the index.
    assert FIELDS["turn_min"][0] < BINMAP and BINMAP + 8 * BINMAP_WORDS <= BINS
    assert BINS + 4 * NBINS <= FIELDS["seq"][0] < LOCK_OFFSET
    assert LOCK_OFFSET + 40 <= g.header_size <= g.index_offset  # the mutex ends in the header
    assert g.index_offset + 8 * g.nslots <= g.data_offset

    # The blocks tile the data area (Image.blocks asserts it); the slots name the USED ones.
    blocks = img.blocks()
    assert sum(size for _, size, _ in blocks) == img.data_units
    used = [s for s in img.slots() if s]
    assert sorted((s & 0xFFFFFFFF) - 1 for s in used) == img.used_blocks()
    sizes = {unit: size for unit, size, _ in blocks}
    for key, value in expected.items():
        unit = img.block_of(key)
        assert (img.block(unit, "key_len"), img.block(unit, "value_len")) == (len(key), len(value))
        assert entry_units(len(key), len(value)) <= sizes[unit] < entry_units(
            len(key), len(value)) + MIN_BLOCK_UNITS
        start = img.block_offset(unit) + value_start(len(key))
        assert img.data[start : start + len(value)] == value
        assert img.block(unit, "expires") == 0

    # Each free block is in its size's list; the bitmap marks the non-empty lists.
    free = img.free_blocks()
    assert len(free) == stats["free_blocks"] == 4  # the three holes and the end of the area
    assert sum(sizes[u] for u in free) * UNIT == stats["bytes_free"]
    assert max(sizes[u] for u in free) * UNIT == stats["largest_free"]
    assert sorted(sizes[u] for u in free)[:3] == [3, 5, 5]
    listed = {n: img.bin_list(n) for n in range(NBINS)}
    assert sorted(u for units in listed.values() for u in units) == free
    for n, units in listed.items():
        assert img.binmap_bit(n) == bool(units), n
        assert all(bin_of(sizes[u]) == n for u in units), n
        links = [(img.block(u, "prev"), img.block(u, "next")) for u in units]
        # Doubly linked: unit + 1 of the neighbours, 0 at either end.
        ends = [-1, *units, -1]
        assert links == [(ends[i] + 1, ends[i + 2] + 1) for i in range(len(units))], n
    # A freed block goes to the head of its list: key-11's, then key-03's, in bin 5.
    assert listed[5] == [holes[b"key-11"], holes[b"key-03"]]
    assert listed[3] == [holes[b"key-16"]]


# ---------------------------------------------------------------------- 1. attaching


def real_image(t: shmkv.Table) -> bytes:
    fill(t)
    return Image(t).data


@pytest.mark.parametrize(
    ("make_data", "why"),
    [
        (lambda image: random.Random(7).randbytes(4096), "no shmkv magic"),
        (lambda image: b"NOTSHMKV" + bytes(len(image) - 8), "no shmkv magic"),
        (lambda image: b"This is a text file, not a table.\n" * 100, "no shmkv magic"),
        (lambda image: b"SHMKVTB2" + image[8:], "no shmkv magic"),
        (lambda image: MAGIC.lower() + image[8:], "no shmkv magic"),
        (lambda image: bytes(100), "no shmkv magic"),
        (lambda image: b"abc", "too small"),
    ],
    ids=["random", "zeros-wrong-magic", "text", "other-magic", "lowercase-magic",
         "small-zeros", "three-bytes"],
)
def test_attach_rejects_foreign_segment(
    table: shmkv.Table, make_name: Callable[[], str], make_data: Callable[[bytes], bytes],
    why: str,
) -> None:
    """A segment that is not a shmkv table raises IncompatibleTable saying why, at once."""
    name = make_name()
    with foreign_segment(name, make_data(real_image(table))):
        with pytest.raises(shmkv.IncompatibleTable, match=why):
            shmkv.attach(name, lock_timeout=JOIN_TIMEOUT)
        assert read_segment(name)  # attach left the segment alone


@pytest.mark.parametrize(
    ("size", "why"),
    [
        (lambda g: 4, "too small"),
        (lambda g: 8, r"truncated: segment is 8 bytes, a table header needs \d+"),
        (lambda g: g.header_size - 1, "truncated: .* a table header needs"),
        (lambda g: g.header_size, r"truncated: .* the table needs \d+"),
        (lambda g: g.data_offset, "truncated: .* the table needs"),
        (lambda g: g.data_offset + g.data_size // 2, "truncated: .* the table needs"),
        (lambda g: g.total_size - 1, "truncated: .* the table needs"),
    ],
    ids=["4-bytes", "magic-only", "header-minus-1", "header-only", "index-only",
         "half-data-area", "minus-1"],
)
def test_attach_rejects_truncated_table(
    table: shmkv.Table, make_name: Callable[[], str], size: Callable[[Any], int], why: str
) -> None:
    """The first bytes of a real table in a smaller segment raise IncompatibleTable."""
    image = real_image(table)
    name = make_name()
    with foreign_segment(name, image[: size(layout(table))]), pytest.raises(
        shmkv.IncompatibleTable, match=why
    ):
        shmkv.attach(name, lock_timeout=JOIN_TIMEOUT)


INCONSISTENT = "inconsistent header"
BAD_HEADERS = [
    # (id, field, change of its value, what the message must say)
    ("version+1", "version", lambda v: v + 1,
     f"format version {FORMAT_VERSION + 1}, this build reads version {FORMAT_VERSION}"),
    ("version-0", "version", lambda v: 0, "format version 0"),
    ("version-4", "version", lambda v: 4, "format version 4, this build reads"),
    ("version-flipped", "version", lambda v: v ^ 0xFFFFFFFF, "format version"),
    ("header-size", "header_size", lambda v: v + 64, "another build"),
    ("signature", "signature", lambda v: v ^ 1, "layout signature differs"),
    ("capacity+1", "capacity", lambda v: v + 1, INCONSISTENT),
    ("capacity-0", "capacity", lambda v: 0, INCONSISTENT),
    ("capacity-2**63", "capacity", lambda v: 2**63, INCONSISTENT),
    ("nslots*2", "nslots", lambda v: v * 2, INCONSISTENT),
    ("nslots-1", "nslots", lambda v: v - 1, INCONSISTENT),
    ("key-size-0", "key_size", lambda v: 0, INCONSISTENT),
    ("key-size+1", "key_size", lambda v: v + 1, INCONSISTENT),
    ("value-size-2**62", "value_size", lambda v: 2**62, INCONSISTENT),
    ("value-size+16", "value_size", lambda v: v + 16, INCONSISTENT),
    ("memory-1", "memory", lambda v: 1, INCONSISTENT),  # below any table's minimum
    ("memory-1MiB", "memory", lambda v: 2**20, INCONSISTENT),  # another data area
    ("memory-max", "memory", lambda v: 2**64 - 1, INCONSISTENT),
    ("data-units+1", "data_units", lambda v: v + 1, INCONSISTENT),
    ("data-units-1", "data_units", lambda v: v - 1, INCONSISTENT),
    ("data-units-0", "data_units", lambda v: 0, INCONSISTENT),
    ("data-units-max", "data_units", lambda v: 2**64 - 1, INCONSISTENT),
    ("data-units+2**60", "data_units", lambda v: v + 2**60, INCONSISTENT),
    ("total-size+1", "total_size", lambda v: v + 1, INCONSISTENT),
    ("total-size-1", "total_size", lambda v: v - 1, INCONSISTENT),
    ("total-size-max", "total_size", lambda v: 2**64 - 1, INCONSISTENT),
    ("index-offset+64", "index_offset", lambda v: v + 64, INCONSISTENT),
    ("index-offset-0", "index_offset", lambda v: 0, INCONSISTENT),
    ("data-offset+64", "data_offset", lambda v: v + 64, INCONSISTENT),
    ("data-offset-64", "data_offset", lambda v: v - 64, INCONSISTENT),
    ("data-offset-0", "data_offset", lambda v: 0, INCONSISTENT),
    ("ready-2", "ready", lambda v: 2, "ready flag is 2"),
    ("flags-2", "flags", lambda v: 2, "made by a newer build"),
]


@pytest.mark.parametrize(
    ("field", "change", "why"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_HEADERS],
)
def test_attach_rejects_bad_header(
    table: shmkv.Table, field: str, change: Callable[[int], int], why: str
) -> None:
    """A table whose header names another format version or build, or whose geometry does not
    follow from its capacity, sizes and memory, raises IncompatibleTable saying which."""
    fill(table)
    old = Image(table).field(field)
    table.close()
    set_field(table.name, field, change(old))
    with pytest.raises(shmkv.IncompatibleTable, match=why):
        shmkv.attach(table.name, lock_timeout=JOIN_TIMEOUT)
    set_field(table.name, field, old)
    with shmkv.attach(table.name) as again:  # the very same bytes, repaired, attach fine
        assert len(again) == 21
        again.check()


def zero_length_segment(name: str) -> contextlib.AbstractContextManager[None]:
    """A segment whose creator died between shm_open and ftruncate (make_name removes it)."""
    os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600))
    return contextlib.nullcontext()


@pytest.mark.parametrize(
    "segment",
    [
        lambda name, image: foreign_segment(name, bytes(len(image))),
        lambda name, image: foreign_segment(name, bytes(4096)),
        lambda name, image: foreign_segment(name, patched(image, "ready", 0)),
        lambda name, image: zero_length_segment(name),
    ],
    ids=["zeros", "zeros-one-page", "header-not-ready", "zero-length"],
)
def test_attach_to_unfinished_table_times_out(
    table: shmkv.Table, make_name: Callable[[], str], segment: Callable[..., Any]
) -> None:
    """A segment its creator never finished (all zeros, empty, or a header whose ready flag
    is not set) and whose flock nobody holds is IncompatibleTable: no creator is at work."""
    name = make_name()
    with segment(name, real_image(table)), pytest.raises(
        shmkv.IncompatibleTable, match="never finished"
    ):
        shmkv.attach(name, lock_timeout=SHORT_WAIT)


# ---------------------------------------------------------------------- 2. corrupted bodies

# Each scenario damages a filled table (through poke) and returns the outcomes the child must
# see for some operations. Reads of intact keys must still give the right answers. The
# expected outcomes follow from where the C core reads what was damaged: lookups go through
# the index (index.c: index_entry checks the block a slot names), iteration walks the blocks
# (table.c: shmkv_snapshot), allocations take free blocks from the lists (alloc.c), and the
# purge walks the blocks from its cursor (expiry.c).

Scenario = Callable[[shmkv.Table, dict[bytes, bytes]], dict[str, str]]


def all_gets(expected: dict[bytes, bytes], outcome: str) -> dict[str, str]:
    return {get_op(key): outcome for key in expected}


def huge_key_lengths(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """key_len = 0xFFFFFFFF in every live block: every lookup that reaches one is corrupt."""
    img = Image(t)
    for unit in img.used_blocks():
        poke_block(t.name, img, unit, "key_len", 0xFFFFFFFF)
    return {
        **all_gets(expected, "CorruptTable"),
        "iter": "CorruptTable",
        "get_many": "CorruptTable",
        "replace": "CorruptTable",
        "check": "CheckFailed",
    }


def huge_value_length(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """value_len = 0xFFFFFFFF in one block: only that key (and whole-table reads) fail."""
    img = Image(t)
    poke_block(t.name, img, img.block_of(b"key-07"), "value_len", 0xFFFFFFFF)
    return {get_op(b"key-07"): "CorruptTable", get_op(b"key-08"): "ok",
            "items": "CorruptTable", "iter": "CorruptTable", "check": "CheckFailed"}


def slot_units(unit1: Callable[[Image, int], int]) -> Scenario:
    """Every used slot keeps its tag, but its low word (unit + 1 of its block) becomes
    unit1(image, unit of its block): lookups fail, while iteration, which walks the blocks,
    still works."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        for i, s in enumerate(img.slots()):
            if s:
                low = unit1(img, (s & 0xFFFFFFFF) - 1)
                poke(t.name, img.slot_offset(i), U64.pack((s & ~0xFFFFFFFF) | low))
        return {**all_gets(expected, "CorruptTable"),
                "iter": "ok", "items": "ok", "len": "ok", "check": "CheckFailed"}

    return scenario


def every_slot_used(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """Random non-zero words in every empty slot: probes for absent keys never end."""
    img = Image(t)
    rng = random.Random(3)
    for i, s in enumerate(img.slots()):
        if not s:
            poke(t.name, img.slot_offset(i), U64.pack(rng.randrange(1, 2**64)))
    return {**all_gets(expected, "ok"),
            **{"absent get " + key.hex(): "CorruptTable" for key in ABSENT},
            "insert": "CorruptTable", "check": "CheckFailed"}


def header_word(field: str, value: int, **outcomes: str) -> Scenario:
    """A state word of the header set to value: the check fails; `outcomes` says what the
    other operations named there do."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        set_field(t.name, field, value)
        return {"check": "CheckFailed", **outcomes}

    return scenario


def header_words(words: dict[str, Callable[[Image], int]], **outcomes: str) -> Scenario:
    """Several state words of the header set at once (each value computed from the image)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        for field, value in words.items():
            set_field(t.name, field, value(img))
        return {"check": "CheckFailed", **outcomes}

    return scenario


def with_holes(damage: Scenario) -> Scenario:
    """The scenario, on a table with free blocks between live ones (make_holes)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        make_holes(t, expected)
        return damage(t, expected)

    return scenario


# Every allocation finds its free block through the damaged lists.
ALLOCATIONS_CORRUPT = {"replace": "CorruptTable", "insert": "CorruptTable",
                       "incr": "CorruptTable", "check": "CheckFailed"}


def bin_heads(link: Callable[[Image], int]) -> Scenario:
    """The head of every non-empty free list set to link(image): a unit + 1 that is not a
    free block's. Lookups and iteration do not use the lists; allocations do."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        for n in range(NBINS):
            if img.bin_head(n):
                set_bin_head(t.name, n, link(img))
        return {**all_gets(expected, "ok"), "iter": "ok", "len": "ok",
                **ALLOCATIONS_CORRUPT}

    return scenario


def free_list_loop(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """Bin 5's list (key-11's free block, then key-03's) loops back: the last links to the
    first."""
    img = Image(t)
    first, last = img.bin_list(5)
    poke_block(t.name, img, last, "next", first + 1)
    return {**all_gets(expected, "ok"), "iter": "ok", "stats": "ok", "check": "CheckFailed"}


def free_list_self_loop(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """The first free block of bin 5 links to itself."""
    img = Image(t)
    first = img.bin_list(5)[0]
    poke_block(t.name, img, first, "next", first + 1)
    return {**all_gets(expected, "ok"), "iter": "ok", "stats": "ok", "check": "CheckFailed"}


def binmap(bits: Callable[[Image], list[int]], **outcomes: str) -> Scenario:
    """The bitmap of non-empty lists replaced by bits(image), u64 words."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        poke(t.name, BINMAP, b"".join(U64.pack(w) for w in bits(img)))
        return {**all_gets(expected, "ok"), "iter": "ok", "check": "CheckFailed", **outcomes}

    return scenario


def without_end_bit(img: Image) -> list[int]:
    """The bitmap without the bit of the free end of the area's list."""
    words = [U64.unpack_from(img.data, BINMAP + 8 * w)[0] for w in range(BINMAP_WORDS)]
    end = img.free_blocks()[-1]
    n = bin_of(img.block(end, "size"))
    words[n // 64] &= ~(1 << (n % 64))
    return words


def block_word(key: bytes, field: str, value: Callable[[Image, int], int],
               **outcomes: str) -> Scenario:
    """A field of key's block set to value(image, unit of the block)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        unit = img.block_of(key)
        poke_block(t.name, img, unit, field, value(img, unit))
        return {"check": "CheckFailed", **outcomes}

    return scenario


def end_block_word(field: str, value: Callable[[Image, int], int], **outcomes: str) -> Scenario:
    """A field of the free block at the end of the data area set to value(image, its unit)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        unit = img.free_blocks()[-1]
        poke_block(t.name, img, unit, field, value(img, unit))
        return {"check": "CheckFailed", **outcomes}

    return scenario


# key-07's block (4 units) no longer has a size that holds its entry or stays in the area:
# its lookup is corrupt, the walk of the blocks stops there, the rest works.
BAD_SIZE = {get_op(b"key-07"): "CorruptTable", get_op(b"key-08"): "ok", "len": "ok",
            "iter": "CorruptTable", "items": "CorruptTable", "popitem": "CorruptTable",
            "insert": "ok", "replace": "ok"}
# The free end of the area has a size that cannot be: allocations, which take it from its
# list, and the walk of the blocks, which ends there, are corrupt; lookups work.
BAD_END_SIZE = {get_op(b"key-08"): "ok", "len": "ok",
                "iter": "CorruptTable", "items": "CorruptTable", "insert": "CorruptTable",
                "replace": "CorruptTable"}


def died_holding_lock(name: str) -> None:
    """A process attaches, takes the table's lock and dies holding it: the next process to
    lock it meets the dead owner and rebuilds the table from its blocks (recover.c)."""
    script = "import os, sys, shmkv\nt = shmkv.attach(sys.argv[1])\n" \
             "t._hold_lock_for_testing()\nos._exit(0)\n"
    proc = subprocess.run([sys.executable, "-c", script, name], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr


def then_owner_dies(damage: Scenario, **outcomes: str) -> Scenario:
    """The damage, then a lock holder dies: recovery acts on the damage (the outcomes are the
    rebuilt table's)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        damage(t, expected)
        died_holding_lock(t.name)
        return dict(outcomes)

    return scenario


# A recovery that cannot make the table sound marks it broken: every operation but stats and
# check raises TableBroken from then on.
BROKEN = {"attach": "ok", get_op(b"key-08"): "TableBroken", "len": "TableBroken",
          "iter": "TableBroken", "insert": "TableBroken", "stats": "ok",
          "check": "CheckFailed"}
# A recovery that drops a garbage record and rebuilds: a sound table again.
REBUILT = {get_op(b"key-07"): "ok", "len": "ok", "iter": "ok", "insert": "ok", "check": "ok"}

CAPACITY = 64  # of the `table` fixture
SCENARIOS: dict[str, Scenario] = {
    # Block headers of live entries.
    "key-len-ffffffff": huge_key_lengths,
    "value-len-ffffffff": huge_value_length,
    "block-size-0": block_word(b"key-07", "size", lambda img, u: 0, **BAD_SIZE),
    "block-size-1": block_word(b"key-07", "size", lambda img, u: 1, **BAD_SIZE),
    "block-size-ffffffff": block_word(b"key-07", "size", lambda img, u: 0xFFFFFFFF, **BAD_SIZE),
    "block-size-past-end": block_word(b"key-07", "size",
                                      lambda img, u: img.data_units - u + 1, **BAD_SIZE),
    "block-size-short": block_word(b"key-07", "size",
                                   lambda img, u: img.block(u, "size") - 1, **BAD_SIZE),
    # One unit too long: the entry still fits (its lookup works), the next block's start is
    # missed and the walk lands inside it.
    "block-size-overlaps-next": block_word(
        b"key-07", "size", lambda img, u: img.block(u, "size") + 1,
        **{get_op(b"key-07"): "ok", get_op(b"key-08"): "ok", "iter": "CorruptTable",
           "items": "CorruptTable", "len": "ok"}),
    "block-state-garbage": block_word(
        b"key-07", "state", lambda img, u: 0xDEADBEEF,
        **{get_op(b"key-07"): "CorruptTable", get_op(b"key-08"): "ok",
           "iter": "CorruptTable", "len": "ok", "insert": "ok"}),
    "block-state-zero": block_word(
        b"key-07", "state", lambda img, u: 0,
        **{get_op(b"key-07"): "CorruptTable", "iter": "CorruptTable"}),
    # key-02's block is deleted ("del") just after key-01's ("pop"): its merge with the
    # block before must not trust a prev_size that names no block.
    "prev-size-ffffffff": block_word(b"key-02", "prev_size", lambda img, u: 0xFFFFFFFF,
                                     **{"pop": "ok", "del": "ok", "iter": "ok"}),
    "prev-size-into-block": block_word(b"key-02", "prev_size", lambda img, u: 2,
                                       **{"pop": "ok", "del": "ok", "iter": "ok"}),
    "pin-left-behind": block_word(b"key-07", "referenced", lambda img, u: REF_PINNED,
                                  **{get_op(b"key-07"): "ok", "iter": "ok", "len": "ok",
                                     "insert": "ok"}),
    # Slots naming what is not a live block.
    "slot-unit-past-data-area": slot_units(lambda img, u: img.data_units + 7),
    "slot-unit-ffffffff": slot_units(lambda img, u: 0xFFFFFFFF),
    "slot-unit-zero": slot_units(lambda img, u: 0),
    "slot-unit-last": slot_units(lambda img, u: img.data_units),
    "slot-unit-mid-block": slot_units(lambda img, u: u + 2),
    "slot-unit-free-block": slot_units(lambda img, u: img.free_blocks()[-1] + 1),
    "every-slot-used": every_slot_used,
    # The free lists (free_head in format 4).
    "bin-head-ffffffff": bin_heads(lambda img: 0xFFFFFFFF),
    "bin-head-past-data-area": bin_heads(lambda img: img.data_units + 1),
    "bin-head-used-block": bin_heads(lambda img: img.block_of(b"key-05") + 1),
    "bin-head-mid-block": bin_heads(lambda img: img.free_blocks()[-1] + 2),
    "bin-heads-ffffffff-holes": with_holes(bin_heads(lambda img: 0xFFFFFFFF)),
    "bin-heads-used-block-holes": with_holes(bin_heads(lambda img: img.block_of(b"key-05") + 1)),
    "free-list-loop": with_holes(free_list_loop),
    "free-list-self-loop": with_holes(free_list_self_loop),
    "free-next-ffffffff": end_block_word("next", lambda img, u: 0xFFFFFFFF,
                                         **ALLOCATIONS_CORRUPT),
    "free-prev-used-block": end_block_word("prev", lambda img, u: img.block_of(b"key-05") + 1,
                                           **ALLOCATIONS_CORRUPT),
    # A missing bit hides the list of the free end: compaction finds the block by walking,
    # pushes it back and sets the bit again.
    "binmap-bit-missing": binmap(without_end_bit, insert="ok", replace="ok"),
    "binmap-all-bits": binmap(lambda img: [2**64 - 1] * BINMAP_WORDS, **ALLOCATIONS_CORRUPT),
    # Free block sizes and the counts derived from the blocks (high_water in format 4).
    "free-size-0": end_block_word("size", lambda img, u: 0, **BAD_END_SIZE),
    "free-size-ffffffff": end_block_word("size", lambda img, u: 0xFFFFFFFF, **BAD_END_SIZE),
    "free-size-past-end": end_block_word("size", lambda img, u: img.data_units - u + 1,
                                         **BAD_END_SIZE),
    "free-state-garbage": end_block_word("state", lambda img, u: 0x12345678, **BAD_END_SIZE),
    "free-units-0": header_word("free_units", 0, insert="TableFull", replace="TableFull"),
    "free-units-2**64-1": header_word("free_units", 2**64 - 1, insert="ok", stats="ok"),
    "stored-bytes-2**64-1": header_word("stored_bytes", 2**64 - 1, insert="ok", stats="ok"),
    # count.
    "count-over-capacity": header_word("count", CAPACITY + 1, len="CorruptTable",
                                       insert="TableFull"),
    "count-2**32": header_word("count", 2**32, len="CorruptTable"),
    "count-2**63": header_word("count", 2**63, len="CorruptTable"),
    "count-2**64-1": header_word("count", 2**64 - 1, len="CorruptTable"),
    "count-2**64-13": header_word("count", 2**64 - 13, len="CorruptTable"),
    # Records only recovery acts on: at rest they fail the check (invariant 9), nothing else.
    "intent-old-garbage": header_word("intent_old", 2**64 - 1, len="ok", iter="ok"),
    "intent-new-garbage": header_word("intent_new", 0xDEADBEEF, len="ok", iter="ok"),
    "move-from-garbage": header_word("move_from", 2**64 - 1, len="ok", iter="ok"),
    "move-record-garbage": header_words(
        {"move_from": lambda img: img.block_of(b"key-05") + 1,
         "move_to": lambda img: img.block_of(b"key-09") + 1,
         "move_units": lambda img: 2**40, "move_done": lambda img: 2**64 - 1},
        len="ok", iter="ok", **{get_op(b"key-05"): "ok"}),
    "clearing-set": header_word("clearing", 1, len="ok", iter="ok"),
    # Hints that must name block starts.
    "clock-hand-mid-block": header_words({"clock_hand": lambda img: 1}, len="ok", iter="ok",
                                         insert="ok"),
    # A purge is due (next_expiry 1) and the cursor names no block start: len() purges a
    # whole turn, from unit 0, and so forgets the cursor (test_walks_from_damaged_hints
    # has a purge resume from it).
    "purge-cursor-mid-block": header_words(
        {"purge_cursor": lambda img: img.block_of(b"key-05") + 1, "next_expiry": lambda img: 1},
        len="ok", iter="ok", check="ok"),
    "purge-cursor-past-end": header_words(
        {"purge_cursor": lambda img: 2**64 - 1, "next_expiry": lambda img: 1},
        len="ok", iter="ok", check="ok"),
    # The same damage met by a recovery (a lock holder died).
    "intent-garbage-then-owner-dies": then_owner_dies(
        header_words({"intent_old": lambda img: 2**64 - 1,
                      "intent_new": lambda img: img.block_of(b"key-07") + 1}), **REBUILT),
    "move-record-garbage-then-owner-dies": then_owner_dies(
        header_words({"move_from": lambda img: img.block_of(b"key-05") + 1,
                      "move_to": lambda img: img.block_of(b"key-09") + 1,
                      "move_units": lambda img: 2**40, "move_done": lambda img: 2**64 - 1}),
        **REBUILT),
    "move-from-garbage-then-owner-dies": then_owner_dies(
        header_word("move_from", 2**64 - 1), **REBUILT),
    "bin-heads-then-owner-dies": then_owner_dies(
        with_holes(bin_heads(lambda img: 0xFFFFFFFF)), **REBUILT),
    "block-size-0-then-owner-dies": then_owner_dies(
        block_word(b"key-07", "size", lambda img, u: 0), **BROKEN),
    "slot-units-then-owner-dies": then_owner_dies(
        slot_units(lambda img, u: 0xFFFFFFFF), **REBUILT),
}


# The invariant (check.c's numbers) that the check of each damaged table names: the first it
# finds broken. The blocks (8) and the free lists (12) are checked before the slots.
FIRST_INVARIANT = {
    **dict.fromkeys(["count-over-capacity", "count-2**32", "count-2**63", "count-2**64-1",
                     "count-2**64-13"], 2),
    **dict.fromkeys([name for name in SCENARIOS if name.startswith("slot-unit-")]
                    + ["every-slot-used"], 3),
    **dict.fromkeys(["key-len-ffffffff", "value-len-ffffffff", "block-size-0", "block-size-1",
                     "block-size-ffffffff", "block-size-past-end", "block-size-short",
                     "block-size-overlaps-next", "block-state-garbage", "block-state-zero",
                     "prev-size-ffffffff", "prev-size-into-block", "free-size-0",
                     "free-size-ffffffff", "free-size-past-end", "free-state-garbage",
                     "clock-hand-mid-block", "block-size-0-then-owner-dies"], 8),
    **dict.fromkeys(["pin-left-behind", "intent-old-garbage", "intent-new-garbage",
                     "move-from-garbage", "move-record-garbage", "clearing-set"], 9),
    **dict.fromkeys([name for name in SCENARIOS if name.startswith(("bin", "free-list"))]
                    + ["free-next-ffffffff", "free-prev-used-block", "free-units-0",
                       "free-units-2**64-1", "stored-bytes-2**64-1"], 12),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_corrupted_body_raises_errors_not_crashes(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], scenario: str
) -> None:
    """A damaged index, block, free list or state word makes every operation give the right
    answer or a shmkv.Error (CorruptTable, CheckFailed, ...): never a crash, a hang, another
    exception or a wrong value; and the damage is detected where it must be."""
    t, expected = filled
    want = SCENARIOS[scenario](t, expected)
    if want.get("check") == "CheckFailed":
        want["check invariant"] = str(FIRST_INVARIANT[scenario])
    log = run_child(t.name, expected)
    wrong = {op: outcome for op, outcome in log.items() if outcome.startswith("wrong")}
    assert not wrong
    lost = [op for op in log if op.startswith(("get ", "in ")) and log[op] == "KeyError"]
    assert not lost, "an intact key went missing"
    assert {op: log.get(op) for op in want} == want


# popitem() alone, for a table whose index and blocks disagree.
POPITEM_CHILD = textwrap.dedent(
    r"""
    import json, sys
    import shmkv

    t = shmkv.attach(sys.argv[1], lock_timeout=json.loads(sys.argv[2])["lock_timeout"])
    try:
        t.popitem()
        outcome = "ok"
    except KeyError:
        outcome = "KeyError"
    except shmkv.Error as exc:
        outcome = type(exc).__name__
    print(json.dumps({"popitem": outcome}))
    """
)


def test_popitem_ends_when_the_index_lost_its_keys(
    filled: tuple[shmkv.Table, dict[bytes, bytes]],
) -> None:
    """Every slot emptied: the blocks still hold the entries, which iteration lists, but no
    lookup finds them. popitem() must end (KeyError or a shmkv.Error), not loop for ever.
    (A flipped byte of the hash seed does the same: every key hashes elsewhere.)"""
    t, _ = filled
    img = Image(t)
    poke(t.name, img.slot_offset(0), bytes(8 * int(img.g.nslots)))
    log = run_child(t.name, {}, script=POPITEM_CHILD, timeout=10)
    assert log["popitem"] in ("KeyError", "CorruptTable")


# The walks that start from a hint or go through the blocks when room runs out, where CHILD
# does not get them to: a partial purge resumes at purge_cursor (CHILD's len() purges whole
# turns, from unit 0), eviction starts at clock_hand, and compaction slides the live blocks
# after the first free one. Prints {operation: outcome} as CHILD does.
WALK_CHILD = textwrap.dedent(
    r"""
    import json, sys
    import shmkv

    name, payload = sys.argv[1], json.loads(sys.argv[2])
    log = {}

    def run(op, fn):
        try:
            fn()
            log[op] = "ok"
        except KeyError:
            log[op] = "KeyError"
        except shmkv.Error as exc:
            log[op] = type(exc).__name__
            if isinstance(exc, shmkv.CheckFailed):
                log[op + " invariant"] = str(exc.invariant)
        except BaseException as exc:
            log[op] = "UNEXPECTED %s: %s" % (type(exc).__name__, exc)

    t = shmkv.attach(name, lock_timeout=payload["lock_timeout"])
    run("insert", lambda: t.__setitem__(b"new-1", b"n" * t.value_size))
    run("check", t.check)
    run("purge_expired", t.purge_expired)
    run("insert again", lambda: t.__setitem__(b"new-1", b"n" * t.value_size))
    t.close()
    print(json.dumps(log))
    """
)


def full_of_keys(t: shmkv.Table) -> dict[bytes, bytes]:
    """fill() into a table of capacity 21: no room for another key."""
    expected = fill(t)
    assert len(t) == t.capacity
    return expected


def scattered_room(t: shmkv.Table) -> dict[bytes, bytes]:
    """fill(), fillers until no free block holds an entry of the largest size, then HOLES:
    the room for one is there, but only compaction can gather it."""
    expected = fill(t)
    largest = entry_units(len(b"new-1"), t.value_size) * UNIT
    for i in range(t.capacity):
        if t.stats()["largest_free"] < largest:
            break
        expected[b"filler-%02d" % i] = b"f" * 8
        t[b"filler-%02d" % i] = b"f" * 8
    make_holes(t, expected)
    stats = t.stats()
    assert stats["largest_free"] < largest <= stats["bytes_free"]
    return expected


def hint(field: str, value: Callable[[Image], int]) -> Callable[[shmkv.Table], None]:
    def damage(t: shmkv.Table) -> None:
        img = Image(t)
        set_field(t.name, field, value(img))
        set_field(t.name, "next_expiry", 1)  # a purge is due (no entry has a deadline)

    return damage


def block_of(key: bytes, field: str, value: int) -> Callable[[shmkv.Table], None]:
    def damage(t: shmkv.Table) -> None:
        img = Image(t)
        poke_block(t.name, img, img.block_of(key), field, value)

    return damage


def min_memory(capacity: int, key_size: int, value_size: int) -> int:
    g = ffi.new("struct shmkv_geometry *")
    assert lib.shmkv_layout(capacity, key_size, value_size, 0, g) == 0
    return int(g.min_memory)


# The `table` fixture's shape in the least memory it may have: 136 units of data area.
TIGHT = {"capacity": 64, "key_size": 32, "value_size": 64, "memory": min_memory(64, 32, 64)}
CORRUPT_WALK = {"insert": "CorruptTable", "check": "CheckFailed", "check invariant": "8"}
WALKS = {
    # (table, what makes room short, damage, outcomes, a counter that shows the walk ran)
    "purge-cursor-mid-block": (
        {"capacity": 21, "key_size": 32, "value_size": 64}, full_of_keys,
        hint("purge_cursor", lambda img: img.block_of(b"key-05") + 1),
        {**CORRUPT_WALK, "purge_expired": "ok", "insert again": "TableFull"}, None),
    "purge-cursor-past-end": (
        {"capacity": 21, "key_size": 32, "value_size": 64}, full_of_keys,
        hint("purge_cursor", lambda img: img.data_units + 1),
        {"insert": "TableFull", "check": "ok"}, None),
    "clock-hand-mid-block": (
        {"capacity": 21, "key_size": 32, "value_size": 64, "on_full": "evict"}, full_of_keys,
        hint("clock_hand", lambda img: img.block_of(b"key-05") + 1), CORRUPT_WALK, None),
    "clock-hand-past-end": (
        {"capacity": 21, "key_size": 32, "value_size": 64, "on_full": "evict"}, full_of_keys,
        hint("clock_hand", lambda img: 2**64 - 1), {"insert": "ok", "check": "ok"}, "evictions"),
    "compaction-undamaged": (
        TIGHT, scattered_room, lambda t: None, {"insert": "ok", "check": "ok"}, "compactions"),
    "compaction-meets-size-0": (
        TIGHT, scattered_room, block_of(b"key-07", "size", 0), CORRUPT_WALK, "compactions"),
    "compaction-meets-state-garbage": (
        TIGHT, scattered_room, block_of(b"key-07", "state", 0xDEADBEEF), CORRUPT_WALK,
        "compactions"),
    # Compaction finds the slot of each block it moves by its key: a wrong key is not found
    # (the check then finds stored_bytes one byte off first).
    "compaction-meets-wrong-key": (
        TIGHT, scattered_room, block_of(b"key-07", "key_len", 5),
        {**CORRUPT_WALK, "check invariant": "12"}, "compactions"),
    "compaction-meets-huge-key": (
        TIGHT, scattered_room, block_of(b"key-07", "key_len", 0xFFFFFFFF), CORRUPT_WALK,
        "compactions"),
}


@pytest.mark.parametrize("walk", list(WALKS))
def test_walks_from_damaged_hints(make_name: Callable[[], str], walk: str) -> None:
    """A write that runs out of room walks the blocks (a partial purge from its cursor, an
    eviction from the clock hand, a compaction): damage on the way is CorruptTable, never a
    crash, a hang or a walk outside the data area."""
    params, short, damage, want, ran = WALKS[walk]
    t = shmkv.create(make_name(), **params)
    try:
        expected = short(t)
        damage(t)
        log = run_child(t.name, expected, script=WALK_CHILD)
        if ran is not None:
            assert t.stats()[ran] > 0
    finally:
        t.unlink()
        t.close()
    assert {op: log.get(op) for op in want} == want


# The walks above read inside the mapping's last page even when they overrun the segment, so
# nothing would crash: this child maps a copy of the segment with an inaccessible page right
# after it (the copy's size is a multiple of the page size), so that a read past the end of
# the data area is a SIGSEGV. It drives the C core directly and prints {operation: outcome}.
GUARDED_CHILD = textwrap.dedent(
    r"""
    import ctypes, json, mmap, sys
    from shmkv import _segment
    from shmkv._core import ffi, lib
    from shmkv.errors import error_for

    seg = _segment.open_segment(sys.argv[1], create=False, track=False)
    image = bytes(seg.buf)
    seg.close()
    size, page = len(image), mmap.PAGESIZE
    assert size % page == 0, size
    copy = mmap.mmap(-1, size + page)
    copy[:size] = image
    base = ctypes.addressof(ctypes.c_char.from_buffer(copy))
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert mprotect(base + size, page, 0) == 0  # PROT_NONE
    handle, why = ffi.new("shmkv_t **"), ffi.new("char[]", 256)
    rc = lib.shmkv_open(ffi.cast("void *", base), size, handle, why, 256)
    assert rc == 0, ffi.string(why)
    t = handle[0]
    calls = {
        "purge_expired": lambda: lib.shmkv_purge_expired(t),
        "insert": lambda: lib.shmkv_put(t, b"new-1", 5, b"n1", 2, 0, 0),
        "check": lambda: lib.shmkv_check(t, ffi.NULL),
    }
    log = {}
    for op, call in calls.items():
        rc = call()
        log[op] = "ok" if rc >= 0 else type(error_for(rc)).__name__
    print(json.dumps(log))
    """
)

# The last block of the data area made a USED block of 2 units (a bare header) whose key_len
# is within key_size: a walk that meets it hashes its key to find its slot (index_slot_of).
# A key_len of 0 lies inside the block; 32 (key_size) runs 32 bytes past the area's end.
# (on_full, key_len, what makes a walk meet it, outcomes)
END_OF_AREA = {
    "purge-meets-empty-key": ("error", 0, "expires", {"purge_expired": "CorruptTable",
                                                     "insert": "CorruptTable",
                                                     "check": "CheckFailed"}),
    "purge-meets-overrunning-key": ("error", 32, "expires", {"purge_expired": "CorruptTable",
                                                            "insert": "CorruptTable",
                                                            "check": "CheckFailed"}),
    "eviction-meets-empty-key": ("evict", 0, "clock_hand", {"insert": "CorruptTable",
                                                           "check": "CheckFailed"}),
    "eviction-meets-overrunning-key": ("evict", 32, "clock_hand", {"insert": "CorruptTable",
                                                                  "check": "CheckFailed"}),
}
@pytest.mark.parametrize("case", list(END_OF_AREA))
def test_walks_read_nothing_past_the_segment(make_name: Callable[[], str], case: str) -> None:
    """A block at the very end of the data area whose key would run past it: a purge or an
    eviction that meets it says CorruptTable and reads nothing beyond the segment."""
    on_full, key_len, meet, want = END_OF_AREA[case]
    page = mmap.PAGESIZE
    memory = up(min_memory(8, 32, 8), page) + page
    t = shmkv.create(make_name(), capacity=8, key_size=32, value_size=8, memory=memory,
                     on_full=on_full)
    try:
        t.update({b"k%d" % i: b"v" for i in range(t.capacity)})  # full of keys
        img = Image(t)
        assert img.g.total_size == memory
        end = img.free_blocks()[-1]
        size = img.block(end, "size")
        assert end + size == img.data_units and size >= 2 * MIN_BLOCK_UNITS
        last = img.data_units - MIN_BLOCK_UNITS
        for field, value in {"size": MIN_BLOCK_UNITS, "prev_size": size - MIN_BLOCK_UNITS,
                             "state": USED, "referenced": 0, "key_len": key_len,
                             "value_len": 0, "expires": 1 if meet == "expires" else 0}.items():
            poke_block(t.name, img, last, field, value)
        poke_block(t.name, img, end, "size", size - MIN_BLOCK_UNITS)
        if meet == "expires":
            set_field(t.name, "next_expiry", 1)
        else:
            set_field(t.name, "clock_hand", last)
        log = run_child(t.name, {}, script=GUARDED_CHILD)
    finally:
        t.unlink()
        t.close()
    assert {op: log.get(op) for op in want} == want


FUZZ_IMAGES = 30


@pytest.mark.parametrize("seed", range(FUZZ_IMAGES))
def test_random_byte_flips_never_crash(make_name: Callable[[], str], seed: int) -> None:
    """Seeded random damage to the header (free lists and lock included), index and blocks:
    every operation still ends in an answer or a shmkv.Error, never a signal or a hang."""
    rng = random.Random(seed)
    with new_table(make_name()) as t:
        expected = fill(t)
        for key in rng.sample(sorted(expected), 3):
            del t[key]
            del expected[key]
        img = Image(t)
        # (start, end, weight): most flips land in the body, so that most images attach.
        regions = [
            (0, FIELDS["count"][0], 1),  # identity and geometry
            (FIELDS["count"][0], BINMAP, 2),  # state words, records and counters
            (BINMAP, BINS + 4 * NBINS, 2),  # the free lists
            (FIELDS["seq"][0], int(img.g.index_offset), 1),  # seq and the mutex
            (int(img.g.index_offset), img.data_offset, 3),  # the index
            # The blocks of the entries and the header of the free end of the area.
            (img.data_offset, img.block_offset(img.used_end() + MIN_BLOCK_UNITS), 4),
        ]
        for _ in range(rng.randint(1, 8)):
            start, end, _weight = rng.choices(regions, [r[2] for r in regions])[0]
            offset = rng.randrange(start, end)
            byte = rng.choice([0x00, 0xFF, img.data[offset] ^ (1 << rng.randrange(8))])
            poke(t.name, offset, bytes([byte]))
        run_child(t.name, expected)


# ---------------------------------------------------------------------- 3. the resource tracker

TRACKER_WORDS = ("resource_tracker", "leaked")


def assert_table_intact(name: str, expected: dict[bytes, bytes]) -> None:
    with shmkv.attach(name) as t:
        assert dict(t.items()) == expected
        t.check()


ATTACH_AND_READ = {
    "attach": "t = shmkv.attach(name)",
    "create-exist-ok": "t = shmkv.create(name, 64, 32, 64, exist_ok=True)",
}


@pytest.mark.parametrize("close", [True, False], ids=["closes", "exits-attached"])
@pytest.mark.parametrize("how", sorted(ATTACH_AND_READ))
def test_fresh_process_attach_leaves_table(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], how: str, close: bool
) -> None:
    """An unrelated process that attaches, reads and exits neither removes the table nor gets
    a resource-tracker warning."""
    t, expected = filled
    script = "\n".join([
        "import sys, shmkv",
        "name = sys.argv[1]",
        ATTACH_AND_READ[how],
        "print(t[b'key-05'].decode(), len(t))",
        "t.close()" if close else "",
    ])
    proc = subprocess.run([sys.executable, "-c", script, t.name],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [expected[b"key-05"].decode(), str(len(expected))]
    assert not [word for word in TRACKER_WORDS if word in proc.stderr], proc.stderr
    assert_table_intact(t.name, expected)


SPAWNER = '''
"""Starts spawn children that attach to the table argv[1] (by name, and as a pickled Table)
and read it; exits non-zero if one of them fails."""
import multiprocessing
import sys

import shmkv


def read(table, key, value):
    t = shmkv.attach(table) if isinstance(table, str) else table
    sys.exit(0 if t[key] == value else 3)


if __name__ == "__main__":
    name = sys.argv[1]
    ctx = multiprocessing.get_context("spawn")
    with shmkv.attach(name) as table:
        for target in (name, table):
            child = ctx.Process(target=read, args=(target, b"key-05", bytes.fromhex(sys.argv[2])))
            child.start()
            child.join(%(timeout)r)
            if child.exitcode != 0:
                child.kill()
                sys.exit("spawn child exited with %%r" %% (child.exitcode,))
'''


def test_spawned_children_leave_table(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], tmp_path: Path
) -> None:
    """multiprocessing spawn children of an unrelated process attach and read; once that
    process and its resource tracker are gone, the table is still there and nothing warned."""
    t, expected = filled
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER % {"timeout": JOIN_TIMEOUT})
    proc = subprocess.run(
        [sys.executable, str(script), t.name, expected[b"key-05"].hex()],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert not [word for word in TRACKER_WORDS if word in proc.stderr], proc.stderr
    assert_table_intact(t.name, expected)


def spawned_reader(name: str, key: bytes, value: bytes) -> None:
    """Attaches and reads; exits 2 if that registered anything with the resource tracker,
    which a spawn child shares with its parent."""
    from multiprocessing import resource_tracker

    registered: list[tuple[str, str]] = []
    real_register = resource_tracker.register

    def register(name: str, rtype: str) -> None:
        registered.append((name, rtype))
        real_register(name, rtype)

    resource_tracker.register = register
    with shmkv.attach(name) as t:
        value_read = t[key]
    sys.exit(2 if registered else 0 if value_read == value else 3)


def test_spawn_child_does_not_register(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], capfd: pytest.CaptureFixture[str]
) -> None:
    """A spawn child of this process attaches without telling the (shared) resource tracker
    about the table, so no tracker will unlink it or warn about it."""
    t, expected = filled
    child = get_context("spawn").Process(
        target=spawned_reader, args=(t.name, b"key-05", expected[b"key-05"])
    )
    child.start()
    child.join(JOIN_TIMEOUT)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert not [word for word in TRACKER_WORDS if word in capfd.readouterr().err]
    assert_table_intact(t.name, expected)


# ---------------------------------------------------------------------- 4. names


def test_unlink_removes_name_but_handles_keep_working(table: shmkv.Table) -> None:
    """unlink() frees the name at once (attach: FileNotFoundError), while this handle and
    other attached handles share the table until they close; the name can be reused."""
    table[b"a"] = b"1"
    other = shmkv.attach(table.name)
    table.unlink()
    with pytest.raises(FileNotFoundError):
        shmkv.attach(table.name)
    table[b"b"] = b"2"
    assert other[b"b"] == b"2"
    other[b"c"] = b"3"
    assert dict(table.items()) == {b"a": b"1", b"b": b"2", b"c": b"3"}
    table.check()
    with pytest.raises(FileNotFoundError):
        table.unlink()
    other.close()
    assert table.pop(b"a") == b"1"
    table.close()
    with pytest.raises(shmkv.TableClosed):
        table[b"a"]
    with shmkv.create(table.name, capacity=8, key_size=8, value_size=8) as fresh:
        assert len(fresh) == 0
        fresh.unlink()


def test_attach_missing_name(name: str) -> None:
    """attach of a name nobody created raises FileNotFoundError, and creates nothing."""
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)
    with pytest.raises(FileNotFoundError):
        shmkv.attach(name)


def test_create_existing_name(filled: tuple[shmkv.Table, dict[bytes, bytes]],
                              make_name: Callable[[], str]) -> None:
    """create of a taken name raises FileExistsError and leaves what is there untouched,
    whether it is a table or some other program's segment."""
    t, expected = filled
    with pytest.raises(FileExistsError):
        shmkv.create(t.name, capacity=64, key_size=32, value_size=64)
    assert_table_intact(t.name, expected)
    name = make_name()
    with foreign_segment(name, b"not a table"):
        with pytest.raises(FileExistsError):
            shmkv.create(name, capacity=64, key_size=32, value_size=64)
        assert read_segment(name) == b"not a table"


def test_create_exist_ok_same_geometry_attaches(
    filled: tuple[shmkv.Table, dict[bytes, bytes]],
) -> None:
    """create(..., exist_ok=True) of an existing table of the same geometry attaches to it:
    it sees the data, and writes go both ways."""
    t, expected = filled
    with shmkv.create(t.name, capacity=64, key_size=32, value_size=64, exist_ok=True) as t2:
        assert dict(t2.items()) == expected
        t2[b"from-t2"] = b"x"
        t[b"from-t"] = b"y"
        assert t[b"from-t2"] == b"x" and t2[b"from-t"] == b"y"
    assert t[b"from-t2"] == b"x"
    t.check()


@pytest.mark.parametrize(
    "asked",
    [
        {"capacity": 65},
        {"key_size": 33},
        {"value_size": 63},
        {"capacity": 8, "key_size": 8, "value_size": 8},
        {"on_full": "evict"},
        {"memory": 2**20},
    ],
    ids=str,
)
def test_create_exist_ok_other_geometry(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], asked: dict[str, Any]
) -> None:
    """create(..., exist_ok=True) of an existing table of another geometry or policy raises
    IncompatibleTable naming both, and leaves the table as it was."""
    t, expected = filled
    params = {"capacity": 64, "key_size": 32, "value_size": 64, "memory": None,
              "on_full": "error", **asked}
    with pytest.raises(shmkv.IncompatibleTable) as info:
        shmkv.create(t.name, **params, exist_ok=True)
    message = str(info.value)
    assert ("exists with capacity=64, key_size=32, value_size=64, memory=None, on_full='error', "
            "not " in message)
    assert ", ".join(f"{k}={v!r}" for k, v in params.items()) in message
    assert_table_intact(t.name, expected)


def test_create_exist_ok_over_foreign_segment(make_name: Callable[[], str]) -> None:
    """create(..., exist_ok=True) over a segment that is not a table raises
    IncompatibleTable and neither overwrites nor removes that segment."""
    name = make_name()
    data = b"NOTSHMKV" + bytes(4088)
    with foreign_segment(name, data):
        with pytest.raises(shmkv.IncompatibleTable, match="no shmkv magic"):
            shmkv.create(name, capacity=8, key_size=8, value_size=8, exist_ok=True,
                         lock_timeout=SHORT_WAIT)
        assert read_segment(name) == data


@pytest.mark.parametrize("data", [bytes(4096), b""], ids=["zeros", "empty"])
def test_create_exist_ok_finishes_an_abandoned_table(
    make_name: Callable[[], str], data: bytes
) -> None:
    """A segment of ours that is empty or all zeros, whose flock nobody holds, is what a
    creator killed while creating leaves: create(..., exist_ok=True) lays the table anew."""
    name = make_name()
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.write(fd, data)
        with shmkv.create(name, capacity=8, key_size=8, value_size=8, exist_ok=True,
                          lock_timeout=SHORT_WAIT) as t:
            t[b"k"] = b"v"
            t.check()
        with shmkv.attach(name) as again:
            assert again[b"k"] == b"v"
    finally:
        os.close(fd)


def test_an_unclosed_table_in_a_garbage_cycle_goes_quietly(name: str) -> None:
    """The cyclic garbage collector finalizes the objects of a cycle in no set order; the
    segment's finalizer used to run before the Table's and print "Exception ignored in
    SharedMemory.__del__ ... BufferError" (cffi still exported the mapping)."""
    import gc

    unraisable: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        for _ in range(20):
            t = shmkv.create(name, capacity=8, key_size=8, value_size=8)
            t[b"k"] = b"v"
            t.unlink()
            cycle: list[Any] = [t]
            cycle.append(cycle)
            t.cycle = cycle  # type: ignore[attr-defined]
            del t, cycle
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [u.exc_value for u in unraisable] == []
