"""The PJSIP thread survives a bug in the core (one bad message is logged, not fatal)
and a failing state database (writes are retried, answers stay honest, routing goes on)."""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

import structlog

from router.policy.model import Binding, DeviceKind
from router.records import CallRecord
from router.sip.commands import SaveBindings, Send
from router.sip.commit import MAX_PENDING_CALLS, RETRY_MAX, GroupCommit, refusal
from router.sip.engine import Engine
from router.sip.message import parse
from router.sip.pjsip_module import Packet


class BrokenCore:
    def on_request(self, data, source, now):
        raise KeyError("a bug")

    on_response = on_request

    def handle_timer(self, now):
        raise ValueError("another bug")


class Nothing:
    def replace_many(self, sets):
        pass

    def save_many(self, records):
        pass


def test_a_core_error_is_counted_and_the_engine_goes_on():
    engine = Engine((), BrokenCore(), Nothing(), Nothing())  # type: ignore[arg-type]
    engine._handle(Packet(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "127.0.0.1", 5060, "udp", 0), False)
    engine._handle(Packet(b"SIP/2.0 200 OK\r\n\r\n", "127.0.0.1", 5060, "udp", 0), True)
    engine._guarded(BrokenCore().handle_timer, 0.0)
    assert engine.stats["core_errors"] == 3


# --------------------------------------------------------------------------- group commit
# ``GroupCommit`` is the engine's write path without PJSIP: these tests drive it alone
# (a second pjsua2 Endpoint alive in one process aborts it, so no other Engine is built).

OK_200 = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK-1;received=127.0.0.1;rport=5071\r\n"
          b"From: <sip:1002@pbx.test>;tag=a\r\nTo: <sip:1002@pbx.test>;tag=b\r\nCall-ID: reg-1\r\n"
          b"CSeq: 2 REGISTER\r\nContact: <sip:minh@127.0.0.1:5071>;expires=300\r\n"
          b"Server: sip-router/0.1\r\nContent-Length: 0\r\n\r\n")


class FlakyStore:
    """A store whose writes fail while ``broken`` (as SQLite does on a full or read-only disk)."""

    def __init__(self) -> None:
        self.broken = False
        self.bindings: dict[str, tuple[Binding, ...]] = {}
        self.calls: dict[str, CallRecord] = {}
        self.attempts = 0

    def replace_many(self, sets):
        self.attempts += 1
        if self.broken:
            raise sqlite3.OperationalError("disk I/O error")
        for item in sets:
            self.bindings[item.device_id] = item.bindings

    def save_many(self, records):
        if self.broken:
            raise sqlite3.OperationalError("database or disk is full")
        for record in records:
            self.calls[record.call_id] = record


def save(device: str = "minh-desk") -> SaveBindings:
    binding = Binding(user_id="minh", device_id=device, kind=DeviceKind.IP_PHONE,
                      contact=f"sip:{device}@127.0.0.1:5071", expires_at=2000.0)
    return SaveBindings("minh", device, (binding,))


def record(n: int) -> CallRecord:
    return CallRecord(f"call-{n}", "sip:c@x", "minh", None, "ip_phone", (), None, 200, "", 1.0)


def make(store: FlakyStore) -> tuple[GroupCommit, list[Send]]:
    sent: list[Send] = []
    return GroupCommit(store, store, sent.append, structlog.get_logger("state")), sent


def test_a_held_200_leaves_only_after_its_binding_is_committed():
    store = FlakyStore()
    commit, sent = make(store)
    answer = Send(OK_200, "127.0.0.1", 5071)
    commit.save(save())
    commit.hold(answer)
    assert sent == [] and store.bindings == {}
    assert commit.is_held(Send(OK_200, "127.0.0.1", 5071))        # its retransmission is not sent early
    commit.flush(100.0)
    assert "minh-desk" in store.bindings and sent == [answer]
    assert not commit.is_held(answer) and commit.stats["commits"] == 1


