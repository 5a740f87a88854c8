"""shmkv-inspect: main(argv) with captured output for each flag, and real subprocess runs for
the exit codes, the one-line messages and the table's survival."""

from __future__ import annotations

import json
import subprocess
import sys
from multiprocessing import shared_memory

import pytest
from conftest import hold_lock

import shmkv
from shmkv import _segment
from shmkv.cli import main

TIMEOUT = 60


@pytest.fixture
def filled(table: shmkv.Table) -> shmkv.Table:
    """The conftest table (capacity 64) with 14 keys, one of them binary, one a counter."""
    for i in range(12):
        table[b"user:%02d" % i] = b"name %d" % i
    table[b"bin\x00\xff"] = b"\x01\x02"
    table.incr(b"hits", 7)
    return table


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmkv", *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_list(filled, capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith(filled.name))
    assert " 14 " in line and "alive" in line
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == filled.name)
    assert row["len"] == 14 and row["capacity"] == 64 and row["creator_alive"]
    assert row["resident_bytes"] >= row["segment_size"]  # reserved at creation


def test_list_skips_foreign_segments(make_name, capsys) -> None:
    foreign = make_name()
    seg = shared_memory.SharedMemory(foreign, create=True, size=4096)
    try:
        seg.buf[:8] = b"NOTOURS!"
        assert main(["--json"]) == 0
        assert foreign not in {r["name"] for r in json.loads(capsys.readouterr().out)}
    finally:
        seg.close()
        seg.unlink()


def test_one_table(filled, capsys) -> None:
    assert main([filled.name]) == 0
    out = capsys.readouterr().out
    for words in ("capacity 64 entries", "14 entries (21.9%)", "lock      free",
                  "recoveries 0", "probes", "reserved", "resident"):
        assert words in out, words
    assert main([filled.name, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["len"] == 14 and d["lock"] == "free" and sum(d["probe_lengths"]) == 14
    assert d["inserts"] == 14 and d["version"] == 3


def test_keys(filled, capsys) -> None:
    assert main([filled.name, "--keys"]) == 0
    keys = capsys.readouterr().out.splitlines()
    assert len(keys) == 14 and "bin\\x00\\xff" in keys and "user:00" in keys
    assert main([filled.name, "--keys", "--prefix", "user:1", "--limit", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ["user:10"]


def test_get(filled, capsys) -> None:
    assert main([filled.name, "--get", "user:03"]) == 0
    assert capsys.readouterr().out == "name 3\n"
    assert main([filled.name, "--get", "bin\\x00\\xff", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"key": "bin\\x00\\xff", "value": "\\x01\\x02"}
    r = subprocess.run([sys.executable, "-m", "shmkv", filled.name, "--get", "hits", "--raw"],
                       capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout == (7).to_bytes(8, "little")
    assert main([filled.name, "--get", "absent"]) == 4
    assert "no key" in capsys.readouterr().err


def test_check(filled, capsys) -> None:
    assert main([filled.name, "--check"]) == 0
    assert "ok" in capsys.readouterr().out
    raw = _segment.open_segment(filled.name, create=False, track=False)
    raw.buf[128:136] = (50).to_bytes(8, "little")  # count (<= capacity 64): csrc/layout.h
    raw.close()
    assert main([filled.name, "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invariant 7" in err
    assert main([filled.name, "--check", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["invariant"] == 7


def test_watch(filled, capsys) -> None:
    assert main([filled.name, "--watch", "0.01", "--count", "3"]) == 0
    assert capsys.readouterr().out.count("capacity 64 entries") == 3
    assert main([filled.name, "--watch", "0.01", "--count", "2", "--json"]) == 0
    assert [json.loads(line)["len"] for line in capsys.readouterr().out.splitlines()] == [14, 14]


def test_unlink(filled, capsys) -> None:
    assert main(["--unlink", filled.name]) == 64
    assert "--yes" in capsys.readouterr().err
    assert filled[b"user:01"] == b"name 1"
    assert main(["--unlink", filled.name, "--yes"]) == 0
    with pytest.raises(FileNotFoundError):
        shmkv.attach(filled.name)


def test_unlink_refuses_foreign_segments(make_name, capsys) -> None:
    foreign = make_name()
    seg = shared_memory.SharedMemory(foreign, create=True, size=4096)
    try:
        assert main(["--unlink", foreign, "--yes"]) == 3
        shared_memory.SharedMemory(foreign).close()  # still there
    finally:
        seg.close()
        seg.unlink()


def test_exit_codes_and_one_line_messages(filled, make_name) -> None:
    """Real runs: missing, foreign and corrupted tables; one line on stderr, no traceback;
    and the table survives every inspection, with no resource-tracker warning."""
    missing = run_cli(make_name())
    assert missing.returncode == 2 and "no such table" in missing.stderr
    foreign = make_name()
    seg = shared_memory.SharedMemory(foreign, create=True, size=4096)
    try:
        seg.buf[:8] = b"NOTOURS!"
        r = run_cli(foreign)
        assert r.returncode == 3 and "magic" in r.stderr
    finally:
        seg.close()
        seg.unlink()
    usage = run_cli("--limit", "x")
    assert usage.returncode == 64
    for args in ([], [filled.name], [filled.name, "--keys"], [filled.name, "--check"],
                 [filled.name, "--get", "user:01"], [filled.name, "--json"]):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stderr == "", (args, r.stderr)
    assert shmkv.attach(filled.name)[b"user:11"] == b"name 11"
    raw = _segment.open_segment(filled.name, create=False, track=False)
    raw.buf[0:8] = b"XXXXXXXX"
    raw.close()
    for args in ([filled.name], [filled.name, "--check"]):
        r = run_cli(*args)
        assert r.returncode == 3 and r.stderr.count("\n") == 1
        assert "Traceback" not in r.stderr


def test_a_held_lock_is_shown_not_waited_for(filled, capsys) -> None:
    """The view of a table whose lock another process holds names that process, at once."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(filled.name, ready, done, False))
    holder.start()
    try:
        assert ready.wait(TIMEOUT)
        assert main([filled.name]) == 0
        out = capsys.readouterr().out
        assert f"held by process {holder.pid} (alive)" in out
        assert "14 entries" in out and "unknown while the lock is held" in out
        assert main([]) == 0
        assert filled.name in capsys.readouterr().out
    finally:
        done.set()
        holder.join(TIMEOUT)
    assert holder.exitcode == 0
    assert filled[b"user:01"] == b"name 1"
