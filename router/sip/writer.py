"""Who performs the state writes of a group commit: inline, or on a thread of their own.

Theory of operation.  ``GroupCommit`` decides what is written and when, and
what the answers held for a write become; a ``Writer`` performs one
``Batch`` -- the binding sets, then the call records -- and reports an
``Outcome`` to the callback it was given.  ``InlineWriter`` writes at once,
in the caller's thread.  ``WriterThread`` writes on a thread of its own, so
the PJSIP thread never waits for the disk: a durable commit syncs the file
(``synchronous=FULL``), which took 0.5-3 ms on the test host and stopped
every datagram that arrived meanwhile.  SQLite releases the interpreter lock
while it works and syncs, so the loop runs on during the write.  The
outcome comes back through ``finished``, which the loop empties on each
pass (``collect``), after the thread has woken it: the callbacks, and
everything they do with the held answers, run on the loop's thread.  One
batch is written at a time; ``GroupCommit`` keeps what arrives meanwhile for
the next one, so the group grows while the disk is slow.  ``stop`` waits for
the write in progress and turns the writer inline for the last flush.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from router.records import CallRecord
from router.sip.commands import SaveBindings, Send
from router.store.interfaces import BindingWriter, CallWriter


@dataclass
class Batch:
    """What one group commit writes, and the answers that wait for it."""

    bindings: dict[str, SaveBindings]
    calls: dict[str, CallRecord]
    held: list[Send]
    held_data: set[bytes] = field(default_factory=set)
    force: bool = False         # the last flush before stopping: no next one to wait for


@dataclass(frozen=True)
class Outcome:
    """How a batch's writes went: the exception of the part that failed, if one did.  The
    call records are written only after the bindings were."""

    bindings_error: Exception | None = None
    calls_error: Exception | None = None


Done = Callable[[Batch, Outcome, float], None]     # (batch, outcome, now), on the loop's thread


def perform(bindings: BindingWriter, calls: CallWriter, batch: Batch) -> Outcome:
    if batch.bindings:
        try:
            bindings.replace_many(batch.bindings.values())
        except Exception as exc:   # noqa: BLE001 -- any store failure is the caller's to judge
            return Outcome(bindings_error=exc)
    if batch.calls:
        try:
            calls.save_many(batch.calls.values())
        except Exception as exc:   # noqa: BLE001
            return Outcome(calls_error=exc)
    return Outcome()


class Writer(Protocol):
    def write(self, batch: Batch, done: Done, now: float) -> None:
        """Write ``batch``; call ``done`` on the loop's thread when it is written or failed."""

    def collect(self, now: float) -> None:
        """On the loop's thread: run the callbacks of the batches written since."""

    def stop(self) -> None:
        """Wait for the write in progress; from then on, write inline."""


class InlineWriter:
    """Writes in the caller's thread, before ``write`` returns."""

    def __init__(self, bindings: BindingWriter, calls: CallWriter) -> None:
        self.bindings = bindings
        self.calls = calls

    def write(self, batch: Batch, done: Done, now: float) -> None:
        done(batch, perform(self.bindings, self.calls, batch), now)

    def collect(self, now: float) -> None:
        pass

    def stop(self) -> None:
        pass


class WriterThread:
    """Writes on its own thread; ``wake`` ends the loop's wait when a batch is written."""

    def __init__(self, bindings: BindingWriter, calls: CallWriter, wake: Callable[[], None],
                 clock: Callable[[], float]) -> None:
        self.bindings = bindings
        self.calls = calls
        self.wake = wake
        self.clock = clock
        self.jobs: queue.SimpleQueue[tuple[Batch, Done] | None] = queue.SimpleQueue()
        # deque append and popleft are atomic: the thread appends, the loop takes
        self.finished: collections.deque[tuple[Batch, Done, Outcome]] = collections.deque()
        self.thread: threading.Thread | None = None
        self.inline = False

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self.thread.start()

    def write(self, batch: Batch, done: Done, now: float) -> None:
        if self.inline or self.thread is None:
            done(batch, perform(self.bindings, self.calls, batch), now)
            return
        self.jobs.put((batch, done))

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, done = job
            self.finished.append((batch, done, perform(self.bindings, self.calls, batch)))
            self.wake()

    def collect(self, now: float) -> None:
        finished = self.finished
        while finished:
            batch, done, outcome = finished.popleft()
            done(batch, outcome, now)

    def stop(self) -> None:
        if self.thread is not None and not self.inline:
            self.jobs.put(None)
            self.thread.join()    # each attempt is bounded by the busy timeout; then the last flush
        self.inline = True
        self.collect(self.clock())
