"""Server-transaction matching for requests the router answers itself; pure.

Theory of operation.  Over UDP a phone retransmits a request until it hears a
final response (Timer E/F, RFC 3261 §17.1.2).  If our 200 OK to a REGISTER is
lost, the retransmission must get the *same* answer, not be processed again
(a second processing would see an old CSeq and fail).  The non-INVITE server
transaction of §17.2.2 does exactly that: in the Completed state it answers
retransmissions with the stored response until Timer J (64*T1 = 32 s over UDP)
fires.  ``ResponseCache`` is that state, keyed per §17.2.3 (branch, sent-by,
method).  Entries expire in insertion order, so expiry is a deque pop, and
``next_timer`` tells the engine when it needs to call ``expire`` again.
Challenges (401/407) are not stored: answering a retransmission with a fresh
challenge is harmless and halves the memory under a registration storm.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.sip.message import SipMessage

T1 = 0.5
TIMER_J_UDP = 64 * T1
MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True, slots=True)
class Cached:
    data: bytes
    expires_at: float


def transaction_key(request: SipMessage) -> tuple[str, ...]:
    """§17.2.3 matching key; pre-3261 peers fall back to Call-ID, CSeq and From tag."""
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    if via.branch.startswith(MAGIC_COOKIE):
        return (via.branch, via.host, str(via.port or 5060), method)
    cseq_number, _ = request.cseq
    from_value = request.header("from") or ""
    return (request.call_id, str(cseq_number), from_value, method)


class ResponseCache:
    """Completed non-INVITE server transactions, answered from memory."""

    def __init__(self, linger: float = TIMER_J_UDP, limit: int = 500_000) -> None:
        self.linger = linger
        self.limit = limit
        self.entries: dict[tuple[str, ...], Cached] = {}
        self.order: deque[tuple[float, tuple[str, ...]]] = deque()

    def get(self, key: tuple[str, ...], now: float) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None or entry.expires_at <= now:
            return None
        return entry.data

    def put(self, key: tuple[str, ...], data: bytes, now: float) -> None:
        expires = now + self.linger
        self.entries[key] = Cached(data, expires)
        self.order.append((expires, key))
        while len(self.entries) > self.limit:      # a hard bound under a flood
            _, oldest = self.order.popleft()
            self.entries.pop(oldest, None)

    def expire(self, now: float) -> int:
        removed = 0
        while self.order and self.order[0][0] <= now:
            expires, key = self.order.popleft()
            entry = self.entries.get(key)
            if entry is not None and entry.expires_at == expires:
                del self.entries[key]
                removed += 1
        return removed

    def next_timer(self) -> float | None:
        return self.order[0][0] if self.order else None
