"""A writer thread for the state database, so the PJSIP thread never waits on disk.

The PJSIP thread hands batches (binding sets, call records) to ``submit``; this
thread owns its own SQLite connection and writes each batch in one
transaction.  ``close`` writes what is queued and stops, bounded in time.
A batch that fails is logged and dropped; the router keeps serving.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterable

from router import log
from router.records import CallRecord
from router.store.interfaces import DeviceBindings
from router.store.sqlite import SqliteBindingStore, SqliteCallStore, connect

_STOP = object()


class StoreWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.log = log.get("store")
        self.thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self.thread.start()

    def replace_many(self, sets: Iterable[DeviceBindings]) -> None:
        self.jobs.put(("bindings", list(sets)))

    def save_many(self, records: Iterable[CallRecord]) -> None:
        self.jobs.put(("calls", list(records)))

    def close(self, timeout: float = 5.0) -> None:
        self.jobs.put(_STOP)
        self.thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.path)
        bindings, calls = SqliteBindingStore(conn), SqliteCallStore(conn)
        while True:
            job = self.jobs.get()
            if job is _STOP:
                break
            kind, items = job  # type: ignore[misc]
            try:
                if kind == "bindings":
                    bindings.replace_many(items)
                else:
                    calls.save_many(items)
            except sqlite3.Error as exc:
                self.log.error("store.write.failed", kind=kind, items=len(items), detail=str(exc))
        conn.close()
