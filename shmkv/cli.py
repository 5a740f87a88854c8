"""shmkv-inspect: the operator's view of the shmkv tables on this machine.

    shmkv-inspect                      list the tables (foreign segments are skipped)
    shmkv-inspect NAME                 one table: geometry, fill, memory, counters, lock, probes
    shmkv-inspect NAME --keys [--prefix P] [--limit N]
    shmkv-inspect NAME --get KEY [--raw]
    shmkv-inspect NAME --check         verify every invariant
    shmkv-inspect NAME --watch SECONDS refresh the view in place until interrupted
    shmkv-inspect --unlink NAME --yes  remove a table
    --json                             any of these as JSON, for scripts

Exit codes: 0 ok, 1 check failed, 2 no such table, 3 not a shmkv table or an incompatible
layout, 4 no such key, 64 bad usage. Errors are one line on stderr. Inspecting never changes
a table (only --unlink --yes does), holds its lock only for one short read at a time, and
never registers the table with the resource tracker.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from typing import Any, NoReturn

from . import _open as opening
from . import _table
from .errors import CheckFailed, Error, IncompatibleTable, LockError, LockTimeout

SHM_DIR = "/dev/shm"
ATTACH_TIMEOUT = 0.5  # seconds to wait for a lock or a table being created

EXIT_OK, EXIT_CHECK, EXIT_NO_TABLE, EXIT_INCOMPATIBLE, EXIT_NO_KEY, EXIT_USAGE = 0, 1, 2, 3, 4, 64


class Failure(Exception):
    """A one-line message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shmkv-inspect", description="Inspect the shmkv tables on this machine.",
                epilog="Exit codes: 0 ok, 1 check failed, 2 no such table, 3 not a shmkv "
                       "table, 4 no such key, 64 bad usage.")
    p.add_argument("name", nargs="?", help="a table (without it: list every table)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--keys", action="store_true", help="list the table's keys")
    p.add_argument("--prefix", default="", help="with --keys: only keys starting with this")
    p.add_argument("--limit", type=int, default=None, help="with --keys: at most N keys")
    p.add_argument("--get", metavar="KEY", help="print one value (\\xNN escapes allowed)")
    p.add_argument("--raw", action="store_true", help="with --get: write the value's bytes")
    p.add_argument("--check", action="store_true", help="verify every invariant")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="refresh the one-table view every SECONDS until interrupted")
    p.add_argument("--count", type=int, default=None,
                   help="with --watch: stop after N refreshes")
    p.add_argument("--unlink", metavar="NAME", help="remove a table (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --unlink")
    return p


