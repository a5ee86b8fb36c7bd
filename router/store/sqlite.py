"""SQLite implementations of the router's stores.

One file holds the state: run-time policy changes with their audit trail, the
YAML observations that decide precedence, registrations, and call records.
WAL mode lets the CLI read and write while the router runs.  A database that
cannot be opened, read or written is a ``StateError`` naming the file and why
(the router exits with its own status; the CLI prints one line).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable

from router.errors import RouterError
from router.policy.effective import FIELDS, Change, Key, yaml_value
from router.policy.model import Binding, DeviceKind, Policy
from router.records import CallRecord
from router.store.interfaces import DeviceBindings

SCHEMA = """
CREATE TABLE IF NOT EXISTS yaml_values (
    user_id TEXT NOT NULL, field TEXT NOT NULL, value TEXT, seen_at REAL NOT NULL,
    PRIMARY KEY (user_id, field));
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, field TEXT NOT NULL,
    old TEXT, new TEXT, actor TEXT NOT NULL, via TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS changes_user ON changes (user_id, field, id);
CREATE TABLE IF NOT EXISTS bindings (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, kind TEXT NOT NULL, contact TEXT NOT NULL,
    expires_at REAL NOT NULL, q REAL NOT NULL, call_id TEXT NOT NULL, cseq INTEGER NOT NULL,
    source_host TEXT NOT NULL, source_port INTEGER NOT NULL, transport TEXT NOT NULL,
    user_agent TEXT NOT NULL, registered_at REAL NOT NULL, instance TEXT NOT NULL,
    path TEXT NOT NULL DEFAULT '', flow TEXT NOT NULL DEFAULT '', client TEXT NOT NULL DEFAULT '',
    at_contact INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, contact));
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY, caller TEXT, user_id TEXT, queue_id TEXT, method TEXT,
    branches TEXT, answered_by TEXT, status INTEGER, reason TEXT,
    started_at REAL, answered_at REAL, ended_at REAL);
CREATE INDEX IF NOT EXISTS calls_user ON calls (user_id, started_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class StateError(RouterError):
    """The state database cannot be opened, read or written; names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"state database {path}: {reason}")


def describe(exc: BaseException) -> str:
    """A one-line reason for an OS or SQLite error, for a person to act on."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc) or type(exc).__name__


def connect(path: str, *, durable: bool = False, busy_timeout: float = 10.0,
            check_writable: bool = False) -> sqlite3.Connection:
    """Open (and create) the state database at ``path``; raise ``StateError``.

    ``durable``: every commit is synced to disk (``synchronous=FULL``), so a
    commit survives a power cut, not only a crash of the process; the router
    commits in groups (one every 50 ms at most), so the sync is paid per group.
    ``check_writable``: prove at once that a write commits (the router refuses
    to start on a database it could not write, instead of failing later).
    ``busy_timeout``: how long a write waits for another writer's lock.
    """
    try:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if os.path.isdir(path):
            raise StateError(path, "is a directory, not a database file")
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.executescript(SCHEMA)
            _migrate(conn)
            if check_writable:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO meta (key, value) VALUES ('opened_at', ?) ON CONFLICT (key) "
                                 "DO UPDATE SET value = excluded.value", (repr(time.time()),))
        except BaseException:
            conn.close()
            raise
    except (OSError, sqlite3.Error) as exc:
        raise StateError(path, describe(exc)) from None
    return conn


# Columns added since the first release: (table, column, definition).  A database made by
# an older version gains them on open; old rows take the defaults (reached at their source).
_ADDED_COLUMNS = (
    ("bindings", "path", "TEXT NOT NULL DEFAULT ''"),
    ("bindings", "flow", "TEXT NOT NULL DEFAULT ''"),
    ("bindings", "client", "TEXT NOT NULL DEFAULT ''"),
    ("bindings", "at_contact", "INTEGER NOT NULL DEFAULT 0"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise       # else another process (the CLI, the router) added it first


def _settle(conn: sqlite3.Connection) -> None:
    """Roll back a transaction a failed write left open (its rollback failed too), so
    the retry can begin a new one instead of failing on "within a transaction"."""
    if conn.in_transaction:
        conn.rollback()


class SqlitePolicyStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def observe_yaml(self, policy: Policy, now: float) -> dict[Key, float]:
        stored = {(u, f): (v, t) for u, f, v, t in
                  self.conn.execute("SELECT user_id, field, value, seen_at FROM yaml_values")}
        seen: dict[Key, float] = {}
        updates: list[tuple[str, str, str | None, float]] = []
        for user in policy.users:
            for field in FIELDS:
                value = yaml_value(user, field)
                old = stored.get((user.id, field))
                if old is not None and old[0] == value:
                    seen[(user.id, field)] = old[1]
                else:
                    seen[(user.id, field)] = now
                    updates.append((user.id, field, value, now))
        if updates:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany(
                    "INSERT INTO yaml_values (user_id, field, value, seen_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (user_id, field) DO UPDATE SET value=excluded.value, "
                    "seen_at=excluded.seen_at", updates)
        return seen

    def latest_changes(self) -> dict[Key, Change]:
        rows = self.conn.execute(
            "SELECT id, user_id, field, old, new, actor, via, at FROM changes WHERE id IN "
            "(SELECT MAX(id) FROM changes GROUP BY user_id, field)")
        return {(r[1], r[2]): _change(r) for r in rows}

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


_BINDING_COLUMNS = ("user_id, device_id, kind, contact, expires_at, q, call_id, cseq, "
                    "source_host, source_port, transport, user_agent, registered_at, instance, "
                    "path, flow, client, at_contact")


class SqliteBindingStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load(self, now: float) -> list[Binding]:
        rows = self.conn.execute(
            f"SELECT {_BINDING_COLUMNS} FROM bindings WHERE expires_at > ?", (now,))
        return [Binding(r[0], r[1], DeviceKind(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                        r[10], r[11], r[12], r[13], path=tuple(json.loads(r[14])) if r[14] else (),
                        flow=r[15], client=r[16], at_contact=bool(r[17])) for r in rows]

    def replace_many(self, sets: Iterable[DeviceBindings]) -> None:
        """Several devices' binding sets in one transaction."""
        _settle(self.conn)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for item in sets:
                self.conn.execute("DELETE FROM bindings WHERE device_id = ?", (item.device_id,))
                self.conn.executemany(
                    f"INSERT INTO bindings ({_BINDING_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(b.user_id, b.device_id, b.kind.value, b.contact, b.expires_at, b.q,
                      b.call_id, b.cseq, b.source_host, b.source_port, b.transport,
                      b.user_agent, b.registered_at, b.instance,
                      json.dumps(list(b.path)) if b.path else "", b.flow, b.client, int(b.at_contact))
                     for b in item.bindings])

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
        _settle(self.conn)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO calls (call_id, caller, user_id, queue_id, method, branches, answered_by, "
                "status, reason, started_at, answered_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (call_id) DO UPDATE SET caller=excluded.caller, user_id=excluded.user_id, "
                "queue_id=excluded.queue_id, method=excluded.method, branches=excluded.branches, "
                "answered_by=excluded.answered_by, status=excluded.status, reason=excluded.reason, "
                "answered_at=excluded.answered_at, ended_at=excluded.ended_at", rows)

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
