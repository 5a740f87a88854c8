"""Segments: what attach does with a segment that is not (or no longer) a usable table, what a
corrupted body does to every operation, the resource-tracker trap, and the life of a name
(create, attach, unlink; FileExistsError, FileNotFoundError).

Damage is done by hand, through a second untracked mapping of the segment, at the offsets of
``struct shmkv_header`` and ``struct shmkv_entry`` in csrc/layout.h (checked against a real
table by the first test). Every operation on a damaged body runs in a child process, so that
a crash shows up as a failed test with the signal's name instead of killing the run.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]
import contextlib
import json
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

# struct shmkv_header (csrc/layout.h): field -> (offset, struct format), native byte order.
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, "8s"),
    "version": (8, "I"),
    "header_size": (12, "I"),
    "signature": (16, "Q"),
    "total_size": (24, "Q"),
    "capacity": (32, "Q"),
    "nentries": (40, "Q"),
    "nslots": (48, "Q"),
    "key_size": (56, "Q"),
    "value_size": (64, "Q"),
    "entry_size": (72, "Q"),
    "index_offset": (80, "Q"),
    "entries_offset": (88, "Q"),
    "flags": (120, "I"),
    "ready": (124, "I"),
    "count": (128, "Q"),
    "high_water": (136, "Q"),
    "free_head": (144, "Q"),
    "intent_old": (152, "Q"),
    "intent_new": (160, "Q"),
    "next_expiry": (248, "Q"),
    "clock_hand": (256, "Q"),
}
MAGIC = b"SHMKVTB1"
# The pthread_mutex_t, after the counters and reserved words, on its own 64-byte line.
LOCK_OFFSET = 384
# struct shmkv_entry: key_len u32, value_len u32, expires u64, seq u32, link u32,
# referenced u32, spare u32; then the key.
KEY_LEN, VALUE_LEN, EXPIRES, LINK, REFERENCED, KEY = 0, 4, 8, 20, 24, 32
LINK_USED = 0xFFFFFFFF
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

ABSENT = [b"absent-1", b"absent-2"]


# ---------------------------------------------------------------------- segment helpers


def layout(t: shmkv.Table) -> Any:
    """The geometry (struct shmkv_geometry) the C core computes for t's parameters."""
    g = ffi.new("struct shmkv_geometry *")
    assert lib.shmkv_layout(t.capacity, t.key_size, t.value_size, g) == 0
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

    def field(self, field: str) -> Any:
        offset, fmt = FIELDS[field]
        return struct.unpack_from("=" + fmt, self.data, offset)[0]

    def slot_offset(self, i: int) -> int:
        return int(self.g.index_offset) + 8 * i

    def slots(self) -> list[int]:
        return [U64.unpack_from(self.data, self.slot_offset(i))[0] for i in range(self.g.nslots)]

    def entry_offset(self, n: int) -> int:
        return int(self.g.entries_offset + n * self.g.entry_size)

    def entry_u32(self, n: int, at: int) -> int:
        return U32.unpack_from(self.data, self.entry_offset(n) + at)[0]

    def used_entries(self) -> list[int]:
        return [n for n in range(self.field("high_water")) if self.entry_u32(n, LINK) == LINK_USED]

    def entry_of(self, key: bytes) -> int:
        for n in self.used_entries():
            start = self.entry_offset(n) + KEY
            if self.data[start : start + self.entry_u32(n, KEY_LEN)] == key:
                return n
        raise AssertionError(f"{key!r} is in no entry")


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
    name: str, expected: dict[bytes, bytes], lock_timeout: float = SHORT_WAIT
) -> dict[str, str]:
    """Runs CHILD on table `name`; fails on a signal, a hang or an unexpected exception, and
    returns the outcome of each operation."""
    payload = {
        "expected": {k.hex(): v.hex() for k, v in expected.items()},
        "absent": [k.hex() for k in ABSENT],
        "lock_timeout": lock_timeout,
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
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
    """The offsets this file pokes at are those of the build: every header field, slot and
    entry read back from a real table holds what the table says it holds."""
    t, expected = filled
    img = Image(t)
    stats = t.stats()
    g = img.g
    assert img.field("magic") == MAGIC
    assert img.field("version") == stats["version"] == 4
    assert img.field("ready") == 1
    for field in ("header_size", "total_size", "capacity", "nentries", "nslots", "key_size",
                  "value_size", "entry_size", "index_offset", "entries_offset"):
        assert img.field(field) == getattr(g, field), field
    assert img.field("total_size") == stats["segment_size"] == len(img.data)
    assert img.field("count") == len(expected) == stats["len"]
    assert img.field("high_water") == stats["high_water"] == len(expected)
    assert (img.field("free_head"), img.field("intent_old"), img.field("intent_new")) == (0, 0, 0)
    assert g.index_offset >= LOCK_OFFSET + 40  # the mutex ends before the index
    used = [s for s in img.slots() if s]
    assert sorted((s & 0xFFFFFFFF) - 1 for s in used) == img.used_entries()
    for key, value in expected.items():
        n = img.entry_of(key)
        assert img.entry_u32(n, VALUE_LEN) == len(value)
        start = img.entry_offset(n) + KEY + ((t.key_size + 7) & ~7)
        assert img.data[start : start + len(value)] == value


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
        (lambda g: g.entries_offset, "truncated: .* the table needs"),
        (lambda g: g.total_size - 1, "truncated: .* the table needs"),
    ],
    ids=["4-bytes", "magic-only", "header-minus-1", "header-only", "index-only", "minus-1"],
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


