"""SQLite implementations of the router's stores.

One file holds the state: run-time policy changes with their audit trail, the
YAML observations that decide precedence, registrations, and call records.
WAL mode lets the CLI read and write while the router runs.  A database that
cannot be opened, read or written is a ``StateError`` naming the file and why
(the router exits with its own status; the CLI prints one line).

The file carries its schema version in ``PRAGMA user_version``; opening it runs the
migrations it lacks, in order, in one transaction.  A file made by a newer sip-router
is refused rather than guessed at.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from router.errors import RouterError
from router.policy.effective import FIELDS, Change, Key, SeenAt, yaml_value
from router.policy.model import Binding, Policy
from router.records import CallRecord
from router.store.interfaces import DeviceBindings
from router.store.rows import COLUMNS, bindings_of
from router.userhash import user_hash


class StateError(RouterError):
    """The state database cannot be opened, read or written; names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"state database {path}: {reason}")


class MissingDatabase(StateError):
    """There is no state database at the path (only the router and the web app create one)."""

    def __init__(self, path: str, reason: str = "no such file") -> None:
        super().__init__(path, reason)


def describe(exc: BaseException) -> str:
    """A one-line reason for an OS or SQLite error, for a person to act on."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc) or type(exc).__name__


NOT_A_DATABASE = ("file is not a database: restore it from a backup, or move it aside and the router "
                  "starts a new, empty one (without the run-time changes, audit and registrations)")
_MAGIC = b"SQLite format 3\x00"       # the first 16 bytes of every SQLite database file
_NEVER = float("-inf")                     # earlier than any time seen
_ABSENT = object()                       # no such user in the policy: equal to no stored value


# ------------------------------------------------------------------ schema versions
# Each step takes the database from version i to i + 1 (the step at index 0 makes version 1).
# A database made before versions were recorded says 0 and may already hold part of what
# the steps make, so every step tolerates finding its work done.  Append new steps; never
# edit one that has shipped.

def _v1_first_release(conn: sqlite3.Connection) -> None:
    for statement in (
        """CREATE TABLE IF NOT EXISTS yaml_values (
            user_id TEXT NOT NULL, field TEXT NOT NULL, value TEXT, seen_at REAL NOT NULL,
            PRIMARY KEY (user_id, field))""",
        """CREATE TABLE IF NOT EXISTS changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, field TEXT NOT NULL,
            old TEXT, new TEXT, actor TEXT NOT NULL, via TEXT NOT NULL, at REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS changes_user ON changes (user_id, field, id)",
        """CREATE TABLE IF NOT EXISTS bindings (
            user_id TEXT NOT NULL, device_id TEXT NOT NULL, kind TEXT NOT NULL, contact TEXT NOT NULL,
            expires_at REAL NOT NULL, q REAL NOT NULL, call_id TEXT NOT NULL, cseq INTEGER NOT NULL,
            source_host TEXT NOT NULL, source_port INTEGER NOT NULL, transport TEXT NOT NULL,
            user_agent TEXT NOT NULL, registered_at REAL NOT NULL, instance TEXT NOT NULL,
            PRIMARY KEY (device_id, contact))""",
        """CREATE TABLE IF NOT EXISTS calls (
            call_id TEXT PRIMARY KEY, caller TEXT, user_id TEXT, queue_id TEXT, method TEXT,
            branches TEXT, answered_by TEXT, status INTEGER, reason TEXT,
            started_at REAL, answered_at REAL, ended_at REAL)""",
        "CREATE INDEX IF NOT EXISTS calls_user ON calls (user_id, started_at)",
    ):
        conn.execute(statement)