def escape(data: bytes) -> str:
    """Printable ASCII as it is, every other byte (and the backslash) as an escape."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in data)


def unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode())[0]


def _open(name: str) -> _table.Table:
    try:
        return opening.attach(name, lock_timeout=ATTACH_TIMEOUT)
    except FileNotFoundError:
        raise Failure(f"no such table: {name!r}", EXIT_NO_TABLE) from None
    except IncompatibleTable as exc:
        raise Failure(str(exc), EXIT_INCOMPATIBLE) from None
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot open {name!r}: {exc}", EXIT_NO_TABLE) from None


def summary(t: _table.Table, wait: bool = True) -> dict[str, Any]:
    """Counters, fill and memory: what the list shows of each table. Never waits long on a
    held lock (the very case an operator looks for): it then reads the counters without it,
    as it does at once with wait=False."""
    try:
        stats = t.stats(wait=wait)
    except (LockTimeout, LockError):
        stats = t.stats(wait=False)
    try:
        resident = os.stat(os.path.join(SHM_DIR, t.name)).st_blocks * 512
    except OSError:
        resident = None
    return {
        **stats,
        "fill": stats["len"] / stats["capacity"],
        "resident_bytes": resident,
        "creator_alive": _table.process_state(stats["creator_pid"]) is not None,
    }


def describe(t: _table.Table) -> dict[str, Any]:
    """Everything the one-table view shows, as plain data: the summary, the lock's holder
    and the probe lengths (unknown while another process holds the lock)."""
    from ._core import lib

    owner = int(lib.shmkv_lock_owner(t._h))
    try:
        probes: list[int] | None = t.probe_lengths()
    except (LockTimeout, LockError):
        probes = None
    return {
        **summary(t, wait=probes is not None),
        "lock": "free" if owner == 0 else _table._describe_owner(owner),
        "lock_owner_tid": owner,
        "probe_lengths": probes,
    }


def _row(t: _table.Table) -> dict[str, Any]:
    d = summary(t)
    keep = ("name", "capacity", "len", "fill", "segment_size", "resident_bytes",
            "creator_pid", "creator_alive", "broken")
    return {k: d[k] for k in keep}


def list_tables() -> list[dict[str, Any]]:
    """One row per shmkv table in /dev/shm; anything else there is skipped silently."""
    rows = []
    for entry in sorted(os.listdir(SHM_DIR)):
        if entry.startswith("sem.") or not os.path.isfile(os.path.join(SHM_DIR, entry)):
            continue
        try:
            t = opening.attach(entry, lock_timeout=ATTACH_TIMEOUT)
        except (Error, OSError, ValueError):
            continue
        try:
            rows.append(_row(t))
        except Error:
            pass
        finally:
            t.close()
    return rows


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no shmkv tables"
    lines = [f"{'NAME':<32} {'ENTRIES':>10} {'CAPACITY':>10} {'FILL':>6} {'RESERVED':>11} "
             f"{'RESIDENT':>11}  CREATOR"]
    for r in rows:
        creator = f"{r['creator_pid']} ({'alive' if r['creator_alive'] else 'gone'})"
        lines.append(f"{r['name']:<32} {r['len']:>10,} {r['capacity']:>10,} "
                     f"{r['fill']:>6.1%} {_size(r['segment_size']):>11} "
                     f"{_size(r['resident_bytes']):>11}  {creator}"
                     + ("  BROKEN" if r["broken"] else ""))
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
        f"  geometry  capacity {d['capacity']:,} entries, {d['index_slots']:,} index slots, "
        f"keys <= {d['key_size']:,} B, values <= {d['value_size']:,} B "
        f"({d['entry_size']:,} B per entry)",
        f"  fill      {d['len']:,} entries ({d['fill']:.1%}), {d['high_water']:,} pool entries "
        f"ever used; when full: {_ON_FULL[d['on_full']]}",
        f"  memory    {_size(d['segment_size'])} reserved, {_size(d['resident_bytes'])} resident",
        f"  counters  hits {d['hits']:,}  misses {d['misses']:,}  inserts {d['inserts']:,}  "
        f"updates {d['updates']:,}  deletes {d['deletes']:,}",
        f"            evictions {d['evictions']:,}  expirations {d['expirations']:,}  "
        f"recoveries {d['recoveries']:,}  lock timeouts {d['lock_timeouts']:,}",
        f"  lock      {d['lock']}",
        f"  creator   pid {d['creator_pid']} ({'alive' if d['creator_alive'] else 'gone'})",
        f"  probes    {probes}   (lookups that end at the n-th slot)",
    ])


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def run(args: argparse.Namespace) -> int:
    if args.unlink is not None:
        if not args.yes:
            raise Failure(f"refusing to unlink {args.unlink!r} without --yes", EXIT_USAGE)
        t = _open(args.unlink)  # only shmkv tables are ever removed
        try:
            t.unlink()
        finally:
            t.close()
        _emit(args, {"unlinked": args.unlink}, f"unlinked {args.unlink!r}")
        return EXIT_OK
    if args.name is None:
        if args.keys or args.get is not None or args.check or args.watch is not None:
            raise Failure("--keys, --get, --check and --watch need a table NAME", EXIT_USAGE)
        rows = list_tables()
        _emit(args, rows, format_list(rows))
        return EXIT_OK

    t = _open(args.name)
    try:
        if args.keys:
            prefix = unescape(args.prefix)
            keys = [k for k in t if k.startswith(prefix)]
            keys.sort()
            if args.limit is not None:
                keys = keys[: max(args.limit, 0)]
            _emit(args, [escape(k) for k in keys], "\n".join(escape(k) for k in keys))
        elif args.get is not None:
            key = unescape(args.get)
            value = t.get(key)
            if value is None:
                raise Failure(f"no key {escape(key)!r} in table {args.name!r}", EXIT_NO_KEY)
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
            _emit(args, {"ok": True}, f"ok: table {args.name!r} holds every invariant")
        elif args.watch is not None:
            if args.watch <= 0:
                raise Failure("--watch needs a positive number of seconds", EXIT_USAGE)
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
        else:
            d = describe(t)
            _emit(args, d, format_table(d))
    finally:
        t.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Runs shmkv-inspect with argv (default: the command line) and returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except Failure as exc:
        print(f"shmkv-inspect: {exc}", file=sys.stderr)
        return exc.code
    except Error as exc:
        print(f"shmkv-inspect: {exc}", file=sys.stderr)
        return EXIT_INCOMPATIBLE
    except OSError as exc:
        print(f"shmkv-inspect: {exc}", file=sys.stderr)
        return EXIT_NO_TABLE


if __name__ == "__main__":
    sys.exit(main())
