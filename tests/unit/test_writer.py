"""The state writes leave the PJSIP thread: a batch is committed on the writer thread
while the loop goes on, and a REGISTER's 200 still leaves only after its binding is
stored; a batch is written by one statement per table, exactly as row by row."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import structlog

from router.policy.model import Binding, DeviceKind
from router.records import CallRecord
from router.sip.commands import SaveBindings, Send
from router.sip.commit import GroupCommit
from router.sip.writer import WriterThread
from router.store.sqlite import SqliteBindingStore, SqliteCallStore, connect

OK = Send(b"SIP/2.0 200 OK\r\n\r\n", "127.0.0.1", 5071)
WAIT = 10.0        # seconds a test waits for the writer thread at most


class SlowDisk:
    """A store whose writes wait until the test lets them go (a disk syncing slowly)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.writing = threading.Event()
        self.broken = False
        self.bindings: dict[str, tuple[Binding, ...]] = {}
        self.calls: dict[str, CallRecord] = {}

    def replace_many(self, sets):
        self.writing.set()
        assert self.go.wait(WAIT)
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        for item in sets:
            self.bindings[item.device_id] = item.bindings

    def save_many(self, records):
        for record in records:
            self.calls[record.call_id] = record


def save(device: str, contact_port: int = 5071) -> SaveBindings:
    binding = Binding(user_id="minh", device_id=device, kind=DeviceKind.IP_PHONE,
                      contact=f"sip:{device}@127.0.0.1:{contact_port}", expires_at=2000.0)
    return SaveBindings("minh", device, (binding,))


class Loop:
    """The engine's part: a group commit on a writer thread that wakes it."""

    def __init__(self, store: SlowDisk) -> None:
        self.woken = threading.Event()
        self.sent: list[Send] = []
        self.writer = WriterThread(store, store, self.woken.set, lambda: 100.0)
        self.commit = GroupCommit(store, store, self.sent.append, structlog.get_logger("state"),
                                  writer=self.writer)
        self.writer.start()

    def until_written(self) -> None:
        assert self.woken.wait(WAIT), "the writer thread never reported the batch"
        self.woken.clear()
        self.writer.collect(100.1)


@pytest.fixture
def store():
    return SlowDisk()


@pytest.fixture
def loop(store):
    """The loop on ``store``; its writer thread is let go and stopped also when a test fails."""
    running = Loop(store)
    yield running
    store.go.set()
    running.writer.stop()


def test_the_loop_goes_on_while_a_registration_is_written_and_its_200_leaves_after_the_commit(store, loop):
    loop.commit.save(save("minh-desk"))
    loop.commit.hold(OK)
    loop.commit.flush(100.0)                  # returns at once: the disk has not finished
    assert store.writing.wait(WAIT)
    assert loop.sent == [] and loop.commit.is_held(OK)     # a retransmission is not answered early
    store.go.set()
    loop.until_written()
    assert loop.sent == [OK] and store.bindings["minh-desk"][0].contact.endswith(":5071")
    assert not loop.commit.is_held(OK) and loop.commit.stats["commits"] == 1


def test_what_arrives_during_a_write_goes_in_the_next_batch(store, loop):
    loop.commit.save(save("minh-desk"))
    loop.commit.flush(100.0)
    assert store.writing.wait(WAIT)
    loop.commit.save(save("minh-app"))
    loop.commit.flush(100.05)                 # a batch is still being written: this one waits
    assert loop.commit.in_flight is not None and set(loop.commit.pending) == {"minh-app"}
    store.go.set()
    loop.until_written()
    assert set(store.bindings) == {"minh-desk"}
    loop.commit.flush(100.1)
    loop.until_written()
    assert set(store.bindings) == {"minh-desk", "minh-app"}


def test_a_failed_write_is_kept_under_the_newer_registration_and_its_200_becomes_500(store, loop):
    store.broken = True
    loop.commit.save(save("minh-desk", 5071))
    loop.commit.hold(Send(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK-1\r\n"
                          b"From: <sip:minh@pbx.test>;tag=a\r\nTo: <sip:minh@pbx.test>;tag=b\r\n"
                          b"Call-ID: reg-1\r\nCSeq: 2 REGISTER\r\nContent-Length: 0\r\n\r\n",
                          "127.0.0.1", 5071))
    loop.commit.flush(100.0)
    assert store.writing.wait(WAIT)
    loop.commit.save(save("minh-desk", 5072))          # the phone registered again meanwhile
    store.go.set()
    loop.until_written()
    (refused,) = loop.sent
    assert refused.data.startswith(b"SIP/2.0 500 ")
    assert loop.commit.pending["minh-desk"].bindings[0].contact.endswith(":5072")


