"""Acknowledged means stored: the state writes and the answers that wait for them.

The engine batches binding writes and call records and commits them at most
every ``FLUSH_INTERVAL``, on the writer's thread (``router.sip.writer``).  The
200 to a REGISTER leaves only after the commit that stores its binding
(``GroupCommit``); when the state database fails, it becomes a 500 with
Retry-After.  No PJSIP here: unit-tested alone.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from router.errors import MalformedMessage
from router.records import CallRecord
from router.sip.commands import SaveBindings, Send
from router.sip.core import SERVER
from router.sip.message import parse, pretty_name
from router.sip.writer import Batch, InlineWriter, Outcome, Writer
from router.store.interfaces import BindingWriter, CallWriter

FLUSH_INTERVAL = 0.05
RETRY_MAX = 1.0              # a failing state database is retried at most this far apart
MAX_PENDING_CALLS = 100_000  # call records kept for retry while the database fails
RETRY_AFTER = 10             # seconds, on the 500 a REGISTER gets when its binding was not stored
# Seconds a write may keep finding the database locked by another writer (a worker, the CLI,
# the web app) before it counts as failing.  Until then the batch and the 200s wait for the
# next flush: the SIP thread waits only a moment per attempt (``app.STATE_BUSY_TIMEOUT``),
# and a worker that holds the lock may be kept off a busy host's CPU for longer than that.
BUSY_PATIENCE = 1.0


def refusal(answer: bytes) -> bytes:
    """The 500 a REGISTER gets instead of ``answer`` (its 200) when the binding could
    not be stored: same Via, From, To, Call-ID and CSeq, with Retry-After (as
    Kamailio's registrar does when a write-through usrloc insert fails)."""
    msg = parse(answer)
    lines = ["SIP/2.0 500 Server Internal Error"]
    lines.extend(f"{pretty_name(name)}: {value}" for name, value in msg.headers
                 if name in ("via", "from", "to", "call-id", "cseq"))
    lines += [f"Retry-After: {RETRY_AFTER}",
              'Warning: 399 sip-router "registration not stored: the state database is failing"',
              f"Server: {SERVER}", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class GroupCommit:
    """Acknowledged means stored: binding writes and the answers that acknowledge them.

    Binding sets (``save``) and call records (``save_call``) accumulate between
    flushes; ``flush`` hands them to the writer as one ``Batch`` (one transaction
    for the bindings, one for the call records), and ``finished`` takes its
    outcome; while a batch is being written, new writes wait for the next flush.
    A ``Send`` that acknowledges a binding write (the 200 to a REGISTER: the
    engine passes every send of a command list that holds a ``SaveBindings``) is
    held until the batch that holds its binding is committed, and released
    right after the commit.  A
    retransmitted REGISTER answered from the core's transaction cache while its
    200 is held is dropped (``is_held``): it leaves once, after the write.

    A database locked by another writer (another worker, the CLI, the web app)
    is waited for: the batch and its 200s wait for the next flush, for up to
    ``BUSY_PATIENCE``, and only then does the lock count as a failure.

    When a write fails (disk full, I/O error, read-only or long-locked database) the
    batch is kept and retried, first after ``FLUSH_INTERVAL`` and then backing off
    to ``RETRY_MAX``; ``state.write.failed`` is logged once per failure streak and
    ``state.write.recovered`` when a write succeeds again.  The held 200s become
    500 with Retry-After (``refused`` is called with each one, so a retransmission
    gets the 500 too): a phone is never told it is registered when a restart would
    forget it.  The bindings stay in memory, so calls keep reaching those phones,
    and are written when the database works again.  Call records wait for the
    retry as well, at most ``MAX_PENDING_CALLS`` of them (the oldest are dropped
    and counted).  Pure: no PJSIP, no clock of its own; unit-tested alone.
    """

    def __init__(self, bindings: BindingWriter, calls: CallWriter, send: Callable[[Send], None],
                 logger: structlog.typing.FilteringBoundLogger,
                 refused: Callable[[Send, Send], None] | None = None, writer: Writer | None = None) -> None:
        self.writer: Writer = writer if writer is not None else InlineWriter(bindings, calls)
        self.in_flight: Batch | None = None     # the batch the writer has, until ``finished``
        self.send = send
        self.log = logger
        self.refused = refused
        self.pending: dict[str, SaveBindings] = {}
        self.pending_calls: dict[str, CallRecord] = {}
        self.held: list[Send] = []
        self.held_data: set[bytes] = set()
        self.failures = 0                 # failed attempts in the current streak
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self.dropped_calls = 0
        self.refused_in_streak = 0
        self.busy_since: float | None = None   # when writes began to find the database locked
        self.stats = {"commits": 0, "held": 0, "refused": 0, "write_failures": 0, "write_busy": 0}

    def save(self, command: SaveBindings) -> None:
        self.pending[command.device_id] = command

    def save_call(self, record: CallRecord) -> None:
        self.pending_calls.pop(record.call_id, None)       # keep insertion order = age
        self.pending_calls[record.call_id] = record
        if len(self.pending_calls) > MAX_PENDING_CALLS:
            del self.pending_calls[next(iter(self.pending_calls))]
            self.dropped_calls += 1

    def hold(self, command: Send) -> None:
        self.held.append(command)
        self.held_data.add(command.data)
        self.stats["held"] += 1

    def is_held(self, command: Send) -> bool:
        if self.held_data and command.data in self.held_data:
            return True
        return self.in_flight is not None and command.data in self.in_flight.held_data

    def flush(self, now: float, force: bool = False) -> None:
        """Hand what is pending to the writer (unless backing off after a failure, or a batch
        is still being written: then it waits for the next flush); ``finished`` releases the
        held answers once it is written: as they are after a commit, as 500s after a failure."""
        if self.in_flight is not None:
            return
        if not (self.pending or self.pending_calls or self.held):
            return
        if now < self.retry_at and not force:
            return
        batch = Batch(self.pending, self.pending_calls, self.held, self.held_data, force)
        self.pending, self.pending_calls, self.held, self.held_data = {}, {}, [], set()
        self.in_flight = batch
        self.writer.write(batch, self.finished, now)

    def finished(self, batch: Batch, outcome: Outcome, now: float) -> None:
        """The writer is done with ``batch``: what failed goes back to the pending writes
        (under anything newer for the same device or call), and the held answers leave."""
        self.in_flight = None
        problem: Exception | None = None
        stored = True
        if outcome.bindings_error is not None:
            if self._wait_for_lock(outcome.bindings_error, now, batch.force):
                self._keep(batch)      # the batch, the call records and the 200s wait for the next flush
                return
            problem, stored = outcome.bindings_error, False
            self._keep_writes(batch.bindings, batch.calls)
        else:
            if batch.bindings:
                self.stats["commits"] += 1
            if outcome.calls_error is not None:
                if not self._wait_for_lock(outcome.calls_error, now, batch.force):
                    problem = outcome.calls_error
                self._keep_writes({}, batch.calls)
        if problem is None:
            if not self.pending_calls:          # else the call records still wait for the lock
                self.busy_since = None
            self._recovered(now)
        else:
            self.busy_since = None
            self._failed(problem, now)
        for command in batch.held:
            self.send(command if stored else self._refuse(command))

    def _keep(self, batch: Batch) -> None:
        """All of ``batch`` waits for the next flush, its answers first in line."""
        self._keep_writes(batch.bindings, batch.calls)
        self.held = [*batch.held, *self.held]
        self.held_data |= batch.held_data

    def _keep_writes(self, bindings: dict[str, SaveBindings], calls: dict[str, CallRecord]) -> None:
        if bindings:
            newer, self.pending = self.pending, dict(bindings)
            self.pending.update(newer)
        if calls:
            newer_calls, self.pending_calls = self.pending_calls, dict(calls)
            for record in newer_calls.values():
                self.save_call(record)

    def _refuse(self, command: Send) -> Send:
        if not command.data.startswith(b"SIP/2.0 2"):
            return command
        try:
            data = refusal(command.data)
        except MalformedMessage:
            return command
        replacement = command._replace(data=data)
        self.stats["refused"] += 1
        self.refused_in_streak += 1
        if self.refused is not None:
            self.refused(command, replacement)
        return replacement

    def _wait_for_lock(self, exc: Exception, now: float, force: bool) -> bool:
        """Is ``exc`` another writer holding the lock, for less than ``BUSY_PATIENCE`` so far?
        Then the write is tried again at the next flush, and nothing is refused or logged.
        Never on the last flush before the router stops (``force``): there is no next one."""
        if force or not str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_BUSY"):
            return False
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since >= BUSY_PATIENCE:
            return False
        self.stats["write_busy"] += 1
        return True

    def _failed(self, exc: Exception, now: float) -> None:
        self.failures += 1
        self.stats["write_failures"] += 1
        self.retry_at = now + min(FLUSH_INTERVAL * 2 ** self.failures, RETRY_MAX)
        if self.failing_since is None:
            self.failing_since = now
            # sqlite3 names the exact code (SQLITE_BUSY_SNAPSHOT, SQLITE_FULL ...) where "database
            # is locked" alone would not say which of several causes it was.
            self.log.error("state.write.failed", error=str(exc), kind=type(exc).__name__,
                           code=getattr(exc, "sqlite_errorname", None),
                           pending_bindings=len(self.pending), pending_calls=len(self.pending_calls),
                           detail="kept for retry; REGISTERs are answered 500 until a write succeeds; "
                                  "calls are still routed")

    def _recovered(self, now: float) -> None:
        if self.failing_since is not None:
            self.log.warning("state.write.recovered", failed_for_s=round(now - self.failing_since, 1),
                             attempts=self.failures, registers_refused=self.refused_in_streak,
                             call_records_dropped=self.dropped_calls)
        self.failing_since = None
        self.refused_in_streak = 0
        self.failures = 0
        self.retry_at = 0.0
        self.dropped_calls = 0
