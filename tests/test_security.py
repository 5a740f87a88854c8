"""Tables among neighbours: names that are safe wherever they travel, segments refused unless
they belong to whom the caller expects, tables handed to another user on purpose, removal
that removes one table and nothing else, and failed creates that leave nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from conftest import JOIN_TIMEOUT, join_all, unique_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmkv
from shmkv import _segment

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
SMALL = {"capacity": 8, "key_size": 8, "value_size": 8}


def path(name: str) -> str:
    return f"{_segment.SHM_DIR}/{name}"


def drop_to(uid: int, gid: int | None = None) -> None:
    os.setgroups([])
    os.setgid(uid if gid is None else gid)
    os.setuid(uid)


# ---------------------------------------------------------------------- names

BAD_NAMES = [
    "", ".", "..", "/lead", "a/b", "x:y", "a:shared_memory\nREGISTER:victim", "é", "tab\tle",
    "x\x1b[2J", "sem.shmkv-create.foo", "-dash", "a" * 201, "nul\0",
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_every_entry_point_refuses_a_bad_name_alike(bad: str) -> None:
    """create, attach, connect and unlink raise the same ValueError, before touching
    /dev/shm, for a name outside the portable set."""
    before = set(os.listdir(_segment.SHM_DIR))
    messages = set()
    for call in (lambda: shmkv.create(bad, **SMALL), lambda: shmkv.attach(bad),
                 lambda: shmkv.create(bad, **SMALL, exist_ok=True), lambda: shmkv.unlink(bad)):
        with pytest.raises(ValueError, match="invalid table name") as info:
            call()
        messages.add(str(info.value))
    if bad and "/" not in bad and "?" not in bad and "\0" not in bad:
        from urllib.parse import quote

        with pytest.raises(ValueError, match="invalid table name") as info:
            shmkv.connect("shm://" + quote(bad, safe=""))
        messages.add(str(info.value))
    assert len(messages) == 1
    assert "\n" not in messages.pop()  # repr escapes what would reach a terminal
    assert set(os.listdir(_segment.SHM_DIR)) - before == set()


@pytest.mark.parametrize("good", ["a", "sessions", "my-app.sessions_2", "_x", "9", "A" * 200])
def test_portable_names_work(good: str) -> None:
    name = f"{good[:150]}-{os.getpid()}" if len(good) < 150 else good[:190] + str(os.getpid())
    try:
        with shmkv.create(name, **SMALL) as t:
            t[b"k"] = b"v"
            with shmkv.attach(name) as again:
                assert again[b"k"] == b"v"
            t.unlink()
    finally:
        if os.path.exists(path(name)):
            os.unlink(path(name))


@pytest.mark.parametrize("url", ["shm://rv\turl", "shm://rv\nurl", "shm://a?capacity=8\r"])
def test_connect_refuses_control_characters(url: str) -> None:
    """urlsplit() drops tabs and newlines silently: "shm://rv\turl" named table "rvurl"."""
    with pytest.raises(ValueError, match="control characters"):
        shmkv.connect(url)


def test_table_cannot_be_another_tables_semaphore_or_tracker_line(make_name) -> None:
    """The names that once reached another table: glibc's semaphore file of a table, and a
    resource-tracker line that registered a victim."""
    victim = make_name()
    with shmkv.create(victim, **SMALL, exist_ok=True) as t:
        for bad in (f"sem.shmkv-create.{victim}", f"a:shared_memory\nREGISTER:/{victim}"):
            with pytest.raises(ValueError):
                shmkv.create(bad, **SMALL)
        t[b"k"] = b"v"
        assert os.listdir(_segment.SHM_DIR).count(victim) == 1


# ---------------------------------------------------------------------- owners


def _chown(name: str, uid: int, gid: int, mode: int) -> None:
    os.chown(path(name), uid, gid)
    os.chmod(path(name), mode)


@ROOT_ONLY
@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_another_users_table_is_refused_by_everyone(make_name, mode: int) -> None:
    """A table of another user (here nobody's; 0666, as the issue's attacker left it, or
    0600) is refused by attach, connect and create-or-attach, naming owner and mode."""
    name = make_name()
    with shmkv.create(name, **SMALL) as t:
        t[b"session"] = b"secret"
        t.unlink()
    with shmkv.create(name, **SMALL, exist_ok=True):
        pass
    _chown(name, NOBODY, NOBODY, mode)
    url = f"shm://{name}?capacity=8&key_size=8&value_size=8"
    for call in (lambda: shmkv.attach(name), lambda: shmkv.connect(url),
                 lambda: shmkv.connect(f"shm://{name}"),
                 lambda: shmkv.create(name, **SMALL, exist_ok=True)):
        with pytest.raises(shmkv.UntrustedTable, match=r"belongs to nobody \(uid 65534\)"):
            call()
    with pytest.raises(PermissionError, match=f"mode {mode:04o}"):
        shmkv.attach(name)
    # The one who trusts that user on purpose says so.
    with shmkv.attach(name, user=NOBODY, mode=mode | 0o600) as trusted:
        trusted.check()


def test_a_table_that_grants_more_than_asked_is_refused(make_name) -> None:
    """A table of ours that the group or others may write (chmod 0666 by a careless
    operator, or by the other user of a shared account) is refused unless asked for."""
    name = make_name()
    with shmkv.create(name, **SMALL):
        os.chmod(path(name), 0o666)
        with pytest.raises(shmkv.UntrustedTable, match="mode 0666 grants more than 0600"):
            shmkv.attach(name)
        with shmkv.attach(name, mode=0o666) as shared:
            shared[b"k"] = b"v"


def test_refused_before_anything_is_read(make_name) -> None:
    """A refused segment is not read: a write-only one of ours (0200) would fail any read;
    the refusal names the mode (an owner check that needed no read)."""
    name = make_name()
    with shmkv.create(name, **SMALL):
        os.chmod(path(name), 0o622)
        with pytest.raises(shmkv.UntrustedTable, match="0622"):
            shmkv.attach(name)


def test_bad_owner_arguments() -> None:
    with pytest.raises(ValueError, match="no user named"):
        shmkv.attach("x", user="no-such-user-here")
    with pytest.raises(ValueError, match="mode must give the owner"):
        shmkv.create(unique_name(), **SMALL, mode=0o644 | 0o100)
    with pytest.raises(ValueError, match="mode must give the owner"):
        shmkv.create(unique_name(), **SMALL, mode=0o400)
    with pytest.raises(TypeError, match="user must be an id"):
        shmkv.attach("x", user=1.5)  # type: ignore[arg-type]


def _worker_as_nobody(name: str, attach_args: dict[str, Any], conn: Any) -> None:
    """A child that drops to nobody, then attaches and counts, as a gunicorn worker would."""
    try:
        drop_to(NOBODY)
        with shmkv.attach(name, **attach_args) as t:
            conn.send(t.incr(b"hits"))
    except BaseException as exc:  # the parent asserts on what it gets
        conn.send(f"{type(exc).__name__}: {exc}")
    conn.close()


@ROOT_ONLY
@pytest.mark.parametrize("how", ["user", "group"])
def test_a_root_master_hands_its_table_to_the_workers_user(make_name, mp_context,
                                                           how: str) -> None:
    """user=: the table belongs to the workers' user, who attaches with no arguments, and the
    master attaches again with user=. group= and mode=0o660: the master keeps it, the
    workers' group may use it."""
    name = make_name()
    if how == "user":
        owner: dict[str, Any] = {"user": NOBODY}
        worker_args: dict[str, Any] = {}
    else:
        owner = {"group": NOBODY, "mode": 0o660}
        worker_args = {"user": 0, "group": NOBODY, "mode": 0o660}
    with shmkv.create(name, **SMALL, exist_ok=True, **owner) as t:
        st = os.stat(path(name))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
            (NOBODY, 0, 0o600) if how == "user" else (0, NOBODY, 0o660))
        parent, child = mp_context.Pipe()
        workers = [mp_context.Process(target=_worker_as_nobody, args=(name, worker_args, child))
                   for _ in range(2)]
        for w in workers:
            w.start()
        got = sorted(parent.recv() if parent.poll(JOIN_TIMEOUT) else "timeout" for _ in workers)
        assert join_all(workers) == [0, 0]
        assert got == [1, 2]
        t.check()
    with shmkv.create(name, **SMALL, exist_ok=True, **owner) as again:  # a restarted master
        assert again.incr(b"hits", 0) == 2
    with pytest.raises(shmkv.UntrustedTable):
        shmkv.attach(name)  # and without saying so, root does not take it