def test_stopping_waits_for_the_write_in_progress_then_writes_the_rest_inline(store, loop):
    loop.commit.save(save("minh-desk"))
    loop.commit.hold(OK)
    loop.commit.flush(100.0)
    assert store.writing.wait(WAIT)
    loop.commit.save(save("minh-app"))
    threading.Timer(0.2, store.go.set).start()
    loop.writer.stop()                            # as the engine's close does, then the last flush
    loop.commit.flush(100.2, force=True)
    assert loop.sent == [OK] and set(store.bindings) == {"minh-desk", "minh-app"}
    assert loop.writer.thread is not None and not loop.writer.thread.is_alive()


# --------------------------------------------------------------------------- one statement per batch

def rows(conn: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    return sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)


def tricky_bindings(expires: float) -> list[SaveBindings]:
    one = Binding("minh", "minh-desk", DeviceKind.IP_PHONE, "sip:minh@[2001:db8::1]:5071;transport=tcp",
                  expires, q=0.5, call_id='a"b\\c', cseq=2**31 - 1, source_host="2001:db8::1", source_port=5071,
                  transport="tcp", user_agent="Điện thoại bàn 🙂 \u2028", registered_at=1700000000.123456789,
                  instance="<urn:uuid:1>", path=("<sip:edge;lr>", "<sip:b,c;lr>"), flow="wss",
                  client="203.0.113.9:443", at_contact=True)
    two = Binding("lan", "lan-app", DeviceKind.APP, "sip:lan@127.0.0.1", expires)
    return [SaveBindings("minh", "minh-desk", (one,)), SaveBindings("lan", "lan-app", (two,))]


def calls() -> list[CallRecord]:
    return [CallRecord("c-1", "sip:acd@x", "minh", None, "ip_phone>agent_phone", ("minh-desk", "pstn:+84912345678"),
                       None, 487, "Đã hủy", 1.5),
            CallRecord("c-2", "sip:acd@x", None, "sales", "", (), "lan-app", 200, "", 2.0, 2.5, 3.25)]


def test_a_batch_written_from_json_holds_exactly_what_row_by_row_writes_hold(tmp_path):
    """The JSON batch (one statement) against the row-by-row fallback, which an infinite
    number forces (JSON has no form for it): the same rows, value for value and type for type."""
    fast, slow = connect(str(tmp_path / "fast.db")), connect(str(tmp_path / "slow.db"))
    SqliteBindingStore(fast).replace_many(tricky_bindings(2000.0))
    SqliteCallStore(fast).save_many(calls())
    SqliteBindingStore(slow).replace_many([*tricky_bindings(float("inf"))])     # row by row
    slow.execute("UPDATE bindings SET expires_at = 2000.0")
    SqliteCallStore(slow).save_many([*calls(), CallRecord("c-3", "x", None, None, "", (), None, 0, "", float("nan"))])
    slow.execute("DELETE FROM calls WHERE call_id = 'c-3'")
    for table in ("bindings", "calls"):
        assert rows(fast, table) == rows(slow, table)
        assert [tuple(type(v) for v in r) for r in rows(fast, table)] == \
            [tuple(type(v) for v in r) for r in rows(slow, table)]
    loaded = {b.device_id: b for b in SqliteBindingStore(fast).load(now=1000.0)}
    assert loaded == {item.device_id: item.bindings[0] for item in tricky_bindings(2000.0)}


def test_a_batch_replaces_each_devices_bindings_and_updates_calls_by_call_id(tmp_path):
    conn = connect(str(tmp_path / "state.db"))
    bindings, records = SqliteBindingStore(conn), SqliteCallStore(conn)
    bindings.replace_many(tricky_bindings(2000.0))
    bindings.replace_many([save("minh-desk", 5090)])
    records.save_many(calls())
    records.save_many([CallRecord("c-1", "sip:acd@x", "minh", None, "ip_phone", ("minh-desk",),
                                  "minh-desk", 200, "", 1.5, 1.75)])
    contacts = sorted(b.contact for b in bindings.load(now=1000.0))
    assert contacts == ["sip:lan@127.0.0.1", "sip:minh-desk@127.0.0.1:5090"]
    recent = {r.call_id: r for r in records.recent()}
    assert recent["c-1"].answered_by == "minh-desk" and recent["c-1"].answered_at == 1.75
    assert recent["c-2"].ended_at == 3.25 and recent["c-2"].queue_id == "sales"