BAD_HEADERS = [
    # (id, field, change of its value, what the message must say)
    ("version+1", "version", lambda v: v + 1, "format version 5, this build reads version 4"),
    ("version-0", "version", lambda v: 0, "format version 0"),
    ("version-flipped", "version", lambda v: v ^ 0xFFFFFFFF, "format version"),
    ("header-size", "header_size", lambda v: v + 64, "another build"),
    ("signature", "signature", lambda v: v ^ 1, "layout signature differs"),
    ("capacity+1", "capacity", lambda v: v + 1, "inconsistent header"),
    ("capacity-0", "capacity", lambda v: 0, "inconsistent header"),
    ("capacity-2**63", "capacity", lambda v: 2**63, "inconsistent header"),
    ("nentries+1", "nentries", lambda v: v + 1, "inconsistent header"),
    ("nslots*2", "nslots", lambda v: v * 2, "inconsistent header"),
    ("nslots-1", "nslots", lambda v: v - 1, "inconsistent header"),
    ("key-size-0", "key_size", lambda v: 0, "inconsistent header"),
    ("value-size-2**62", "value_size", lambda v: 2**62, "inconsistent header"),
    ("entry-size+8", "entry_size", lambda v: v + 8, "inconsistent header"),
    ("entry-size-1", "entry_size", lambda v: 1, "inconsistent header"),
    ("total-size+1", "total_size", lambda v: v + 1, "inconsistent header"),
    ("total-size-1", "total_size", lambda v: v - 1, "inconsistent header"),
    ("total-size-max", "total_size", lambda v: 2**64 - 1, "inconsistent header"),
    ("index-offset+64", "index_offset", lambda v: v + 64, "inconsistent header"),
    ("index-offset-0", "index_offset", lambda v: 0, "inconsistent header"),
    ("entries-offset-64", "entries_offset", lambda v: v - 64, "inconsistent header"),
    ("ready-2", "ready", lambda v: 2, "ready flag is 2"),
]


@pytest.mark.parametrize(
    ("field", "change", "why"), [pytest.param(*case[1:], id=case[0]) for case in BAD_HEADERS]
)
def test_attach_rejects_bad_header(
    table: shmkv.Table, field: str, change: Callable[[int], int], why: str
) -> None:
    """A table whose header names another format version or build, or whose geometry does not
    follow from its capacity and sizes, raises IncompatibleTable saying which."""
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
# see for some operations. Reads of intact keys must still give the right answers.