def _v2_meta(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")


def _v3_binding_routes(conn: sqlite3.Connection) -> None:
    """How a binding is reached: the edge's Path, its flow and client, and whether its
    Contact is used as written.  Old rows take the defaults (reached at their source)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(bindings)")}
    for column, definition in (("path", "TEXT NOT NULL DEFAULT ''"), ("flow", "TEXT NOT NULL DEFAULT ''"),
                               ("client", "TEXT NOT NULL DEFAULT ''"),
                               ("at_contact", "INTEGER NOT NULL DEFAULT 0")):
        if column not in present:
            conn.execute(f"ALTER TABLE bindings ADD COLUMN {column} {definition}")


def _v4_binding_user_hash(conn: sqlite3.Connection) -> None:
    """Each binding's ``user_hash``, so that a worker reads only its own users' rows.
    Rows written before it (or by an older sip-router after it) have none: every
    worker reads those and keeps its own."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(bindings)")}
    if "user_hash" not in present:
        conn.execute("ALTER TABLE bindings ADD COLUMN user_hash INTEGER")
    rows = conn.execute("SELECT rowid, user_id FROM bindings WHERE user_hash IS NULL").fetchall()
    conn.executemany("UPDATE bindings SET user_hash = ? WHERE rowid = ?",
                     [(user_hash(user_id), rowid) for rowid, user_id in rows])


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_first_release, _v2_meta, _v3_binding_routes, _v4_binding_user_hash)
SCHEMA_VERSION = len(MIGRATIONS)


