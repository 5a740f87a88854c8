r"""shmkv-inspect: the operator's view of the shmkv tables on this machine.

    shmkv-inspect [--all]              list the tables (--all: every other file in /dev/shm too)
    shmkv-inspect NAME                 one table: owner, geometry, fill, memory, counters, lock
    shmkv-inspect NAME --keys [--prefix P] [--limit N]
    shmkv-inspect NAME --get KEY [--raw]
    shmkv-inspect NAME --check         verify every invariant
    shmkv-inspect NAME --watch SECONDS [--count N]   refresh the view in place
    shmkv-inspect [NAME] --prometheus  counters and memory in Prometheus' text format
    shmkv-inspect --unlink NAME --yes  remove a table (also one its creator never finished)
    --json                             any of these as JSON, for scripts
    --lock-timeout SECONDS             how long one read waits for a held lock (default 0.5)

Inspecting changes nothing. Every handle it opens is an observer, which adds nothing to the
table's shared counters (no hit, miss or lock timeout: `--get` counts no hit); it holds the
lock only for one short read at a time, never waits for an unfinished table, and never
registers a table with the resource tracker. Only `--unlink NAME --yes` changes anything.

Whose tables. It reads every table it can open, whoever owns it (run by root: every user's),
without the owner check that attach() makes, since it only reads; and it says whose each one
is: OWNER is the user name (the uid when it has none) and the mode, as in `alice 0600`.
`--unlink` removes only the caller's own tables, except when run by root.

Escaping. Whatever it prints that came from a segment, from /dev/shm or from the command line
(table names, keys, values, messages) reaches the terminal escaped: bytes other than printable
ASCII, and the backslash, as \xNN; in messages, unprintable characters as \xNN or \uNNNN.
`--raw` is the one exception: it writes the bytes of the one value asked for. KEY and P take
the same escapes back (\xNN, and \\ for a backslash).

The listing shows the shmkv tables in /dev/shm, the unfinished ones (empty, or never marked
ready by their creator, which may have died while creating them: `--unlink` removes them)
and the incompatible ones (shmkv's magic, but another format version or a damaged header).
Any other file there (other programs' segments, semaphores, names that are not valid table
names, files the caller may not read) is not listed, only counted in a last line; `--all`
lists those too, with the reason, their names escaped.

The exit codes are listed once, in EXIT_CODES_HELP below, which --help prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import stat
import sys
import time
from typing import Any, Callable, NoReturn

from . import _open as opening
from . import _segment, _table
from .errors import (
    CheckFailed,
    Error,
    IncompatibleTable,
    LockError,
    LockTimeout,
    UntrustedTable,
)

SHM_DIR = "/dev/shm"
DEFAULT_LOCK_TIMEOUT = 0.5  # seconds one read waits for a lock another process holds

EXIT_OK = 0
EXIT_CHECK = 1
EXIT_NO_TABLE = 2
EXIT_INCOMPATIBLE = 3
EXIT_NO_KEY = 4
EXIT_LOCKED = 5
EXIT_PERMISSION = 6
EXIT_USAGE = 64

EXIT_CODES_HELP = """\
exit codes:
  0   ok
  1   --check found a violated invariant
  2   no such table
  3   not a shmkv table: foreign, another layout, unfinished, or damaged
  4   no such key (--get)
  5   the table's lock is held by another process (waited --lock-timeout): try again
  6   permission denied: the table belongs to another user (run as that user, or root)
  64  bad usage: a bad argument, a flag that does not apply, an invalid table name
Errors are one line on stderr."""


class Failure(Exception):
    """A one-line message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- escaping