def _squat(name: str, conn: Any) -> None:
    drop_to(NOBODY)
    os.umask(0)
    t = shmkv.connect(f"shm://{name}?capacity=1000&key_size=64&value_size=2048&on_full=evict")
    os.chmod(path(name), 0o666)
    t.close()
    conn.send("ready")
    conn.close()


@ROOT_ONLY
def test_the_issues_takeover_is_refused(make_name, mp_context) -> None:
    """The issue's attack: another user creates the predictable table first and opens it to
    all; the real server's connect() refuses it instead of sharing sessions with it."""
    name = make_name()
    parent, child = mp_context.Pipe()
    p = mp_context.Process(target=_squat, args=(name, child))
    p.start()
    assert parent.poll(JOIN_TIMEOUT) and parent.recv() == "ready"
    assert join_all([p]) == [0]
    with pytest.raises(shmkv.UntrustedTable, match="nobody"):
        shmkv.connect(f"shm://{name}?capacity=1000&key_size=64&value_size=2048&on_full=evict")


# ---------------------------------------------------------------------- removal


def test_unlink_by_name(make_name) -> None:
    name = make_name()
    t = shmkv.create(name, **SMALL, exist_ok=True)
    shmkv.unlink(name)
    assert not os.path.exists(path(name))
    t[b"still"] = b"mapped"  # the mapping stays valid until closed
    t.close()
    with pytest.raises(FileNotFoundError, match="no table named"):
        shmkv.unlink(name)
    with pytest.raises(FileNotFoundError, match=f"no table named '{name}'"):
        shmkv.attach(name)