def huge_key_lengths(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """key_len = 0xFFFFFFFF in every live entry: every lookup that reaches one is corrupt."""
    img = Image(t)
    for n in img.used_entries():
        poke(t.name, img.entry_offset(n) + KEY_LEN, U32.pack(0xFFFFFFFF))
    return {
        **{get_op(key): "CorruptTable" for key in expected},
        "iter": "CorruptTable",
        "get_many": "CorruptTable",
        "replace": "CorruptTable",
        "check": "CheckFailed",
    }


def huge_value_length(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """value_len = 0xFFFFFFFF in one entry: only that key (and whole-table reads) fail."""
    img = Image(t)
    poke(t.name, img.entry_offset(img.entry_of(b"key-07")) + VALUE_LEN, U32.pack(0xFFFFFFFF))
    return {get_op(b"key-07"): "CorruptTable", get_op(b"key-08"): "ok",
            "items": "CorruptTable", "iter": "CorruptTable", "check": "CheckFailed"}


def slot_entries(number: Callable[[Any], int]) -> Callable[..., dict[str, str]]:
    """Every used slot keeps its tag but names entry number(geometry) - 1."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        img = Image(t)
        for i, s in enumerate(img.slots()):
            if s:
                poke(t.name, img.slot_offset(i), U64.pack((s & ~0xFFFFFFFF) | number(img.g)))
        return {**{get_op(key): "CorruptTable" for key in expected},
                "iter": "ok", "len": "ok", "check": "CheckFailed"}

    return scenario


def header_word(field: str, value: int, **outcomes: str) -> Callable[..., dict[str, str]]:
    """A state word of the header set to value; the check fails, and so do `outcomes`."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        set_field(t.name, field, value)
        return {"check": "CheckFailed", **outcomes}

    return scenario


def with_free_list(damage: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    """The scenario, on a table that has a free list (three keys deleted first)."""
    def scenario(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
        for key in (b"key-03", b"key-11", b"key-16"):
            del t[key]
            del expected[key]
        return damage(t, expected)

    return scenario


def free_list_cycle(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """The free list's first entry links to itself."""
    img = Image(t)
    head = img.field("free_head")
    poke(t.name, img.entry_offset(head - 1) + LINK, U32.pack(head))
    return {"check": "CheckFailed"}


def every_slot_used(t: shmkv.Table, expected: dict[bytes, bytes]) -> dict[str, str]:
    """Random non-zero words in every empty slot: probes for absent keys never end."""
    img = Image(t)
    rng = random.Random(3)
    for i, s in enumerate(img.slots()):
        if not s:
            poke(t.name, img.slot_offset(i), U64.pack(rng.randrange(1, 2**64)))
    return {**{get_op(key): "ok" for key in expected},
            **{"absent get " + key.hex(): "CorruptTable" for key in ABSENT},
            "insert": "CorruptTable", "check": "CheckFailed"}


CAPACITY = 64  # of the `table` fixture
SCENARIOS: dict[str, Callable[..., dict[str, str]]] = {
    "key-len-ffffffff": huge_key_lengths,
    "value-len-ffffffff": huge_value_length,
    "slot-entry-out-of-range": slot_entries(lambda g: g.nentries + 7),
    "slot-entry-ffffffff": slot_entries(lambda g: 0xFFFFFFFF),
    "slot-entry-zero": slot_entries(lambda g: 0),
    "every-slot-used": every_slot_used,
    "free-head-huge": header_word("free_head", 2**64 - 1, insert="CorruptTable"),
    "free-head-past-pool": header_word("free_head", CAPACITY + 2, insert="CorruptTable"),
    "free-head-used-entry": header_word("free_head", 1, insert="CorruptTable"),
    "free-head-huge-list": with_free_list(header_word("free_head", 2**40, insert="CorruptTable")),
    "free-list-cycle": with_free_list(free_list_cycle),
    "high-water-huge": header_word("high_water", 2**64 - 1, iter="CorruptTable",
                                   insert="CorruptTable"),
    "high-water-past-pool": header_word("high_water", CAPACITY + 2, iter="CorruptTable",
                                        insert="CorruptTable"),
    "count-over-capacity": header_word("count", CAPACITY + 1, len="CorruptTable",
                                       insert="TableFull"),
    "count-2**32": header_word("count", 2**32, len="CorruptTable"),
    "count-2**63": header_word("count", 2**63, len="CorruptTable"),
    "count-2**64-1": header_word("count", 2**64 - 1, len="CorruptTable"),
    "count-2**64-13": header_word("count", 2**64 - 13, len="CorruptTable"),
    "intent-garbage": header_word("intent_old", 2**64 - 1, len="ok", iter="ok"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_corrupted_body_raises_errors_not_crashes(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], scenario: str
) -> None:
    """A damaged index, entry or state word makes every operation give the right answer or a
    shmkv.Error (CorruptTable, CheckFailed, ...): never a crash, a hang, another exception
    or a wrong value; and the damage is detected where it must be."""
    t, expected = filled
    want = SCENARIOS[scenario](t, expected)
    log = run_child(t.name, expected)
    wrong = {op: outcome for op, outcome in log.items() if outcome.startswith("wrong")}
    assert not wrong
    lost = [op for op in log if op.startswith(("get ", "in ")) and log[op] == "KeyError"]
    assert not lost, "an intact key went missing"
    assert {op: log.get(op) for op in want} == want


FUZZ_IMAGES = 30


@pytest.mark.parametrize("seed", range(FUZZ_IMAGES))
def test_random_byte_flips_never_crash(make_name: Callable[[], str], seed: int) -> None:
    """Seeded random damage to the header (lock included), index and entries: every operation
    still ends in an answer or a shmkv.Error, never a signal or a hang."""
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
            (FIELDS["count"][0], LOCK_OFFSET, 2),  # state words and counters
            (LOCK_OFFSET, int(img.g.index_offset), 1),  # the mutex
            (int(img.g.index_offset), int(img.g.entries_offset), 3),  # the index
            (int(img.g.entries_offset), img.entry_offset(img.field("high_water")), 3),  # pool
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
    ],
    ids=str,
)
def test_create_exist_ok_other_geometry(
    filled: tuple[shmkv.Table, dict[bytes, bytes]], asked: dict[str, Any]
) -> None:
    """create(..., exist_ok=True) of an existing table of another geometry or policy raises
    IncompatibleTable naming both, and leaves the table as it was."""
    t, expected = filled
    params = {"capacity": 64, "key_size": 32, "value_size": 64, "on_full": "error", **asked}
    with pytest.raises(shmkv.IncompatibleTable) as info:
        shmkv.create(t.name, **params, exist_ok=True)
    message = str(info.value)
    assert ("exists with capacity=64, key_size=32, value_size=64, on_full='error', not "
            in message)
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
