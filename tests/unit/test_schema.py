"""The state database's schema version: ordered migrations that keep every row, a database
from a newer sip-router refused, and the CLI's way in that never creates a file."""

from __future__ import annotations

import sqlite3
import threading
import zlib

import pytest

from router.policy.model import Binding, DeviceKind
from router.sip.commands import SaveBindings
from router.sip.steer import Steering
from router.store import sqlite as store
from router.store.sqlite import (
    SCHEMA_VERSION,
    MissingDatabase,
    SqliteBindingStore,
    SqliteCallStore,
    SqlitePolicyStore,
    StateError,
    connect,
    probe,
)

# The schema of the first release, as it was written then (no meta table, no user_version,
# bindings without path, flow, client and at_contact).
FIRST_RELEASE = """
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
    PRIMARY KEY (device_id, contact));
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY, caller TEXT, user_id TEXT, queue_id TEXT, method TEXT,
    branches TEXT, answered_by TEXT, status INTEGER, reason TEXT,
    started_at REAL, answered_at REAL, ended_at REAL);
CREATE INDEX IF NOT EXISTS calls_user ON calls (user_id, started_at);
"""


def old_database(path: str) -> None:
    """A database as the first release left it, with one row in every table."""
    conn = sqlite3.connect(path)
    conn.executescript(FIRST_RELEASE)
    conn.execute("INSERT INTO yaml_values VALUES ('minh', 'receive_method', 'ip_phone', 100.0)")
    conn.execute("INSERT INTO changes (user_id, field, old, new, actor, via, at) "
                 "VALUES ('minh', 'receive_method', 'ip_phone', 'app', 'lan', 'cli', 200.0)")
    conn.execute("INSERT INTO bindings VALUES ('minh', 'minh-desk', 'ip_phone', 'sip:minh@10.0.0.7:5060', "
                 "5000.0, 1.0, 'reg-1', 3, '10.0.0.7', 5060, 'udp', 'Yealink', 1000.0, '')")
    conn.execute("INSERT INTO calls VALUES ('call-1', 'sip:0901@pstn', 'minh', 'sales', 'ip_phone', "
                 "'[\"minh-desk\"]', 'minh-desk', 200, NULL, 300.0, 305.0, 400.0)")
    conn.commit()
    conn.close()


def user_version(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def test_a_new_database_is_made_at_the_current_version(tmp_path):
    conn = connect(str(tmp_path / "state" / "router.db"))
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    assert columns(conn, "bindings")[-5:] == ["path", "flow", "client", "at_contact", "user_hash"]
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "yaml_values", "changes", "bindings", "calls", "meta"}


def test_a_first_release_database_is_upgraded_and_keeps_every_row(tmp_path):
    path = str(tmp_path / "router.db")
    old_database(path)
    conn = connect(path)
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    (binding,) = SqliteBindingStore(conn).load(now=2000.0)
    assert (binding.user_id, binding.device_id, binding.kind, binding.contact, binding.cseq) == (
        "minh", "minh-desk", DeviceKind.IP_PHONE, "sip:minh@10.0.0.7:5060", 3)
    assert (binding.path, binding.flow, binding.client, binding.at_contact) == ((), "", "", False)
    policy = SqlitePolicyStore(conn)
    (change,) = policy.audit()
    assert (change.user_id, change.old, change.new, change.actor, change.via) == (
        "minh", "ip_phone", "app", "lan", "cli")
    assert policy.latest_changes()[("minh", "receive_method")].new == "app"
    (record,) = SqliteCallStore(conn).recent()
    assert (record.call_id, record.branches, record.answered_by) == ("call-1", ("minh-desk",), "minh-desk")
    assert conn.execute("SELECT value FROM yaml_values").fetchone() == ("ip_phone",)
    conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")      # the table the upgrade added


def test_an_upgraded_database_takes_new_rows_with_the_new_columns(tmp_path):
    path = str(tmp_path / "router.db")
    old_database(path)
    conn = connect(path)
    SqliteBindingStore(conn).replace_many([SaveBindings("minh", "minh-desk", (Binding(
        "minh", "minh-desk", DeviceKind.IP_PHONE, "sip:minh@10.0.0.8:5060", 6000.0, 1.0,
        path=("<sip:127.0.0.2:5060;lr>",), flow="f1", client="203.0.113.9:40000", at_contact=True),))])
    (binding,) = SqliteBindingStore(conn).load(now=2000.0)
    assert (binding.path, binding.flow, binding.at_contact) == (("<sip:127.0.0.2:5060;lr>",), "f1", True)


def test_a_database_made_before_versions_were_recorded_but_already_current_is_only_stamped(tmp_path):
    # what the router wrote between adding the bindings' columns and adding schema versions
    path = str(tmp_path / "router.db")
    old_database(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for column in ("path TEXT NOT NULL DEFAULT ''", "flow TEXT NOT NULL DEFAULT ''",
                   "client TEXT NOT NULL DEFAULT ''", "at_contact INTEGER NOT NULL DEFAULT 0"):
        conn.execute(f"ALTER TABLE bindings ADD COLUMN {column}")
    conn.commit()
    conn.close()
    upgraded = connect(path)
    assert int(upgraded.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    assert len(SqliteBindingStore(upgraded).load(now=2000.0)) == 1
    assert columns(upgraded, "bindings").count("path") == 1


def test_opening_again_runs_nothing_and_changes_nothing(tmp_path):
    path = str(tmp_path / "router.db")
    connect(path).close()
    before = open(path, "rb").read()
    connect(path).close()
    assert open(path, "rb").read() == before


def test_a_migration_that_fails_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = str(tmp_path / "router.db")
    old_database(path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, broken))
    monkeypatch.setattr(store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StateError, match="disk I/O error"):
        connect(path)
    conn = sqlite3.connect(path)
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0
    assert "path" not in columns(conn, "bindings")                # the earlier steps were undone too
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('half_done', 'meta')").fetchone() == (0,)


def test_two_processes_opening_an_old_database_at_once_both_get_the_upgrade(tmp_path):
    path = str(tmp_path / "router.db")
    old_database(path)
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            connect(path).close()
        except BaseException as exc:      # noqa: BLE001 -- reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and user_version(path) == SCHEMA_VERSION


def test_a_database_from_a_newer_sip_router_is_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "router.db")
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    conn.close()
    with pytest.raises(StateError) as err:
        connect(path)
    assert str(err.value) == (
        f"state database {path}: schema version {SCHEMA_VERSION + 3} was written by a newer sip-router "
        f"(this one knows up to {SCHEMA_VERSION}): run that version, or restore a copy of the database it had")
    assert user_version(path) == SCHEMA_VERSION + 3


