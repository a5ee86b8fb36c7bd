"""One branch of a forked call: an INVITE client transaction (RFC 3261 §17.1.1); pure.

Theory of operation.  A branch is the INVITE the proxy sent to one target.
Its life is the transition table ``TABLE``: (state, event) -> (next state,
actions).  Events are responses from the target (provisional, success,
failure), timers, and the call's wish to cancel it.  Actions are names the
proxy executes (send bytes, forward a response, tell the call the branch
failed).  Timers over UDP: A retransmits the INVITE (T1, doubling) until a
response; B gives up after 64*T1 (a 408 for the call); C gives up on a branch
that rings for three minutes; D absorbs retransmitted final responses for
32 s; E retransmits our CANCEL until its 200 (or 64*T1).  A CANCEL asked for
before any provisional response waits for one (§9.1).  ``next_timer`` says
when the branch next needs the clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.sip.forward import render
from router.sip.message import SipMessage

T1, T2 = 0.5, 4.0
TIMER_B = 64 * T1
TIMER_C = 180.0
TIMER_D = 32.0


class State(enum.Enum):
    CALLING = "calling"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"      # a final failure came and was ACKed
    ACCEPTED = "accepted"        # a 2xx came; the ACK is end to end
    TERMINATED = "terminated"


class Event(enum.Enum):
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    FAILURE = "3xx-6xx"
    TIMER_A = "A"
    TIMER_B = "B"
    TIMER_C = "C"
    TIMER_D = "D"
    TIMER_E = "E"
    CANCEL = "cancel"


S, E = State, Event
TABLE: dict[tuple[State, Event], tuple[State, tuple[str, ...]]] = {
    (S.CALLING, E.PROVISIONAL): (S.PROCEEDING, ("forward_provisional", "cancel_if_pending", "start_c")),
    (S.CALLING, E.SUCCESS): (S.ACCEPTED, ("forward_success",)),
    (S.CALLING, E.FAILURE): (S.COMPLETED, ("ack", "failed", "start_d")),
    (S.CALLING, E.TIMER_A): (S.CALLING, ("retransmit",)),
    (S.CALLING, E.TIMER_B): (S.TERMINATED, ("timed_out",)),
    (S.CALLING, E.CANCEL): (S.CALLING, ("pend_cancel",)),
    (S.PROCEEDING, E.PROVISIONAL): (S.PROCEEDING, ("forward_provisional",)),
    (S.PROCEEDING, E.SUCCESS): (S.ACCEPTED, ("forward_success",)),
    (S.PROCEEDING, E.FAILURE): (S.COMPLETED, ("ack", "failed", "start_d")),
    (S.PROCEEDING, E.TIMER_C): (S.PROCEEDING, ("send_cancel",)),
    (S.PROCEEDING, E.TIMER_E): (S.PROCEEDING, ("resend_cancel",)),
    (S.PROCEEDING, E.TIMER_B): (S.TERMINATED, ("timed_out",)),     # CANCEL never answered
    (S.PROCEEDING, E.CANCEL): (S.PROCEEDING, ("send_cancel",)),
    (S.COMPLETED, E.FAILURE): (S.COMPLETED, ("ack",)),
    (S.COMPLETED, E.TIMER_D): (S.TERMINATED, ()),
    (S.ACCEPTED, E.SUCCESS): (S.ACCEPTED, ("forward_success",)),   # 2xx retransmissions go on
    (S.TERMINATED, E.SUCCESS): (S.TERMINATED, ("forward_success",)),
}


@dataclass
class Branch:
    key: str                          # our Via branch
    call_id: str
    label: str                        # device id or "pstn:<number>", for records and logs
    uri: str                          # Request-URI sent
    host: str
    port: int
    transport: str
    conn: int
    invite: bytes                     # the forwarded INVITE, for retransmission
    via: str                          # our Via on it; ACK and CANCEL reuse it (same branch)
    original: SipMessage              # the INVITE as received: From, To, Call-ID, CSeq
    routes: tuple[str, ...]           # the Route set sent on
    started: float
    state: State = State.CALLING
    cancel_wanted: bool = False
    cancel_reason: str = ""
    cancel_sent_at: float | None = None
    cancel_interval: float = T1
    interval: float = T1
    timers: dict[Event, float] = field(default_factory=dict)
    final_status: int | None = None
    superseded: bool = False          # belongs to an earlier step of the fallback chain
    cseq_offset: int = 0              # >0 after answering a trunk challenge with the next CSeq
    spec: tuple[object, ...] = ()     # how the branch was built, to build it again with credentials

    def arm(self, now: float) -> None:
        self.timers = {Event.TIMER_B: now + TIMER_B}
        if self.transport == "udp":
            self.timers[Event.TIMER_A] = now + T1

    @property
    def done(self) -> bool:
        return self.state in (State.COMPLETED, State.ACCEPTED, State.TERMINATED)

    def next_timer(self) -> float | None:
        return min(self.timers.values()) if self.timers else None

    def due(self, now: float) -> list[Event]:
        return sorted((e for e, at in self.timers.items() if at <= now), key=lambda e: self.timers[e])

    def step(self, event: Event) -> tuple[str, ...]:
        """Apply ``event``; return the actions to execute (unknown pairs do nothing)."""
        row = TABLE.get((self.state, event))
        if row is None:
            self.timers.pop(event, None)
            return ()
        self.state, actions = row
        return actions

    # ------------------------------------------------------------------ timers
    def after_response(self, now: float) -> None:
        self.timers.pop(Event.TIMER_A, None)
        if self.state is not State.CALLING and self.cancel_sent_at is None:
            self.timers.pop(Event.TIMER_B, None)

    def retransmitted(self, now: float) -> None:
        self.interval = min(self.interval * 2, T2)
        self.timers[Event.TIMER_A] = now + self.interval

    def start_c(self, now: float) -> None:
        self.timers[Event.TIMER_C] = now + TIMER_C

    def start_d(self, now: float) -> None:
        self.timers = {Event.TIMER_D: now + (TIMER_D if self.transport == "udp" else 0.0)}

    def cancel_sent(self, now: float) -> None:
        self.cancel_sent_at = now
        self.timers.pop(Event.TIMER_C, None)
        self.timers[Event.TIMER_B] = now + TIMER_B           # give up if the target never answers
        if self.transport == "udp":
            self.timers[Event.TIMER_E] = now + self.cancel_interval

    def cancel_resent(self, now: float) -> None:
        self.cancel_interval = min(self.cancel_interval * 2, T2)
        self.timers[Event.TIMER_E] = now + self.cancel_interval

    def cancel_answered(self) -> None:
        self.timers.pop(Event.TIMER_E, None)

    # ------------------------------------------------------------------ messages
    def _hop_headers(self, method: str, to: str) -> list[tuple[str, str]]:
        req = self.original
        headers = [("via", self.via), ("max-forwards", "70"),
                   ("from", req.header("from") or ""), ("to", to),
                   ("call-id", req.call_id), ("cseq", f"{req.cseq[0] + self.cseq_offset} {method}")]
        headers.extend(("route", r) for r in self.routes)
        return headers

    def ack_for(self, response: SipMessage) -> bytes:
        """ACK to a non-2xx final response: same branch, the response's To (§17.1.1.3)."""
        return render(f"ACK {self.uri} SIP/2.0",
                      self._hop_headers("ACK", response.header("to") or ""), b"")

    def cancel(self) -> bytes:
        headers = self._hop_headers("CANCEL", self.original.header("to") or "")
        if self.cancel_reason:
            headers.append(("reason", self.cancel_reason))
        return render(f"CANCEL {self.uri} SIP/2.0", headers, b"")