def test_unlink_leaves_what_is_not_a_table(make_name) -> None:
    name = make_name()
    fd = os.open(path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(fd, b"not ours" * 100)
    os.close(fd)
    with pytest.raises(shmkv.IncompatibleTable, match="not a shmkv table"):
        shmkv.unlink(name)
    assert os.path.exists(path(name))


@ROOT_ONLY
def test_unlink_refuses_another_users_table_unless_named(make_name) -> None:
    name = make_name()
    with shmkv.create(name, **SMALL, exist_ok=True):
        pass
    _chown(name, NOBODY, NOBODY, 0o600)
    with pytest.raises(shmkv.UntrustedTable, match="nobody"):
        shmkv.unlink(name)
    shmkv.unlink(name, user=NOBODY)
    assert not os.path.exists(path(name))


def test_a_stale_handle_does_not_remove_the_table_that_took_its_name(make_name) -> None:
    """Owner A's table is removed by someone else and B creates a new one of that name:
    A's unlink() says it is gone and leaves B's table alone."""
    name = make_name()
    a = shmkv.create(name, **SMALL)
    shmkv.unlink(name)
    with shmkv.create(name, **SMALL, exist_ok=True) as b:
        b[b"mine"] = b"B"
        with pytest.raises(FileNotFoundError, match="already removed"):
            a.unlink()
        a.close()
        assert shmkv.attach(name)[b"mine"] == b"B"


OWNER_SCRIPT = textwrap.dedent("""
    import sys, shmkv
    t = shmkv.create(sys.argv[1], capacity=8, key_size=8, value_size=8)
    print("created", flush=True)
    sys.stdin.readline()            # the parent removes it and creates another meanwhile
    t.close()
    print("exiting", flush=True)
""")


@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "removed"])
def test_the_owners_exit_removes_only_its_own_table(make_name, replaced: bool) -> None:
    """The issue's data loss: A creates t; an operator removes it; B creates a new t and
    fills it; when A exits, its resource tracker used to remove B's table. And when anyone
    but the owner removes a table, the owner used to warn at exit about a leaked object."""
    name = make_name()
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "created\n"
        assert subprocess.run([sys.executable, "-m", "shmkv", "--unlink", name, "--yes"],
                              capture_output=True, timeout=JOIN_TIMEOUT).returncode == 0
        if replaced:
            b = shmkv.create(name, **SMALL, exist_ok=True)
            b[b"k"] = b"B"
        out, err = owner.communicate("go\n", timeout=JOIN_TIMEOUT)
    finally:
        owner.kill()
    assert owner.returncode == 0, err
    assert "leaked" not in err and "Warning" not in err, err
    if replaced:
        with shmkv.attach(name) as again:
            assert again[b"k"] == b"B"
        b.close()
    else:
        assert not os.path.exists(path(name))