def test_without_create_a_missing_database_is_refused_and_nothing_is_made(tmp_path):
    path = tmp_path / "state" / "router.db"
    with pytest.raises(MissingDatabase) as err:
        connect(str(path), create=False)
    assert err.value.path == str(path)
    assert not (tmp_path / "state").exists()


def test_without_create_an_existing_database_opens_and_is_upgraded(tmp_path):
    path = str(tmp_path / "router.db")
    old_database(path)
    conn = connect(path, create=False)
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION


def test_probe_reads_the_version_from_the_header_without_opening_the_database(tmp_path):
    path = tmp_path / "router.db"
    assert probe(str(path)) is None and not path.exists()
    connect(str(path)).close()
    assert probe(str(path)) == SCHEMA_VERSION
    old_database(str(tmp_path / "old.db"))
    assert probe(str(tmp_path / "old.db")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.db", "router.db"]    # no -wal, -shm left


@pytest.mark.parametrize("content, words", [
    (b"", "the file is empty"),
    (b"garbage" * 100, "file is not a database: restore it from a backup"),
    (b"SQLite format 3\x00" + b"\x00" * 44 + (SCHEMA_VERSION + 1).to_bytes(4, "big") + b"\x00" * 36,
     "newer sip-router"),
])
def test_probe_names_what_is_wrong_with_a_file(tmp_path, content, words):
    path = tmp_path / "router.db"
    path.write_bytes(content)
    with pytest.raises(StateError, match=words):
        probe(str(path))


def test_a_directory_where_the_database_should_be_is_named(tmp_path):
    with pytest.raises(StateError, match="is a directory"):
        connect(str(tmp_path), create=False)
    with pytest.raises(StateError, match="is a directory"):
        probe(str(tmp_path))


def test_a_worker_loads_only_its_own_users_bindings(tmp_path):
    conn = connect(str(tmp_path / "router.db"))
    bindings = SqliteBindingStore(conn)
    bindings.replace_many([SaveBindings(user, f"{user}-desk", (Binding(
        user, f"{user}-desk", DeviceKind.IP_PHONE, f"sip:{user}@10.0.0.8:5060", 6000.0),))
        for user in ("lan", "minh", "hoa", "tuan")])
    mine = bindings.load(now=2000.0, keep=lambda user_id: user_id in ("minh", "tuan"))
    assert sorted(b.user_id for b in mine) == ["minh", "tuan"]
    assert len(bindings.load(now=2000.0)) == 4
    with pytest.raises(ZeroDivisionError):                              # a failing choice is not hidden
        bindings.load(now=2000.0, keep=lambda user_id: len(user_id) / 0 > 0)


def test_each_binding_carries_its_users_hash_also_those_of_an_older_release(tmp_path):
    path = str(tmp_path / "router.db")
    old_database(path)
    conn = connect(path)
    assert conn.execute("SELECT user_id, user_hash FROM bindings").fetchall() == [("minh", zlib.crc32(b"minh"))]
    SqliteBindingStore(conn).replace_many([SaveBindings("lan", "lan-desk", (Binding(
        "lan", "lan-desk", DeviceKind.IP_PHONE, "sip:lan@10.0.0.8:5060", 6000.0),))])
    assert conn.execute("SELECT user_hash FROM bindings WHERE user_id = 'lan'").fetchone() == (zlib.crc32(b"lan"),)


def test_a_worker_reads_only_its_share_of_the_rows_and_rows_without_a_hash_too(tmp_path):
    """Two workers: the database leaves out the other worker's rows; a row an older
    sip-router wrote without a hash is read by both, and kept by its owner only."""
    conn = connect(str(tmp_path / "router.db"))
    bindings = SqliteBindingStore(conn)
    users = [f"agent{i}" for i in range(40)]
    bindings.replace_many([SaveBindings(user, f"{user}-desk", (Binding(
        user, f"{user}-desk", DeviceKind.IP_PHONE, f"sip:{user}@10.0.0.8:5060", 6000.0),)) for user in users])
    with conn:
        conn.execute("UPDATE bindings SET user_hash = NULL WHERE user_id = 'agent7'")
    steering = Steering(workers=2, own_ports={}, hosts=frozenset(), user_id=lambda user: user)
    for worker in (0, 1):
        asked: list[str] = []

        def owns(user_id: str, worker: int = worker, asked: list[str] = asked) -> bool:
            asked.append(user_id)
            return steering.of_user(user_id) == worker
        mine = bindings.load(now=2000.0, keep=owns, share=(worker, 2))
        theirs = sorted(u for u in users if zlib.crc32(u.encode()) % 2 == worker)
        assert sorted(b.user_id for b in mine) == theirs
        assert sorted(asked) == sorted(set(theirs) | {"agent7"})