def test_a_failing_write_is_logged_once_kept_for_retry_and_the_held_200_becomes_500():
    store = FlakyStore()
    store.broken = True
    with structlog.testing.capture_logs() as logs:
        sent: list[Send] = []
        refused: list[tuple[Send, Send]] = []
        commit = GroupCommit(store, store, sent.append, structlog.get_logger("state"),
                             lambda a, b: refused.append((a, b)))
        commit.save(save("minh-desk"))
        commit.hold(Send(OK_200, "127.0.0.1", 5071))
        commit.save_call(record(1))
        now = 100.0
        commit.flush(now)
        (reply,) = sent
        assert reply.data.startswith(b"SIP/2.0 500 Server Internal Error\r\n")
        msg = parse(reply.data)
        assert (msg.call_id, msg.cseq, msg.header("retry-after")) == ("reg-1", (2, "REGISTER"), "10")
        assert msg.top_via.branch == "z9hG4bK-1" and "contact" not in dict(msg.headers)
        assert refused == [(Send(OK_200, "127.0.0.1", 5071), reply)]     # for the transaction cache
        # more failures in the same streak: retried with back-off, never logged again
        for _ in range(50):
            commit.save(save("minh-app"))
            now += RETRY_MAX
            commit.flush(now)
        assert store.attempts == 51
        assert set(commit.pending) == {"minh-desk", "minh-app"} and set(commit.pending_calls) == {"call-1"}
        store.broken = False
        now += RETRY_MAX
        commit.flush(now)
    assert set(store.bindings) == {"minh-desk", "minh-app"} and set(store.calls) == {"call-1"}
    assert commit.pending == {} and commit.pending_calls == {}
    events = [entry["event"] for entry in logs]
    assert events == ["state.write.failed", "state.write.recovered"]
    failed = logs[0]
    assert failed["log_level"] == "error" and failed["error"] == "disk I/O error"
    assert failed["kind"] == "OperationalError"
    assert logs[1]["attempts"] == 51


def test_retries_back_off_and_do_not_run_on_every_flush():
    store = FlakyStore()
    store.broken = True
    commit, _ = make(store)
    commit.save(save())
    commit.flush(100.0)
    for step in range(1, 200):                      # 10 s of 50 ms flushes
        commit.flush(100.0 + step * 0.05)
    assert 10 <= store.attempts <= 16                # about one a second once backed off


def test_a_new_200_while_the_database_fails_waits_for_the_retry_and_is_refused():
    store = FlakyStore()
    store.broken = True
    commit, sent = make(store)
    commit.save(save())
    commit.flush(100.0)
    commit.save(save("minh-app"))
    commit.hold(Send(OK_200, "127.0.0.1", 5071))
    commit.flush(100.05)                            # backing off: nothing tried, nothing sent
    assert sent == [] and store.attempts == 1
    commit.flush(100.0 + RETRY_MAX)
    assert [s.data[:12] for s in sent] == [b"SIP/2.0 500 "]


def locked() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorname = "SQLITE_BUSY"        # type: ignore[attr-defined]  -- as sqlite3 sets it
    return exc


class LockedStore(FlakyStore):
    """Another writer holds the lock for the next ``locked_for`` attempts."""

    def __init__(self, locked_for: int) -> None:
        super().__init__()
        self.locked_for = locked_for

    def replace_many(self, sets):
        self.attempts += 1
        if self.locked_for > 0:
            self.locked_for -= 1
            raise locked()
        for item in sets:
            self.bindings[item.device_id] = item.bindings


def test_a_database_locked_by_another_worker_for_a_moment_delays_the_200_but_never_refuses_it():
    store = LockedStore(locked_for=3)
    with structlog.testing.capture_logs() as logs:
        commit, sent = make(store)
        answer = Send(OK_200, "127.0.0.1", 5071)
        commit.save(save())
        commit.hold(answer)
        commit.save_call(record(1))
        now = 100.0
        for _ in range(3):                      # locked: nothing sent, nothing dropped, nothing logged
            commit.flush(now)
            now += 0.05
            assert sent == [] and commit.pending and commit.pending_calls
        commit.flush(now)                       # the lock is free: stored, then the 200 leaves
    assert sent == [answer] and "minh-desk" in store.bindings and "call-1" in store.calls
    assert commit.stats["write_busy"] == 3 and commit.stats["write_failures"] == 0
    assert [e["event"] for e in logs] == []