# ---------------------------------------------------------------------- killed creators


def _die_while_creating(name: str, conn: Any) -> None:
    """Creates a table and is killed half way: after the segment is sized, before the
    header is written (where a large reserve=True create spends its time)."""
    def stuck(fd: int, size: int, name: str) -> None:
        conn.send("sized")
        conn.recv()  # never answered: the parent kills us here

    _segment.reserve = stuck  # type: ignore[assignment]
    shmkv.create(name, capacity=1, key_size=8, value_size=1 << 20)


@pytest.mark.parametrize("then", ["attach", "create_exist_ok", "unlink", "cli_unlink"])
def test_a_creator_killed_while_creating(make_name, mp_context, then: str) -> None:
    """The issue's killed creator: attach says at once that the table was never finished
    (no 5 s wait: the dead creator's flock is gone), create-or-attach lays it anew, and
    shmkv.unlink or shmkv-inspect --unlink removes it. Nothing else is left behind."""
    name = make_name()
    parent, child = mp_context.Pipe()
    p = mp_context.Process(target=_die_while_creating, args=(name, child))
    p.start()
    assert parent.poll(JOIN_TIMEOUT) and parent.recv() == "sized"
    os.kill(p.pid, signal.SIGKILL)
    assert join_all([p]) == [-signal.SIGKILL]
    if then == "attach":
        with pytest.raises(shmkv.IncompatibleTable, match="never finished: its creator died"):
            shmkv.attach(name, lock_timeout=JOIN_TIMEOUT)  # would wait that long before
    elif then == "create_exist_ok":
        with shmkv.create(name, capacity=1, key_size=8, value_size=1 << 20,
                          exist_ok=True) as t:
            t[b"k"] = b"v"
            t.check()
    elif then == "unlink":
        shmkv.unlink(name)
    else:
        done = subprocess.run([sys.executable, "-m", "shmkv", "--unlink", name, "--yes"],
                              capture_output=True, text=True, timeout=JOIN_TIMEOUT)
        assert done.returncode == 0, done.stderr
    if then.endswith("unlink"):
        assert not os.path.exists(path(name))
    assert not [f for f in os.listdir(_segment.SHM_DIR) if name in f and f != name]


def _stall_before_locking(name: str, exist_ok: bool, conn: Any) -> None:
    """A creator that stops between creating the file and taking its flock (a stopped or
    starved process) until the parent says go; reports what its create() then did."""
    real_flock = _segment.flock

    def stalled(*args: Any) -> None:
        _segment.flock = real_flock  # type: ignore[assignment]
        conn.send("created the file")
        conn.recv()
        real_flock(*args)

    _segment.flock = stalled  # type: ignore[assignment]
    try:
        with shmkv.create(name, **SMALL, exist_ok=exist_ok) as t:
            conn.send(f"attached: {t.get(b'k')!r}")
    except Exception as exc:
        conn.send(type(exc).__name__)
    conn.close()


@pytest.mark.parametrize("exist_ok", [False, True], ids=["create", "create-exist-ok"])
def test_a_stalled_creator_never_removes_the_table_laid_over_its_file(
    make_name, mp_context, exist_ok: bool
) -> None:
    """A creator that stalls between creating the file and locking it, for longer than a
    create(exist_ok=True) waits, finds the table laid by that one when it wakes: it must not
    remove it (it used to, as its own failed create), and with exist_ok it attaches."""
    name = make_name()
    parent, child = mp_context.Pipe()
    p = mp_context.Process(target=_stall_before_locking, args=(name, exist_ok, child))
    p.start()
    assert parent.poll(JOIN_TIMEOUT) and parent.recv() == "created the file"
    with shmkv.create(name, **SMALL, exist_ok=True, lock_timeout=0.2) as t:
        t[b"k"] = b"B"
        parent.send("go")
        assert parent.poll(JOIN_TIMEOUT)
        outcome = parent.recv()
        assert join_all([p]) == [0]
        assert outcome == ("attached: b'B'" if exist_ok else "FileExistsError")
        with shmkv.attach(name) as again:
            assert again[b"k"] == b"B"