def escape(data: bytes) -> str:
    """Printable ASCII as it is, every other byte (and the backslash) as ``\\xNN``: how
    bytes from a segment or from /dev/shm are shown. Never raises."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in data)


def unescape(text: str) -> bytes:
    """The bytes that ``text`` escapes: ``\\xNN`` is byte NN, ``\\\\`` a backslash, anything
    else stands for its own UTF-8 bytes (or, for undecodable command-line bytes, those
    bytes). The inverse of :func:`escape`. Raises ValueError for any other escape."""
    raw = os.fsencode(text)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] != 92:  # backslash
            out.append(raw[i])
            i += 1
        elif raw[i + 1 : i + 2] == b"\\":
            out.append(92)
            i += 2
        elif raw[i + 1 : i + 2] == b"x" and _is_hex(raw[i + 2 : i + 4]):
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        else:
            raise ValueError(f"bad escape at position {i} of {text!r}: use \\xNN for a byte "
                             "and \\\\ for a backslash")
    return bytes(out)


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


def clean(text: str) -> str:
    """``text`` with every unprintable character (controls, escape sequences, line breaks,
    undecodable bytes, invisible format characters) escaped, fit for one terminal line."""
    return "".join(c if c.isprintable() else _escape_char(ord(c)) for c in text)


def _escape_char(n: int) -> str:
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def shown_name(entry: str) -> str:
    """A file name of /dev/shm as it is printed: a valid table name is unchanged."""
    return escape(os.fsencode(entry))


# ---------------------------------------------------------------------- owners


def _user(uid: int) -> str:
    try:
        return clean(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return str(uid)


def owner(st: os.stat_result) -> dict[str, Any]:
    """Whose a segment is: ``owner`` (user name, or uid), ``uid`` and ``mode`` ("0600")."""
    return {"owner": _user(st.st_uid), "uid": st.st_uid,
            "mode": f"{stat.S_IMODE(st.st_mode):04o}"}


def _fstat(t: _table.Table) -> os.stat_result | None:
    # The very segment this handle maps; by its path only if the handle has no descriptor.
    try:
        return os.fstat(t._segment._fd)
    except (AttributeError, OSError):
        try:
            return os.stat(os.path.join(SHM_DIR, t.name))
        except OSError:
            return None


# ---------------------------------------------------------------------- opening


def _open(name: str, lock_timeout: float) -> _table.Table:
    """Opens a table to read it, whoever owns it, as an observer. Failure with the exit
    code for a missing, foreign, unfinished or unreadable table."""
    try:
        t = opening.attach(name, lock_timeout=lock_timeout, _inspect=True)
    except FileNotFoundError:
        raise Failure(f"no such table: {name!r}", EXIT_NO_TABLE) from None
    except IncompatibleTable as exc:
        raise Failure(str(exc), EXIT_INCOMPATIBLE) from None
    except PermissionError as exc:  # says whose it is
        raise Failure(f"{exc}; run as its owner or as root", EXIT_PERMISSION) from None
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot open table {name!r}: {exc}", EXIT_INCOMPATIBLE) from None
    _observe(t)
    return t


def _observe(t: _table.Table) -> None:
    # Inspecting must change nothing, not even the table's hit and lock-timeout counters.
    make_observer: Callable[[], None] | None = getattr(t, "_make_observer", None)
    if make_observer is not None:
        make_observer()


# ---------------------------------------------------------------------- one table


def summary(t: _table.Table, wait: bool = True) -> dict[str, Any]:
    """Counters, fill, memory and owner: what the list shows of each table. Never waits
    longer than the handle's lock timeout on a held lock (the very case an operator looks
    for): it then reads the counters without it, as it does at once with wait=False."""
    try:
        stats = t.stats(wait=wait)
    except (LockTimeout, LockError, UntrustedTable):  # held, damaged, or not ours to lock
        stats = t.stats(wait=False)
    st = _fstat(t)
    return {
        **stats,
        "fill": stats["len"] / stats["capacity"],
        "resident_bytes": None if st is None else st.st_blocks * 512,
        "creator_alive": _table.process_state(stats["creator_pid"]) is not None,
        **(owner(st) if st is not None else {"owner": "?", "uid": None, "mode": "?"}),
    }


def describe(t: _table.Table) -> dict[str, Any]:
    """Everything the one-table view shows, as plain data: the summary, the lock's holder
    and the probe lengths (unknown while another process holds the lock)."""
    from ._core import lib

    holder = int(lib.shmkv_lock_owner(t._h))
    held_by = t._lock_holder()  # a holder of another PID namespace is never named as local
    try:
        probes: list[int] | None = t.probe_lengths()
    except (LockTimeout, LockError, UntrustedTable):  # held, damaged, or not ours to lock
        probes = None
    return {
        **summary(t, wait=probes is not None),
        "lock": "free" if holder == 0 else held_by,
        "lock_owner_tid": holder,
        "probe_lengths": probes,
    }


# ---------------------------------------------------------------------- the listing

_ROW_KEYS = ("name", "capacity", "len", "fill", "segment_size", "resident_bytes",
             "creator_pid", "creator_alive", "broken", "owner", "uid", "mode")


def _list_row(entry: str, lock_timeout: float) -> dict[str, Any] | None:
    """What the listing says of one file in /dev/shm: status "table", "unfinished" or
    "incompatible" (a shmkv table this build cannot read: another format version, damaged)
    or "other" (with a reason); None if it vanished meanwhile."""
    path = os.path.join(SHM_DIR, entry)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"name": shown_name(entry), "status": "other", "reason": clean(str(exc))}
    row: dict[str, Any] = {"name": shown_name(entry), **owner(st), "size": st.st_size}

    def other(reason: str) -> dict[str, Any]:
        return {**row, "status": "other", "reason": clean(reason)}

    if not stat.S_ISREG(st.st_mode):
        return other("not a regular file")
    try:
        _segment.check_name(entry)
    except (ValueError, TypeError):
        return other("semaphore" if entry.startswith("sem.") else "not a valid table name")
    if st.st_size == 0:
        return other("empty: another program's, or a table whose creator died before "
                     "sizing it")
    try:
        t = opening.attach(entry, lock_timeout=lock_timeout, _inspect=True)
    except FileNotFoundError:
        return None
    except IncompatibleTable as exc:
        head = _head(path)  # tells shmkv's own files from those of another program
        if head == _segment.MAGIC and _unfinished(exc):
            return {**row, "status": "unfinished"}
        if head == _segment.MAGIC:
            return {**row, "status": "incompatible", "reason": clean(str(exc))}
        return other(str(exc))
    except PermissionError:
        return other("permission denied")
    except (Error, OSError, ValueError) as exc:
        return other(str(exc))
    try:
        _observe(t)
        d = summary(t)
    except Error as exc:
        return other(str(exc))
    finally:
        t.close()
    return {**{k: d[k] for k in _ROW_KEYS}, "size": st.st_size, "status": "table"}


def _head(path: str) -> bytes | None:
    """The first 8 bytes of a file (where a table, even an unfinished one, has its magic);
    None if they cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.pread(fd, len(_segment.MAGIC), 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _unfinished(exc: IncompatibleTable) -> bool:
    # attach(_inspect=True) raises at once, rather than wait, for a table whose creator is
    # at work or died at work (flock held, or header never marked ready, or file empty).
    return exc.code_name == "SHMKV_ENOTREADY" or any(
        words in str(exc) for words in ("never finished", "being created"))


def list_tables(everything: bool = False,
                lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[list[dict[str, Any]], int]:
    """The rows of the listing, and how many other files of /dev/shm it leaves out (none
    with ``everything``). Never waits for an unfinished table. Raises OSError if /dev/shm
    cannot be read."""
    rows: list[dict[str, Any]] = []
    others = 0
    for entry in sorted(os.listdir(SHM_DIR)):
        row = _list_row(entry, lock_timeout)
        if row is None:
            continue
        if row["status"] != "other" or everything:
            rows.append(row)
        else:
            others += 1
    return rows, others


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _rooms(d: dict[str, Any]) -> str:
    """The free room in words: how large an entry fits now and how scattered the room is."""
    if d["largest_item"] is None:
        return "unknown while the lock is held"
    return (f"an entry of up to {_size(d['largest_item'])} fits now; "
            f"{d['free_blocks']:,} free block{'s' if d['free_blocks'] != 1 else ''}, "
            f"largest {_size(d['largest_free'])} ({d['fragmentation']:.0%} fragmented); "
            f"{d['compactions']:,} compactions moved {_size(d['moved_bytes'])}")


def format_list(rows: list[dict[str, Any]], others: int) -> str:
    lines = [f"{'NAME':<32} {'ENTRIES':>10} {'CAPACITY':>10} {'FILL':>6} {'RESERVED':>11} "
             f"{'RESIDENT':>11}  {'OWNER':<16} CREATOR"] if rows else ["no shmkv tables"]
    for r in rows:
        whose = f"{r['owner']} {r['mode']}"
        if r["status"] == "table":
            creator = f"{r['creator_pid']} ({'alive' if r['creator_alive'] else 'gone'})"
            lines.append(f"{r['name']:<32} {r['len']:>10,} {r['capacity']:>10,} "
                         f"{r['fill']:>6.1%} {_size(r['segment_size']):>11} "
                         f"{_size(r['resident_bytes']):>11}  {whose:<16} {creator}"
                         + ("  BROKEN" if r["broken"] else ""))
            continue
        what = {"unfinished": "UNFINISHED: never made ready (did its creator die?); "
                              "--unlink removes it",
                "incompatible": f"INCOMPATIBLE: {r.get('reason')}"}.get(
                    r["status"], f"NOT SHMKV: {r.get('reason')}")
        lines.append(f"{r['name']:<32} {'-':>10} {'-':>10} {'-':>6} "
                     f"{_size(r.get('size')):>11} {'':>11}  {whose:<16} {what}")
    if others:
        lines.append(f"(not shown: {others:,} other file{'s' if others != 1 else ''} in "
                     f"{SHM_DIR}; --all lists {'them' if others != 1 else 'it'})")
    return "\n".join(lines)


_ON_FULL = {"error": "TableFull", "evict": "evict (CLOCK)"}


def format_table(d: dict[str, Any]) -> str:
    hist = d["probe_lengths"]
    probes = ("unknown while the lock is held" if hist is None else
              "  ".join(f"{i + 1}{'+' if i == len(hist) - 1 else ''}:{n:,}"
                        for i, n in enumerate(hist) if n) or "none")
    return "\n".join([
        f"table {d['name']!r} (format {d['version']})"
        + ("  BROKEN: recreate it" if d["broken"] else ""),
        f"  owner     {d['owner']} (uid {d['uid']}), mode {d['mode']}",
        f"  geometry  capacity {d['capacity']:,} keys, {d['index_slots']:,} index slots, "
        f"keys <= {d['key_size']:,} B, values <= {d['value_size']:,} B",
        f"  fill      {d['len']:,} keys ({d['fill']:.1%}); when full: {_ON_FULL[d['on_full']]}",
        f"  bytes     {_size(d['bytes_stored'])} of keys and values, "
        f"{_size(d['bytes_used'])} used of a {_size(d['data_size'])} data area, "
        f"{_size(d['bytes_free'])} free",
        f"  free room {_rooms(d)}",
        f"  memory    {_size(d['segment_size'])} reserved "
        f"({'capped by memory=' if d['memory'] else 'sized for capacity'}), "
        f"{_size(d['resident_bytes'])} resident",
        f"  counters  hits {d['hits']:,}  misses {d['misses']:,}  inserts {d['inserts']:,}  "
        f"updates {d['updates']:,}  deletes {d['deletes']:,}",
        f"            evictions {d['evictions']:,}  expirations {d['expirations']:,}  "
        f"recoveries {d['recoveries']:,}  lock timeouts {d['lock_timeouts']:,}",
        f"  lock      {d['lock']}",
        f"  creator   pid {d['creator_pid']} ({'alive' if d['creator_alive'] else 'gone'})",
        f"  probes    {probes}   (lookups that end at the n-th slot)",
    ])


# ---------------------------------------------------------------------- Prometheus

#: (stats key, metric name, help) of the counters, which only ever grow.
PROMETHEUS_COUNTERS = (
    ("hits", "shmkv_hits_total", "Lookups that found their key."),
    ("misses", "shmkv_misses_total", "Lookups that did not find their key."),
    ("inserts", "shmkv_inserts_total", "Keys stored that were absent."),
    ("updates", "shmkv_updates_total", "Values replaced."),
    ("deletes", "shmkv_deletes_total", "Keys removed by a call."),
    ("evictions", "shmkv_evictions_total", "Live keys evicted to make room."),
    ("expirations", "shmkv_expirations_total", "Expired keys whose room was reclaimed."),
    ("recoveries", "shmkv_recoveries_total",
     "Repairs after a process died holding the lock."),
    ("lock_timeouts", "shmkv_lock_timeouts_total", "Calls that gave up waiting for the lock."),
    ("compactions", "shmkv_compactions_total", "Compactions of the data area."),
    ("moved_bytes", "shmkv_compaction_moved_bytes_total", "Bytes moved by compactions."),
)
#: (stats key, metric name, help) of the gauges.
PROMETHEUS_GAUGES = (
    ("len", "shmkv_keys", "Keys held (expired ones not reclaimed yet included)."),
    ("capacity", "shmkv_capacity_keys", "Most keys the table holds."),
    ("fill", "shmkv_fill_ratio", "Keys held over capacity."),
    ("bytes_stored", "shmkv_stored_bytes", "Bytes of keys and values."),
    ("bytes_used", "shmkv_used_bytes", "Bytes of the data area in use."),
    ("bytes_free", "shmkv_free_bytes", "Bytes of the data area free."),
    ("largest_free", "shmkv_largest_free_block_bytes", "The largest free block of the data area."),
    ("data_size", "shmkv_data_area_bytes", "Size of the data area."),
    ("segment_size", "shmkv_segment_bytes", "Size of the shared-memory segment."),
    ("resident_bytes", "shmkv_resident_bytes", "Bytes of the segment tmpfs has allocated."),
    ("key_size", "shmkv_key_size_bytes", "Longest key allowed."),
    ("value_size", "shmkv_value_size_bytes", "Longest value allowed."),
    ("broken", "shmkv_broken", "1 if the table was found damaged beyond repair."),
)


def prometheus_label(value: str) -> str:
    """A label value escaped as the text exposition format asks: backslash, double quote
    and line feed as \\\\, \\" and \\n."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def format_prometheus(tables: list[dict[str, Any]]) -> str:
    """The summaries of tables (see :func:`summary`) in Prometheus' text exposition format
    (version 0.0.4): one HELP and one TYPE line per metric, one sample per table, labelled
    ``table="NAME"``; ``shmkv_table_info`` carries the owner, mode, format and policy."""
    lines = ["# HELP shmkv_tables Tables found.", "# TYPE shmkv_tables gauge",
             f"shmkv_tables {len(tables)}",
             "# HELP shmkv_table_info A table's owner, mode, format version and policy.",
             "# TYPE shmkv_table_info gauge"]
    for d in tables:
        labels = ",".join(f'{key}="{prometheus_label(str(value))}"' for key, value in (
            ("table", d["name"]), ("owner", d["owner"]), ("mode", d["mode"]),
            ("format", d["version"]), ("on_full", d["on_full"])))
        lines.append(f"shmkv_table_info{{{labels}}} 1")
    for kind, metrics in (("counter", PROMETHEUS_COUNTERS), ("gauge", PROMETHEUS_GAUGES)):
        for key, metric, text in metrics:
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
            lines += [f'{metric}{{table="{prometheus_label(d["name"])}"}} {_sample(d[key])}'
                      for d in tables if d.get(key) is not None]
    return "\n".join(lines) + "\n"


def prometheus(names: list[str] | None = None,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> str:
    """Every table's counters and memory (or those of the named tables) in Prometheus' text
    format: what ``shmkv-inspect --prometheus`` prints, for a /metrics handler. Reads like
    the listing: as an observer, never waiting longer than lock_timeout. A table that
    vanishes or cannot be read meanwhile is left out; a named one raises Failure."""
    explicit = names is not None
    if names is None:
        rows, _ = list_tables(False, lock_timeout)
        names = [row["name"] for row in rows if row["status"] == "table"]
    tables = []
    for name in names:
        try:
            t = _open(name, lock_timeout)
        except Failure:
            if explicit:
                raise
            continue
        try:
            tables.append(summary(t))
        finally:
            t.close()
    return format_prometheus(tables)


# ---------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, escaped (argparse quotes unrecognised arguments raw), and where to look.
        self.exit(EXIT_USAGE, f"{self.prog}: {clean(message)} (see {self.prog} --help)\n")


def _count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, not {n}")
        return n

    return parse


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(s) and 0 < s <= 86400):
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, "
                                         f"not {text!r}")
    return s


_DESCRIPTION = """\
Inspect the shmkv tables on this machine; root sees every user's. Inspecting changes
nothing (only --unlink NAME --yes does). Whatever comes from a table or from /dev/shm is
printed escaped (\\xNN), except the one value that --raw writes.

The listing shows each shmkv table with its OWNER (user and mode), the unfinished ones
(empty, or never marked ready by a creator that may have died: --unlink removes them) and
the incompatible ones (another format version, or a damaged header).
Other files in /dev/shm, names that are not valid table names among them, are only
counted; --all lists them too, names escaped."""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shmkv-inspect", description=_DESCRIPTION,
                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a table (without it: list the tables and the unfinished ones)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--all", action="store_true",
                   help="when listing: also the other files in /dev/shm, with the reason")
    command = p.add_mutually_exclusive_group()
    command.add_argument("--keys", action="store_true", help="list the table's keys, escaped")
    command.add_argument("--get", metavar="KEY",
                         help="print one value, escaped (\\xNN escapes allowed in KEY); "
                         "counts no hit or miss")
    command.add_argument("--check", action="store_true", help="verify every invariant")
    command.add_argument("--watch", type=_seconds, metavar="SECONDS",
                         help="refresh the one-table view every SECONDS until interrupted")
    command.add_argument("--prometheus", action="store_true",
                         help="every table's counters and memory (or NAME's) in Prometheus' "
                         "text format, for node_exporter's textfile collector")
    command.add_argument("--unlink", metavar="NAME",
                         help="remove a table, or an unfinished one (needs --yes)")
    p.add_argument("--prefix", metavar="P", help="with --keys: only keys starting with P")
    p.add_argument("--limit", type=_count(0), metavar="N", help="with --keys: at most N keys")
    p.add_argument("--raw", action="store_true",
                   help="with --get: write the value's bytes unescaped")
    p.add_argument("--count", type=_count(1), metavar="N",
                   help="with --watch: stop after N refreshes")
    p.add_argument("--yes", action="store_true", help="confirm --unlink")
    p.add_argument("--lock-timeout", type=_seconds, metavar="SECONDS",
                   help=f"how long one read waits for a lock another process holds "
                   f"(default {DEFAULT_LOCK_TIMEOUT:g}); then: exit {EXIT_LOCKED}")
    return p


def _check_usage(args: argparse.Namespace) -> None:
    """Failure(EXIT_USAGE) for flags that do not apply to the command given."""
    def needs(flag: str, given: bool, needed: str, present: bool) -> None:
        if given and not present:
            raise Failure(f"{flag} applies only with {needed}", EXIT_USAGE)

    needs("--prefix", args.prefix is not None, "--keys", args.keys)
    needs("--limit", args.limit is not None, "--keys", args.keys)
    needs("--raw", args.raw, "--get", args.get is not None)
    needs("--count", args.count is not None, "--watch", args.watch is not None)
    needs("--yes", args.yes, "--unlink", args.unlink is not None)
    if args.prometheus and (args.json or args.all):
        raise Failure("--prometheus takes neither --json nor --all", EXIT_USAGE)
    if args.raw and args.json:
        raise Failure("--raw and --json exclude each other", EXIT_USAGE)
    if args.unlink is not None:
        if args.name is not None:
            raise Failure("--unlink NAME takes no other NAME", EXIT_USAGE)
        if args.lock_timeout is not None:
            raise Failure("--lock-timeout does not apply to --unlink", EXIT_USAGE)
    if args.all and (args.name is not None or args.unlink is not None):
        raise Failure("--all applies only to the listing (no NAME)", EXIT_USAGE)
    if args.name is None and (args.keys or args.get is not None or args.check
                              or args.watch is not None):
        raise Failure("--keys, --get, --check and --watch need a table NAME", EXIT_USAGE)


def _name(text: str) -> str:
    try:
        return _segment.check_name(text)
    except (ValueError, TypeError) as exc:
        raise Failure(str(exc), EXIT_USAGE) from None


# ---------------------------------------------------------------------- running


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _unlink(name: str, args: argparse.Namespace) -> int:
    """Removes a table of the caller's (root: anyone's), or an unfinished one, through
    shmkv.unlink(); anything else found under that name is left alone."""
    user = None
    if os.geteuid() == 0:
        try:
            user = os.lstat(os.path.join(SHM_DIR, name)).st_uid  # root removes anyone's
        except FileNotFoundError:
            raise Failure(f"no such table: {name!r}", EXIT_NO_TABLE) from None
    try:
        _segment.unlink(name, user=user)
    except FileNotFoundError:
        raise Failure(f"no such table: {name!r}", EXIT_NO_TABLE) from None
    except PermissionError as exc:  # UntrustedTable too: both say whose it is
        raise Failure(f"{exc}; only its owner or root may remove it",
                      EXIT_PERMISSION) from None
    except IncompatibleTable as exc:
        raise Failure(f"not removing {name!r}: {exc}", EXIT_INCOMPATIBLE) from None
    _emit(args, {"unlinked": name}, f"unlinked {name!r}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Runs the parsed command; returns the exit code. Raises Failure (a message and an
    exit code), or the shmkv Error or OSError that main() turns into one."""
    _check_usage(args)
    if args.unlink is not None:
        if not args.yes:
            raise Failure(f"refusing to unlink {_name(args.unlink)!r} without --yes",
                          EXIT_USAGE)
        return _unlink(_name(args.unlink), args)
    lock_timeout = args.lock_timeout or DEFAULT_LOCK_TIMEOUT
    if args.prometheus:
        names = None if args.name is None else [_name(args.name)]
        sys.stdout.write(prometheus(names, lock_timeout))
        return EXIT_OK
    if args.name is None:
        rows, others = list_tables(args.all, lock_timeout)
        _emit(args, rows, format_list(rows, others))
        return EXIT_OK

    name = _name(args.name)
    prefix = _unescape(args.prefix, "--prefix") if args.prefix is not None else b""
    key = _unescape(args.get, "--get") if args.get is not None else b""
    t = _open(name, lock_timeout)
    try:
        if args.keys:
            keys = sorted(k for k in t if k.startswith(prefix))
            if args.limit is not None:
                keys = keys[: args.limit]
            _emit(args, [escape(k) for k in keys], "\n".join(escape(k) for k in keys))
        elif args.get is not None:
            value = t.get(key) if len(key) <= t.key_size else None
            if value is None:
                raise Failure(f"no key {escape(key)!r} in table {name!r}", EXIT_NO_KEY)
            if args.raw:
                sys.stdout.buffer.write(value)
                sys.stdout.flush()
            else:
                _emit(args, {"key": escape(key), "value": escape(value)}, escape(value))
        elif args.check:
            try:
                t.check()
            except CheckFailed as exc:
                if args.json:
                    print(json.dumps({"ok": False, "invariant": exc.invariant,
                                      "message": str(exc)}))
                raise Failure(str(exc), EXIT_CHECK) from None
            _emit(args, {"ok": True}, f"ok: table {name!r} holds every invariant")
        elif args.watch is not None:
            _watch(t, args)
        else:
            d = describe(t)
            _emit(args, d, format_table(d))
    finally:
        t.close()
    return EXIT_OK


def _unescape(text: str, flag: str) -> bytes:
    try:
        return unescape(text)
    except ValueError as exc:
        raise Failure(f"{flag}: {exc}", EXIT_USAGE) from None


def _watch(t: _table.Table, args: argparse.Namespace) -> None:
    shown = 0
    try:
        while args.count is None or shown < args.count:
            if shown:
                time.sleep(args.watch)
            d = describe(t)
            if args.json:
                print(json.dumps(d), flush=True)
            else:
                print("\x1b[H\x1b[2J" + format_table(d)
                      + f"\n\n  {time.strftime('%H:%M:%S')}, every {args.watch:g} s; "
                      "Ctrl-C to stop", flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    """Runs shmkv-inspect with argv (default: the command line) and returns the exit code
    (see EXIT_CODES_HELP). Raises nothing for a bad table or bad arguments: it prints one
    line on stderr and returns the code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return run(args)
    except Failure as exc:
        return _fail(str(exc), exc.code)
    except LockTimeout as exc:
        return _fail(f"{exc}; try again", EXIT_LOCKED)
    except PermissionError as exc:
        return _fail(str(exc), EXIT_PERMISSION)
    except FileNotFoundError as exc:
        return _fail(f"no such table (removed meanwhile?): {exc}", EXIT_NO_TABLE)
    except BrokenPipeError:
        # The reader went away (| head): nothing left to say, and nobody to say it to.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK
    except (Error, OSError) as exc:
        return _fail(str(exc), EXIT_INCOMPATIBLE)


def _fail(message: str, code: int) -> int:
    hint = " (see shmkv-inspect --help)" if code == EXIT_USAGE else ""
    print(f"shmkv-inspect: {clean(message)}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
