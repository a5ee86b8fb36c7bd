"""What the pure SIP core asks the engine to do: send bytes, log a line, persist a record."""

from __future__ import annotations

from dataclasses import dataclass

from router.records import CallRecord


@dataclass(frozen=True)
class Send:
    """Bytes to put on the wire, to ``host:port`` over ``transport`` (``conn``: a held TCP transport)."""

    data: bytes
    host: str
    port: int
    transport: str = "udp"
    conn: int = 0


@dataclass(frozen=True)
class Log:
    """A structured log line; calls carry their call_id in ``fields``."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


@dataclass(frozen=True)
class SaveCall:
    """Insert or update this call's record."""

    record: CallRecord