def test_a_database_locked_for_longer_than_the_patience_fails_as_any_write_does():
    from router.sip.commit import BUSY_PATIENCE
    store = LockedStore(locked_for=10**6)
    with structlog.testing.capture_logs() as logs:
        commit, sent = make(store)
        commit.save(save())
        commit.hold(Send(OK_200, "127.0.0.1", 5071))
        now = 100.0
        while not sent and now < 100.0 + 2 * BUSY_PATIENCE:
            commit.flush(now)
            now += 0.05
    (reply,) = sent
    assert reply.data.startswith(b"SIP/2.0 500 ")
    assert now - 100.0 >= BUSY_PATIENCE
    (failed,) = [e for e in logs if e["event"] == "state.write.failed"]
    assert failed["code"] == "SQLITE_BUSY"


def test_the_last_flush_before_stopping_does_not_wait_for_a_locked_database():
    store = LockedStore(locked_for=1)
    commit, sent = make(store)
    commit.save(save())
    commit.hold(Send(OK_200, "127.0.0.1", 5071))
    commit.flush(100.0, force=True)
    (reply,) = sent
    assert reply.data.startswith(b"SIP/2.0 500 ")


def test_call_records_failing_alone_do_not_refuse_stored_bindings():
    class CallsBroken(FlakyStore):
        def save_many(self, records):
            raise sqlite3.OperationalError("database is locked")
    store = CallsBroken()
    commit, sent = make(store)
    commit.save(save())
    commit.save_call(record(1))
    commit.hold(Send(OK_200, "127.0.0.1", 5071))
    commit.flush(100.0)
    assert sent == [Send(OK_200, "127.0.0.1", 5071)] and "minh-desk" in store.bindings
    assert set(commit.pending_calls) == {"call-1"}


def test_pending_call_records_are_bounded_while_the_database_fails():
    store = FlakyStore()
    store.broken = True
    commit, _ = make(store)
    for n in range(MAX_PENDING_CALLS + 5):
        commit.save_call(record(n))
    assert len(commit.pending_calls) == MAX_PENDING_CALLS and commit.dropped_calls == 5
    assert "call-0" not in commit.pending_calls and f"call-{MAX_PENDING_CALLS + 4}" in commit.pending_calls


def test_refusal_keeps_the_transaction_and_drops_the_contacts():
    data = refusal(OK_200)
    msg = parse(data)
    assert msg.status == 500 and msg.header("to") == "<sip:1002@pbx.test>;tag=b"
    assert msg.header("via") == "SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK-1;received=127.0.0.1;rport=5071"
    assert msg.all("contact") == []


@functools.cache
def _one_engine() -> Engine:
    """PJSIP allows one endpoint per process: the overload tests share this engine."""
    from router.config import parse_policy
    from router.sip.core import SipCore
    policy = parse_policy("domain: pbx.test\nusers: []\n", "r.yaml")
    return Engine((), SipCore(policy, [], 1000.0), Nothing(), Nothing())  # type: ignore[arg-type]


def _fresh_engine() -> tuple[Engine, Any]:
    engine = _one_engine()
    engine._track_backlog(0, 0.0)                    # caught up: no overload, no backlog clock
    return engine, engine.core


def test_the_engine_calls_itself_behind_after_full_passes_for_a_while_and_recovers_at_once():
    from router.sip.engine import BATCH, BEHIND_FOR
    engine, core = _fresh_engine()
    now = 50.0
    for _ in range(3):                               # full passes for less than BEHIND_FOR: a burst
        engine._track_backlog(BATCH, now)
        now += BEHIND_FOR / 4
    assert not core.overloaded
    engine._track_backlog(BATCH - 1, now)            # a break: the clock starts again
    started = now + 0.01
    engine._track_backlog(BATCH, started)
    engine._track_backlog(BATCH, started + BEHIND_FOR * 0.9)
    assert not core.overloaded                       # full passes, but not yet for BEHIND_FOR
    now = started + BEHIND_FOR * 1.01
    engine._track_backlog(BATCH, now)                # full passes for BEHIND_FOR: behind
    assert core.overloaded
    engine._track_backlog(BATCH, now + 1.0)          # still full: still behind
    assert core.overloaded
    engine._track_backlog(BATCH - 1, now + 1.1)      # less than a batch waited: caught up
    assert not core.overloaded


