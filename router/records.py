"""Call records: one row per routed call, kept in the state database."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallRecord:
    call_id: str
    caller: str                     # the caller's From URI
    user_id: str | None
    queue_id: str | None
    method: str                     # the receive-method steps tried, e.g. "ip_phone>agent_phone"
    branches: tuple[str, ...]       # every device or "pstn:<number>" that was rung
    answered_by: str | None
    status: int                     # final status sent to the caller
    reason: str
    started_at: float
    answered_at: float | None = None
    ended_at: float | None = None
