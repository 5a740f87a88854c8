"""shmkv-inspect: main(argv) with captured output for each flag, and real subprocess runs for
the exit codes, the one-line messages and the table's survival."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pwd
import subprocess
import sys
from multiprocessing import shared_memory

import pytest
from conftest import JOIN_TIMEOUT, hold_lock

import shmkv
from shmkv import _segment, cli
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


ME = pwd.getpwuid(os.geteuid()).pw_name
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes a segment's owner: needs root")


def shm_file(name: str, size: int = 0) -> str:
    """Makes /dev/shm/NAME as a creator killed before (size 0) or after sizing it would
    leave it (a sized one starts with shmkv's magic, written right after sizing, before the
    header is laid); the make_name fixture removes it."""
    path = os.path.join(cli.SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    if size:
        os.pwrite(fd, _segment.MAGIC, 0)
    os.close(fd)
    return path


def test_list(filled, capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith(filled.name))
    assert " 14 " in line and "alive" in line and f" {ME} 0600 " in line
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == filled.name)
    assert row["len"] == 14 and row["capacity"] == 64 and row["creator_alive"]
    assert row["resident_bytes"] >= row["segment_size"]  # reserved at creation
    assert (row["status"], row["owner"], row["uid"], row["mode"]) == (
        "table", ME, os.geteuid(), "0600")


def test_list_skips_foreign_segments(make_name, capsys) -> None:
    foreign = make_name()
    seg = shared_memory.SharedMemory(foreign, create=True, size=4096)
    try:
        seg.buf[:8] = b"NOTOURS!"
        assert main(["--json"]) == 0
        assert foreign not in {r["name"] for r in json.loads(capsys.readouterr().out)}
        assert main([]) == 0
        assert "--all lists" in capsys.readouterr().out
        assert main(["--all", "--json"]) == 0
        row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == foreign)
        assert row["status"] == "other" and "magic" in row["reason"]
    finally:
        seg.close()
        seg.unlink()


def test_list_shows_incompatible_tables(make_name, capsys) -> None:
    """A segment with shmkv's magic that this build cannot read (another format version,
    a damaged header) is shmkv's: listed, as incompatible, with the reason."""
    other_version = make_name()
    with open(shm_file(other_version, 4096), "r+b") as f:
        f.write(b"SHMKVTB1" + b"\xff" * 4088)
    assert main(["--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == other_version)
    assert row["status"] == "incompatible" and row["reason"]
    assert main([]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines()
                if row.startswith(other_version))
    assert "INCOMPATIBLE: " in line and f"{ME} 0600" in line


def test_one_table(filled, capsys) -> None:
    assert main([filled.name]) == 0
    out = capsys.readouterr().out
    for words in ("capacity 64 keys", "14 keys (21.9%)", "lock      free",
                  "recoveries 0", "probes", "reserved", "resident",
                  f"owner     {ME} (uid {os.geteuid()}), mode 0600"):
        assert words in out, words
    assert main([filled.name, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["len"] == 14 and d["lock"] == "free" and sum(d["probe_lengths"]) == 14
    assert d["inserts"] == 14 and d["version"] == filled.stats()["version"]
    assert (d["owner"], d["mode"]) == (ME, "0600")


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
    assert capsys.readouterr().out.count("capacity 64 keys") == 3
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
        seg.buf[:8] = b"NOTOURS!"
        assert main(["--unlink", foreign, "--yes"]) == 3
        shared_memory.SharedMemory(foreign).close()  # still there
    finally:
        seg.close()
        seg.unlink()


def test_unlink_absent_and_unfinished_tables(make_name, capsys) -> None:
    """Exit 2 for no such table; a table whose creator died while creating it (sized, with
    the magic, never marked ready) is removed, exit 0; an empty file, which may as well be
    another program's, is left alone, exit 3."""
    assert main(["--unlink", make_name(), "--yes"]) == 2
    assert "no such table" in capsys.readouterr().err
    path = shm_file(make_name(), 4096)
    assert main(["--unlink", os.path.basename(path), "--yes"]) == 0, capsys.readouterr()
    assert not os.path.exists(path)
    path = shm_file(make_name(), 0)
    assert main(["--unlink", os.path.basename(path), "--yes"]) == 3
    assert "not a shmkv table" in capsys.readouterr().err
    assert os.path.exists(path)


def _unlink_as_nobody(name: str, conn) -> None:
    """A child process: drops to uid 65534 and runs --unlink NAME --yes; sends back the exit
    code and what it printed on stderr."""
    os.setgid(65534)
    os.setuid(65534)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--unlink", name, "--yes"])
    conn.send((code, err.getvalue()))
    conn.close()


@needs_root
def test_unlink_refuses_another_users_table_unless_root(filled, mp_context, capsys) -> None:
    """A user may not remove root's table (exit 6, saying whose it is); root removes the
    table of another user."""
    parent, child_end = mp_context.Pipe(duplex=False)
    child = mp_context.Process(target=_unlink_as_nobody, args=(filled.name, child_end))
    child.start()
    child_end.close()
    assert parent.poll(JOIN_TIMEOUT)
    code, err = parent.recv()
    child.join(JOIN_TIMEOUT)
    assert child.exitcode == 0
    assert code == 6 and err.count("\n") == 1 and "root" in err, err
    assert filled[b"user:01"] == b"name 1"  # still there
    os.chown(os.path.join(cli.SHM_DIR, filled.name), 65534, 65534)
    assert main(["--unlink", filled.name, "--yes"]) == 0
    assert not os.path.exists(os.path.join(cli.SHM_DIR, filled.name))


@needs_root
def test_root_sees_every_users_tables(filled, capsys) -> None:
    """Root's listing and one-table view show a table of uid 65534, and say whose it is."""
    nobody = pwd.getpwuid(65534).pw_name
    os.chown(os.path.join(cli.SHM_DIR, filled.name), 65534, 65534)
    with pytest.raises(shmkv.UntrustedTable):
        shmkv.attach(filled.name)  # what inspecting must not be stopped by
    assert main([]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines()
                if row.startswith(filled.name))
    assert f" {nobody} 0600 " in line and " 14 " in line
    assert main(["--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == filled.name)
    assert (row["status"], row["owner"], row["uid"], row["mode"]) == (
        "table", nobody, 65534, "0600")
    assert main([filled.name]) == 0
    assert f"owner     {nobody} (uid 65534), mode 0600" in capsys.readouterr().out
    assert main([filled.name, "--get", "user:02"]) == 0
    assert capsys.readouterr().out == "name 2\n"


def test_names_and_values_are_escaped(filled, make_name, capsys) -> None:
    """What comes from /dev/shm or a segment never reaches the terminal raw: a file named to
    clear the screen and forge a row, undecodable bytes, keys and values with escapes."""
    forged = make_name() + "\x1b[2J\nfake-table 999,999"
    undecodable = os.fsencode(make_name()) + b"\xff\x1b]0;title\x07"
    fds = [os.open(os.path.join(cli.SHM_DIR, forged), os.O_CREAT | os.O_EXCL | os.O_RDWR),
           os.open(os.path.join(os.fsencode(cli.SHM_DIR), undecodable),
                   os.O_CREAT | os.O_EXCL | os.O_RDWR)]
    filled[b"\x1b[2J"] = b"\x1b]0;owned\x07\r\n"
    try:
        for argv in ([], ["--all"], ["--all", "--json"], [filled.name, "--keys"],
                     [filled.name, "--get", "\\x1b[2J"], [filled.name, "--json"]):
            assert main(argv) == 0
            out = capsys.readouterr().out
            assert "\x1b" not in out and "\x07" not in out and "\r" not in out, argv
            assert not any(line.startswith("fake-table") for line in out.splitlines()), argv
        assert main(["--all"]) == 0
        out = capsys.readouterr().out
        assert forged.replace("\x1b", "\\x1b").replace("\n", "\\x0a") in out
        assert "\\xff\\x1b]0;title\\x07" in out and "NOT SHMKV: not a valid table name" in out
        assert main([filled.name, "--get", "\\x1b[2J"]) == 0
        assert capsys.readouterr().out == "\\x1b]0;owned\\x07\\x0d\\x0a\n"
        for argv in ([forged], ["--unlink", forged, "--yes"], [filled.name, "--bad\x1b[2J"],
                     [filled.name, "--get", "\x1b\\q"]):
            assert main(argv) == 64, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "\x1b" not in err, (argv, err)
    finally:
        for fd in fds:
            os.close(fd)
        os.unlink(os.path.join(cli.SHM_DIR, forged))
        os.unlink(os.path.join(os.fsencode(cli.SHM_DIR), undecodable))


@pytest.mark.parametrize("argv", [
    ["--limit", "-1", "--keys", "NAME"], ["NAME", "--raw"], ["NAME", "--prefix", "a"],
    ["NAME", "--limit", "1"], ["NAME", "--count", "2"], ["--yes"], ["NAME", "--keys", "--check"],
    ["--limit", "x"], ["NAME", "--watch", "0"], ["NAME", "--watch", "inf"],
    ["NAME", "--get", "k", "--raw", "--json"], ["--all", "NAME"], ["--unlink", "NAME", "NAME"],
    ["NAME", "--get", "bad\\xZZ"], ["--keys"], ["--count", "0", "--watch", "1", "NAME"],
    ["--unlink", "NAME", "--lock-timeout", "1", "--yes"], ["..", "--check"], ["sem.NAME"],
])
def test_bad_usage_is_one_line_and_exit_64(filled, argv, capsys) -> None:
    """Flags that do not apply, bad numbers and bad escapes are errors, not ignored."""
    argv = [arg.replace("NAME", filled.name) for arg in argv]
    assert main(argv) == 64
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--help" in captured.err, captured.err
    assert captured.out == ""


def test_help_lists_the_exit_codes(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in ("0   ok", "5   the table's lock is held", "6   permission denied", "64  bad"):
        assert code in out, code


def test_the_listing_never_waits_for_unfinished_files(make_name, monkeypatch, capsys) -> None:
    """10 files that creators left unfinished (sized and never marked ready) and one whose
    creator is at work (it holds the flock) are listed as unfinished at once, and 10 empty
    files (a creator's before sizing, or another program's: no telling) as other files:
    nothing waits for them (the back-off between tries fails the test). Another program's
    file that it happens to flock is not taken for an unfinished table."""
    def no_waiting(attempt: int) -> None:
        raise AssertionError("the listing waited for an unfinished table")

    monkeypatch.setattr(_segment, "back_off", no_waiting)
    names = [os.path.basename(shm_file(make_name(), 0 if i < 10 else 4096)) for i in range(20)]
    busy, foreign = make_name(), make_name()
    fd = os.open(shm_file(busy, 4096), os.O_RDWR)
    foreign_fd = os.open(shm_file(foreign, 4096), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(foreign_fd, b"NOTOURS!", 0)  # another program's, which flocks it too
        fcntl.flock(foreign_fd, fcntl.LOCK_EX)
        assert main(["--json", "--all"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        for name in [*names[10:], busy]:
            assert rows[name]["status"] == "unfinished", rows[name]
            assert (rows[name]["owner"], rows[name]["mode"]) == (ME, "0600")
        for name in [*names[:10], foreign]:
            assert rows[name]["status"] == "other", rows[name]
        assert "empty" in rows[names[0]]["reason"]
        assert main([]) == 0
        out = capsys.readouterr().out
        assert out.count("UNFINISHED") >= 11
        assert main([busy]) == 3 and main([names[0]]) == 3 and main([names[-1]]) == 3
        assert "never finished" in capsys.readouterr().err
    finally:
        os.close(fd)
        os.close(foreign_fd)


def test_inspecting_a_locked_table_changes_nothing(filled, mp_context, capsys) -> None:
    """While another process holds the lock, the commands that need it exit 5 ("try
    again"), not 3; and inspecting adds nothing to the table's counters: no lock timeouts,
    and no hit or miss for --get."""
    before = filled.stats(wait=False)
    ready, done = mp_context.Event(), mp_context.Event()
    holder = mp_context.Process(target=hold_lock, args=(filled.name, ready, done, False))
    holder.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        for argv in ([filled.name, "--check"], [filled.name, "--keys"],
                     [filled.name, "--get", "user:01"]):
            assert main([*argv, "--lock-timeout", "0.05"]) == 5, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "try again" in err, err
        assert main([filled.name, "--lock-timeout", "0.05"]) == 0
        assert main(["--lock-timeout", "0.05"]) == 0
    finally:
        done.set()
        holder.join(JOIN_TIMEOUT)
    assert holder.exitcode == 0
    assert main([filled.name, "--get", "user:01"]) == 0
    assert main([filled.name, "--get", "absent"]) == 4
    after = filled.stats(wait=False)
    for counter in ("lock_timeouts", "hits", "misses", "inserts", "updates", "deletes"):
        assert after[counter] == before[counter], counter


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
    for args in (["--limit", "x"], [filled.name, "--get", "bad\\xZZ"], ["x\x1b[2J"]):
        usage = run_cli(*args)
        assert usage.returncode == 64 and usage.stderr.count("\n") == 1, usage.stderr
        assert "Traceback" not in usage.stderr and "\x1b" not in usage.stderr
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
        assert "14 keys" in out and "unknown while the lock is held" in out
        assert main([]) == 0
        assert filled.name in capsys.readouterr().out
    finally:
        done.set()
        holder.join(TIMEOUT)
    assert holder.exitcode == 0
    assert filled[b"user:01"] == b"name 1"


def _die_holding_the_lock(name: str, uid: int, ready) -> None:
    """A child: takes the lock of a table owned by uid and dies holding it, so that the
    next process to lock it finds the owner dead and runs recovery on the table."""
    t = shmkv.attach(name, user=uid)
    t._hold_lock_for_testing()
    ready.set()
    os._exit(0)


@needs_root
def test_root_never_locks_another_users_table(make_name, mp_context, capsys) -> None:
    """Root reads another user's table without its lock: glibc writes through list links
    kept in a robust mutex it locks, which that user can rewrite, and a locker may have to
    run recovery on that user's data. So the views that need no lock work, those that need
    it exit 6 saying why, and nothing is recovered."""
    name = make_name()
    with shmkv.create(name, capacity=8, key_size=8, value_size=8, exist_ok=True) as t:
        t[b"k"] = b"v"
    os.chown(os.path.join(cli.SHM_DIR, name), 65534, 65534)
    ready = mp_context.Event()
    child = mp_context.Process(target=_die_holding_the_lock, args=(name, 65534, ready))
    child.start()
    child.join(JOIN_TIMEOUT)
    assert ready.is_set() and child.exitcode == 0
    assert main([name]) == 0
    assert "recoveries 0" in capsys.readouterr().out
    for argv in (["--check"], ["--keys"], ["--get", "k"]):
        assert main([name, *argv]) == 6, argv
        err = capsys.readouterr().err
        assert "without its lock" in err and err.count("\n") == 1, err
    owner_view = shmkv.attach(name, user=65534)
    try:
        assert owner_view.stats(wait=False)["recoveries"] == 0  # nobody locked it
    finally:
        owner_view.close()