# ---------------------------------------------------------------------- failures leave nothing


def _mine(listing: set[str]) -> set[str]:
    """/dev/shm without the files of other test processes running beside this one: their
    tables, and multiprocessing's semaphores (sem.mp-...)."""
    others = re.compile(r"shmkv-test-(\d+)-")
    return {f for f in listing if not f.startswith("sem.mp-")
            and not ((m := others.search(f)) and int(m.group(1)) != os.getpid())}


def _snapshot() -> dict[str, bytes]:
    """Each file of /dev/shm that is this process's, and its bytes."""
    found = {}
    for f in _mine(set(os.listdir(_segment.SHM_DIR))):
        try:
            with open(path(f), "rb") as file:
                found[f] = file.read()
        except OSError:
            found[f] = b"?"
    return found


FAILURES = {
    "none": None,
    "owner": "apply",
    "reserve": "reserve",
    "map": "map_checked",
}


def _existing(name: str, kind: str) -> None:
    """What already has the name before the create: nothing, a table whose creator died
    after sizing it, an empty file, another program's segment, or a finished table."""
    if kind == "nothing":
        return
    if kind == "table":
        shmkv.create(name, capacity=4, key_size=4, value_size=4, exist_ok=True).close()
        return
    data = {"unfinished": _segment.MAGIC + bytes(4088), "empty": b"",
            "foreign": b"NOTSHMKV" + bytes(4088)}[kind]
    fd = os.open(path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, data)
    os.close(fd)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.one_of(st.sampled_from(BAD_NAMES), st.just("GOOD")),
    existing=st.sampled_from(["nothing", "unfinished", "empty", "foreign", "table"]),
    capacity=st.sampled_from([0, 1, 8, -1, 2**40, 1.5, "8"]),
    value_size=st.sampled_from([8, 0, 2**31, None]),
    on_full=st.sampled_from(["error", "evict", "bogus"]),
    lock_timeout=st.sampled_from([1.0, 0.0, float("inf"), float("nan"), -1.0, 1e-3]),
    mode=st.sampled_from([0o600, 0o660, 0o644, 0o700, "abc"]),
    exist_ok=st.booleans(),
    via_url=st.booleans(),
    failure=st.sampled_from(sorted(FAILURES)),
)
def test_a_create_that_raises_leaves_dev_shm_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch, name: str, existing: str, capacity: Any, value_size: Any,
    on_full: str, lock_timeout: float, mode: Any, exist_ok: bool, via_url: bool, failure: str,
) -> None:
    """Whatever the arguments, whatever has the name already, and wherever creation fails
    (owner, reserve, mapping), a create() or connect() that raises leaves /dev/shm as it was:
    the same files with the same bytes, except that an unfinished table may be left empty
    (still unfinished); one that succeeds adds exactly its table, or attaches."""
    good = name == "GOOD"
    if good:
        name = unique_name()
        _existing(name, existing)
    try:
        before = _snapshot()
        with monkeypatch.context() as patch:
            if FAILURES[failure]:
                def fail(*args: Any, **kwargs: Any) -> None:
                    raise OSError(28, f"injected failure in {failure}")

                target = _segment.Owner if failure == "owner" else _segment
                patch.setattr(target, FAILURES[failure], fail)
            params: dict[str, Any] = {"capacity": capacity, "key_size": 8, "on_full": on_full,
                                      "lock_timeout": lock_timeout, "mode": mode}
            if value_size is not None:
                params["value_size"] = value_size
            try:
                if via_url:
                    from urllib.parse import quote, urlencode

                    query = urlencode({k: oct(v)[2:] if k == "mode" and isinstance(v, int)
                                       else v for k, v in params.items()})
                    t = shmkv.connect(f"shm://{quote(name, safe='')}?{query}")
                else:
                    t = shmkv.create(name, exist_ok=exist_ok, **params)
            except Exception:
                after = _snapshot()
                if existing == "unfinished" and good and after.get(name) == b"":
                    after[name] = before[name]  # laid over, failed, left unfinished again
                assert after == before
                return
        assert set(_snapshot()) - set(before) == ({name} if existing == "nothing" else set())
        t.close()
    finally:
        if good and os.path.exists(path(name)):
            os.unlink(path(name))