def test_full_passes_are_overload_only_once_the_oldest_datagram_waited_too_long():
    """With the kernel's arrival stamps, a backlog the loop is working off (a host that kept
    it off the CPU for a while) is not overload; a queue whose head waited MAX_QUEUE_WAIT is."""
    from router.sip.engine import BATCH, BEHIND_FOR, MAX_QUEUE_WAIT
    engine, core = _fresh_engine()
    now = 50.0
    for step in range(10):                           # full passes for 5 x BEHIND_FOR, short waits
        engine._track_backlog(BATCH, now + step * BEHIND_FOR / 2, waited=MAX_QUEUE_WAIT / 2)
    assert not core.overloaded
    engine._track_backlog(BATCH, now + 6.0, waited=MAX_QUEUE_WAIT * 1.01)
    assert core.overloaded                           # the head of the queue waited too long
    engine._track_backlog(BATCH, now + 6.1, waited=0.01)
    assert core.overloaded                           # still a full batch: not caught up yet
    engine._track_backlog(BATCH - 1, now + 6.2, waited=0.01)
    assert not core.overloaded                       # less than a batch waited: caught up
    engine._track_backlog(BATCH - 1, now + 6.3, waited=MAX_QUEUE_WAIT * 2)
    assert not core.overloaded                       # a long wait with no backlog behind it


def stamped_pair() -> tuple[Any, Any]:
    """A receiving UDP socket whose datagrams carry their time of arrival, and a sender."""
    import socket
    import time

    from router.sip.sharing import recv_stamped, stamp_arrivals
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    stamp_arrivals(receiver)
    # The kernel turns stamping on for the whole system a moment after the first
    # socket asks (deferred work): until then a datagram is stamped when read.
    for _ in range(20):
        sender.sendto(b"\r\n\r\n", receiver.getsockname())
        time.sleep(0.02)
        _, _, warm = recv_stamped(receiver)
        if warm is not None and warm <= time.time() - 0.015:
            break
    return receiver, sender


def test_the_kernel_stamps_when_a_datagram_arrived():
    import time

    from router.sip.sharing import read_datagrams
    receiver, sender = stamped_pair()
    try:
        before = time.time()
        for n in range(3):
            sender.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n%d" % n, receiver.getsockname())
        time.sleep(0.05)
        out: list = []
        arrived = read_datagrams(receiver, out, 10)
        assert len(out) == 3 and out[0][1].data.endswith(b"0")
        assert arrived is not None and before - 0.01 <= arrived <= time.time() - 0.04
    finally:
        receiver.close()
        sender.close()


def test_a_datagram_that_woke_the_loop_is_handled_before_the_socket_is_read_again():
    """An INVITE that arrives while the loop waits goes to the core at once; datagrams that
    were already queued when the wait began (a backlog) are read together, as before."""
    import select
    import time

    from router.sip.sharing import read_datagrams
    receiver, sender = stamped_pair()
    try:
        waited_from = time.time()
        sender.sendto(b"INVITE sip:lan@pbx.test SIP/2.0\r\n\r\n", receiver.getsockname())
        sender.sendto(b"ACK sip:lan@pbx.test SIP/2.0\r\n\r\n", receiver.getsockname())
        assert select.select([receiver], [], [], 1.0)[0]
        out: list = []
        arrived = read_datagrams(receiver, out, 10, waited_from)
        assert [p.data[:3] for _, p in out] == [b"INV"]
        assert arrived is not None and arrived >= waited_from
        # The ACK is still queued: the next wait returns at once, and as it arrived before
        # that wait began, the queue is drained.
        waited_from = time.time()
        assert select.select([receiver], [], [], 0)[0]
        for n in range(3):
            sender.sendto(b"BYE sip:lan@pbx.test SIP/2.0\r\n\r\n%d" % n, receiver.getsockname())
        time.sleep(0.05)
        arrived = read_datagrams(receiver, out, 10, waited_from)
        assert [p.data[:3] for _, p in out] == [b"INV", b"ACK", b"BYE", b"BYE", b"BYE"]
        assert arrived is not None and arrived < waited_from
    finally:
        receiver.close()
        sender.close()