def _too_new(version: int) -> str:
    return (f"schema version {version} was written by a newer sip-router (this one knows up to "
            f"{SCHEMA_VERSION}): run that version, or restore a copy of the database it had")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the database to ``SCHEMA_VERSION``; ``ValueError`` if it is newer."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
        return
    # One write transaction for every step (not executescript, which commits first): a
    # crash or another process opening the file at once sees the old version or the new.
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])   # another process may have won
        if version > SCHEMA_VERSION:
            raise ValueError(_too_new(version))
        for step in MIGRATIONS[version:]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def connect(path: str, *, durable: bool = False, busy_timeout: float = 10.0,
            check_writable: bool = False, create: bool = True) -> sqlite3.Connection:
    """Open the state database at ``path`` and bring its schema up to date; raise ``StateError``.

    ``create``: make the file (and its directory) when missing; the router and the web app
    do, the CLI does not (``MissingDatabase``), so a wrong ``-c`` cannot leave a fresh empty
    database behind that the running router never reads.
    ``durable``: every commit is synced to disk (``synchronous=FULL``), so a
    commit survives a power cut, not only a crash of the process; the router
    commits in groups (one every 50 ms at most), so the sync is paid per group.
    ``check_writable``: prove at once that a write commits (the router refuses
    to start on a database it could not write, instead of failing later).
    ``busy_timeout``: how long a write waits for another writer's lock.
    """
    try:
        if os.path.isdir(path):
            raise StateError(path, "is a directory, not a database file")
        if create:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            target = path
        elif not os.path.exists(path):
            raise MissingDatabase(path)
        else:
            # mode=rw: should the file vanish between the check and here, SQLite must not make a new one
            target = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"
        conn = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                               uri=not create)
        try:
            if not create and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 \
                    and int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0:
                raise MissingDatabase(path, "the file is empty, not a database the router made")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            _migrate(conn)
            if check_writable:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO meta (key, value) VALUES ('opened_at', ?) ON CONFLICT (key) "
                                 "DO UPDATE SET value = excluded.value", (repr(time.time()),))
        except BaseException:
            conn.close()
            raise
    except ValueError as exc:
        raise StateError(path, str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        reason = describe(exc)
        raise StateError(path, NOT_A_DATABASE if reason == "file is not a database" else reason) from None
    return conn


def probe(path: str) -> int | None:
    """The schema version of the database at ``path`` read from its header, or None when
    there is no file yet; ``StateError`` when it is not a database this code can use.

    Reads 100 bytes and never opens the file with SQLite: opening a WAL database, even
    read-only, leaves -wal/-shm files owned by whoever ran the command (root, say),
    which the router's own user could then not write.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise StateError(path, "is a directory, not a database file") from None
    except OSError as exc:
        raise StateError(path, describe(exc)) from None
    if not header:
        raise StateError(path, "the file is empty, not a database the router made")
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise StateError(path, NOT_A_DATABASE)
    version = int(struct.unpack(">I", header[60:64])[0])
    if version > SCHEMA_VERSION:
        raise StateError(path, _too_new(version))
    return version


def _settle(conn: sqlite3.Connection) -> None:
    """Roll back a transaction a failed write left open (its rollback failed too), so
    the retry can begin a new one instead of failing on "within a transaction"."""
    if conn.in_transaction:
        conn.rollback()


# meta: per field, "<digest of the YAML values> <common first-seen time> <latest> <generation>",
# and the generation of ``yaml_values``, which every write of it here adds one to.
_DIGEST_KEY = "yaml_values.digest."
_GENERATION_KEY = "yaml_values.generation"


def _values_digest(policy: Policy, field: str) -> str:
    """A digest of one field's YAML value for every user of ``policy``, in order."""
    digest = hashlib.sha256()
    digest.update("\x00".join(
        f"{user.id}\x01{'-' if value is None else '=' + value}"
        for user in policy.users for value in (yaml_value(user, field),)).encode())
    return digest.hexdigest()


class SqlitePolicyStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def observe_yaml(self, policy: Policy, now: float) -> SeenAt:
        """When each of the policy's YAML values was first seen with its content (now, for
        a value new or changed since the last observation, which is recorded)."""
        digests = {field: _values_digest(policy, field) for field in FIELDS}
        seen = self._unchanged(policy, digests)
        if seen is not None:
            return seen
        seen = SeenAt()
        users = policy.users
        own = {user.id: user.id for user in users}     # noted under the policy's own strings
        updates: list[tuple[str, str, str | None, float]] = []
        current = {field: {user.id: yaml_value(user, field) for user in users} for field in FIELDS}
        read_at = self._generation()        # before the rows: a write after it changes it
        latest: dict[str, float] = {}
        # Row by row, not into one big dict first: at 100,000 users that is 300,000 rows.
        for user_id, field, value, seen_at in self.conn.execute(
                "SELECT user_id, field, value, seen_at FROM yaml_values"):
            values = current.get(field)
            if values is not None:
                if seen_at > latest.get(field, _NEVER):
                    latest[field] = seen_at
                if values.get(user_id, _ABSENT) == value:
                    seen.note(own[user_id], field, seen_at)
        for field in FIELDS:
            current_field = current[field]
            if seen.count(field) < len(current_field):
                for user_id, value in current_field.items():
                    if not seen.is_noted(user_id, field):
                        seen.note(user_id, field, now)
                        updates.append((user_id, field, value, now))
                latest[field] = max(latest.get(field, now), now)      # rows written now, below
        seen.compact()
        commons = {field: common for field in FIELDS for common in (seen.common(field),) if common is not None}
        if not updates and not commons:
            return seen
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            generation = self._generation()
            written = generation
            if updates:
                self.conn.executemany(
                    "INSERT INTO yaml_values (user_id, field, value, seen_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (user_id, field) DO UPDATE SET value=excluded.value, "
                    "seen_at=excluded.seen_at", updates)
                written = generation + 1
            rows = [(_GENERATION_KEY, str(written))]
            if generation == read_at:       # nobody wrote since the rows were read: they are the table
                rows += [(f"{_DIGEST_KEY}{field}", f"{digests[field]} {common!r} {latest[field]!r} {written}")
                         for field, common in commons.items()]
            self.conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                "value=excluded.value", rows)
        return seen

    def _generation(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (_GENERATION_KEY,)).fetchone()
        return int(row[0]) if row is not None and str(row[0]).isdigit() else 0

    def _unchanged(self, policy: Policy, digests: dict[str, str]) -> SeenAt | None:
        """The observation, read from the table without comparing 300,000 rows in Python,
        when every value is as the last observation recorded it: the digest of each
        field's values matches the one kept with it, nothing here wrote the table since
        (the generation is the one kept), and nothing else did either (no row is later
        than the latest time kept: an older sip-router does not count generations).
        None: compare row by row.  One read transaction: the meta and the rows agree."""
        if self.conn.in_transaction:        # the caller's transaction is the snapshot already
            return self._read_unchanged(policy, digests)
        self.conn.execute("BEGIN")
        try:
            return self._read_unchanged(policy, digests)
        finally:
            self.conn.execute("COMMIT")

    def _read_unchanged(self, policy: Policy, digests: dict[str, str]) -> SeenAt | None:
        kept = dict(self.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'yaml_values.%'"))
        generation = kept.get(_GENERATION_KEY, "0")
        common: dict[str, float] = {}
        latest: dict[str, float] = {}
        for field in FIELDS:
            parts = kept.get(f"{_DIGEST_KEY}{field}", "").split()
            if len(parts) != 4 or parts[0] != digests[field] or parts[3] != generation:
                return None
            try:
                common[field], latest[field] = float(parts[1]), float(parts[2])
            except ValueError:
                return None
        own: dict[str, str] | None = None     # built only if some user's time differs
        differing: dict[str, dict[str, float]] = {field: {} for field in FIELDS}
        # One scan for the rows off their field's common time (the few users whose value
        # changed since most were first seen).
        where = " AND ".join("NOT (field = ? AND seen_at = ?)" for _ in FIELDS)
        arguments = [v for name in FIELDS for v in (name, common[name])]
        for field, user_id, at in self.conn.execute(
                f"SELECT field, user_id, seen_at FROM yaml_values WHERE {where}", arguments):
            if field in differing:
                if at > latest[field]:
                    return None                 # written since: by whom, compare to know
                if own is None:
                    own = {user.id: user.id for user in policy.users}
                differing[field][own.get(user_id, user_id)] = at
        return SeenAt.compacted(common, differing)

    def latest_changes(self) -> dict[Key, Change]:
        rows = self.conn.execute(
            "SELECT id, user_id, field, old, new, actor, via, at FROM changes WHERE id IN "
            "(SELECT MAX(id) FROM changes GROUP BY user_id, field)")
        return {(r[1], r[2]): _change(r) for r in rows}

    def changes_after(self, marker: int) -> list[Change]:
        rows = self.conn.execute(
            "SELECT id, user_id, field, old, new, actor, via, at FROM changes WHERE id > ? ORDER BY id",
            (marker,))
        return [_change(r) for r in rows]

    def record_change(self, change: Change) -> Change:
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO changes (user_id, field, old, new, actor, via, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (change.user_id, change.field, change.old, change.new, change.actor,
                 change.via, change.at))
        return Change(change.user_id, change.field, change.old, change.new, change.actor,
                      change.via, change.at, int(cur.lastrowid or 0))

    def audit(self, user_id: str | None = None, limit: int = 100) -> list[Change]:
        if user_id is None:
            rows = self.conn.execute(
                "SELECT id, user_id, field, old, new, actor, via, at FROM changes "
                "ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.conn.execute(
                "SELECT id, user_id, field, old, new, actor, via, at FROM changes "
                "WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit))
        return [_change(r) for r in rows]

    def change_marker(self) -> int:
        row = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()
        return int(row[0])


def _change(r: tuple) -> Change:  # type: ignore[type-arg]
    return Change(user_id=r[1], field=r[2], old=r[3], new=r[4], actor=r[5], via=r[6],
                  at=r[7], id=r[0])


_BINDING_COLUMNS = ", ".join(COLUMNS)


def _from_json(count: int) -> str:
    """The columns of one row of a JSON array of rows (``json_each``'s ``value``)."""
    return ", ".join(f"value ->> {i}" for i in range(count))


_FROM_JSON_BINDINGS = _from_json(19)
_UPSERT_CALLS = (
    "INSERT INTO calls (call_id, caller, user_id, queue_id, method, branches, answered_by, "
    "status, reason, started_at, answered_at, ended_at) {source} "
    "ON CONFLICT (call_id) DO UPDATE SET caller=excluded.caller, user_id=excluded.user_id, "
    "queue_id=excluded.queue_id, method=excluded.method, branches=excluded.branches, "
    "answered_by=excluded.answered_by, status=excluded.status, reason=excluded.reason, "
    "answered_at=excluded.answered_at, ended_at=excluded.ended_at")
_UPSERT_CALLS_FROM_JSON = _UPSERT_CALLS.format(source=f"SELECT {_from_json(12)} FROM json_each(?) WHERE true")
_UPSERT_CALLS_ROWS = _UPSERT_CALLS.format(source=f"VALUES ({', '.join('?' * 12)})")


def _as_json(rows: list[Any]) -> str | None:
    """A batch as one JSON parameter, or None when a value has no JSON form (an infinite or
    NaN number).  A batch is written by one statement that reads its rows from the JSON
    (``json_each``): the writer thread takes the interpreter lock once to bind it, and
    SQLite does the whole batch with the lock released.  ``executemany`` takes the lock back
    after every row, and with the PJSIP thread busy each time waits for it to let go."""
    try:
        return json.dumps(rows, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return None


class SqliteBindingStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load(self, now: float, keep: Callable[[str], bool] | None = None,
             names: Mapping[str, str] | None = None, share: tuple[int, int] | None = None) -> list[Binding]:
        """The bindings not yet expired; with ``keep``, only those of the users it keeps
        (a worker's own), chosen before a ``Binding`` is made of the row.  ``names``: the
        policy's own user and device id strings, which the bindings then share.
        ``share``: (k, n) when ``keep`` keeps only users whose ``user_hash`` is k modulo
        n: the database leaves the other rows out (half the rows with two workers) and
        ``keep`` decides on the rest."""
        query = f"SELECT {_BINDING_COLUMNS} FROM bindings WHERE expires_at > ?"
        arguments: tuple[float | int, ...] = (now,)
        if share is not None:
            query += " AND (user_hash IS NULL OR user_hash % ? = ?)"
            arguments = (now, share[1], share[0])
        rows: Iterable[tuple[Any, ...]] = self.conn.execute(query, arguments)
        if keep is not None:
            # Lazily: a list of the rows kept would interleave 100,000 short-lived row
            # tuples with the bindings made of them, and the freed rows would leave the
            # allocator's pages a third empty (18 MB per worker at 100,000 bindings).
            rows = (r for r in rows if keep(r[0]))
        return bindings_of(rows, names)

    def replace_many(self, sets: Iterable[DeviceBindings]) -> None:
        """Several devices' binding sets in one transaction."""
        latest = {item.device_id: item for item in sets}      # a device twice: its last set
        rows = [(b.user_id, b.device_id, b.kind.value, b.contact, b.expires_at, b.q,
                 b.call_id, b.cseq, b.source_host, b.source_port, b.transport,
                 b.user_agent, b.registered_at, b.instance,
                 json.dumps(list(b.path)) if b.path else "", b.flow, b.client, int(b.at_contact),
                 user_hash(b.user_id))
                for item in latest.values() for b in item.bindings]
        devices, values = _as_json(list(latest)), _as_json(rows)
        _settle(self.conn)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if devices is None or values is None:      # not JSON (an infinite number): row by row
                self.conn.executemany("DELETE FROM bindings WHERE device_id = ?", [(d,) for d in latest])
                self.conn.executemany(f"INSERT INTO bindings ({_BINDING_COLUMNS}, user_hash) VALUES "
                                      f"({', '.join('?' * 19)})", rows)
                return
            self.conn.execute("DELETE FROM bindings WHERE device_id IN (SELECT value FROM json_each(?))",
                              (devices,))
            self.conn.execute(f"INSERT INTO bindings ({_BINDING_COLUMNS}, user_hash) "
                              f"SELECT {_FROM_JSON_BINDINGS} FROM json_each(?)", (values,))

    def purge_expired(self, now: float) -> int:
        with self.conn:
            cur = self.conn.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
        return cur.rowcount


class SqliteCallStore:
    """Call records: one row per routed call, updated as the call answers and ends."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def save_many(self, records: Iterable[CallRecord]) -> None:
        rows = [(r.call_id, r.caller, r.user_id, r.queue_id, r.method, json.dumps(list(r.branches)),
                 r.answered_by, r.status, r.reason, r.started_at, r.answered_at, r.ended_at)
                for r in records]
        values = _as_json(rows)
        _settle(self.conn)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if values is None:                  # not JSON (an infinite number): row by row
                self.conn.executemany(_UPSERT_CALLS_ROWS, rows)
            else:
                self.conn.execute(_UPSERT_CALLS_FROM_JSON, (values,))

    def recent(self, user_id: str | None = None, limit: int = 50) -> list[CallRecord]:
        query = ("SELECT call_id, caller, user_id, queue_id, method, branches, answered_by, status, "
                 "reason, started_at, answered_at, ended_at FROM calls")
        args: tuple[object, ...] = ()
        if user_id is not None:
            query += " WHERE user_id = ?"
            args = (user_id,)
        rows = self.conn.execute(query + " ORDER BY started_at DESC LIMIT ?", (*args, limit))
        return [CallRecord(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5] or "[]")), r[6],
                           r[7], r[8], r[9], r[10], r[11]) for r in rows]
