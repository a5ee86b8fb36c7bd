"""One branch of a forked call: an INVITE client transaction (RFC 3261 §17.1.1); pure.

Theory of operation.  A branch is the INVITE the proxy sent to one target.
Its life is the transition table ``TABLE``: (state, event) -> (next state,
actions).  Events are responses from the target (provisional, success,
failure), the branch's own timers, and the call's wish to cancel it.  Every
(state, event) pair is in exactly one of three places: ``TABLE`` (a
transition), ``IGNORED`` (a late or stray response the network may deliver
in that state: dropped on purpose) or ``ILLEGAL`` (the proxy or the branch
got its bookkeeping wrong, e.g. a timer firing that the state never arms):
``step`` raises ``IllegalTransition`` for those instead of doing nothing.

Actions come in two kinds.  The branch runs its own (retransmit the INVITE,
ACK a failure, send or resend the CANCEL, arm or stop timers) and returns the
bytes to send; the call-level ones (``REPORTS``: forward a provisional or a
2xx, the branch failed, the branch timed out) are handed back to the proxy,
which decides for the whole call.

Timers over UDP: A retransmits the INVITE (T1, doubling) until a response;
B gives up after 64*T1 without any response (a 408 for the call) and, once a
CANCEL is sent, gives up on a target that never answers it; C gives up on a
branch that rings for three minutes; D absorbs retransmitted final responses
for 32 s; E retransmits our CANCEL until its 200 (or Timer B).  A CANCEL
asked for before any provisional response waits for one (§9.1).
``next_timer`` says when the branch next needs the clock; ``fire`` runs every
timer due.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.sip.commands import Send, Source, send_to
from router.sip.forward import render
from router.sip.message import SipMessage

T1, T2 = 0.5, 4.0
TIMER_B = 64 * T1
TIMER_C = 180.0
TIMER_D = 32.0


class _Fast(enum.Enum):
    """Members hash by identity, in C: every message looks up (state, event) pairs in
    ``TABLE`` and actions in the proxy's handlers, and Enum's own ``__hash__`` is Python."""

    __hash__ = object.__hash__


class State(_Fast):
    CALLING = "calling"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"      # a final failure came and was ACKed
    ACCEPTED = "accepted"        # a 2xx came; the ACK is end to end
    TERMINATED = "terminated"


class Event(_Fast):
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"
    FAILURE = "3xx-6xx"
    TIMER_A = "A"
    TIMER_B = "B"
    TIMER_C = "C"
    TIMER_D = "D"
    TIMER_E = "E"
    CANCEL = "cancel"


class Action(_Fast):
    # run by the branch itself
    RETRANSMIT = "retransmit"                 # Timer A: the INVITE again, the interval doubled
    STOP_A_B = "stop_a_b"                     # a provisional: no more retransmissions, no Timer B
    CLEAR_TIMERS = "clear_timers"             # the transaction is over for this proxy
    ACK = "ack"                               # a final failure is ACKed hop by hop
    START_C = "start_c"
    START_D = "start_d"
    PEND_CANCEL = "pend_cancel"               # §9.1: no CANCEL before a provisional response
    CANCEL_IF_PENDING = "cancel_if_pending"
    SEND_CANCEL = "send_cancel"
    RESEND_CANCEL = "resend_cancel"           # Timer E
    # reported to the call
    FORWARD_PROVISIONAL = "forward_provisional"
    FORWARD_SUCCESS = "forward_success"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


REPORTS = frozenset({Action.FORWARD_PROVISIONAL, Action.FORWARD_SUCCESS, Action.FAILED, Action.TIMED_OUT})

S, E, A = State, Event, Action
TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.CALLING, E.PROVISIONAL): (S.PROCEEDING, (A.STOP_A_B, A.FORWARD_PROVISIONAL, A.CANCEL_IF_PENDING,
                                                A.START_C)),
    (S.CALLING, E.SUCCESS): (S.ACCEPTED, (A.CLEAR_TIMERS, A.FORWARD_SUCCESS)),
    (S.CALLING, E.FAILURE): (S.COMPLETED, (A.ACK, A.START_D, A.FAILED)),
    (S.CALLING, E.TIMER_A): (S.CALLING, (A.RETRANSMIT,)),
    (S.CALLING, E.TIMER_B): (S.TERMINATED, (A.CLEAR_TIMERS, A.TIMED_OUT)),
    (S.CALLING, E.CANCEL): (S.CALLING, (A.PEND_CANCEL,)),
    (S.PROCEEDING, E.PROVISIONAL): (S.PROCEEDING, (A.FORWARD_PROVISIONAL,)),
    (S.PROCEEDING, E.SUCCESS): (S.ACCEPTED, (A.CLEAR_TIMERS, A.FORWARD_SUCCESS)),
    (S.PROCEEDING, E.FAILURE): (S.COMPLETED, (A.ACK, A.START_D, A.FAILED)),
    (S.PROCEEDING, E.TIMER_B): (S.TERMINATED, (A.CLEAR_TIMERS, A.TIMED_OUT)),   # CANCEL never answered
    (S.PROCEEDING, E.TIMER_C): (S.PROCEEDING, (A.SEND_CANCEL,)),
    (S.PROCEEDING, E.TIMER_E): (S.PROCEEDING, (A.RESEND_CANCEL,)),
    (S.PROCEEDING, E.CANCEL): (S.PROCEEDING, (A.SEND_CANCEL,)),
    (S.COMPLETED, E.FAILURE): (S.COMPLETED, (A.ACK,)),                    # a retransmitted final
    (S.COMPLETED, E.TIMER_D): (S.TERMINATED, (A.CLEAR_TIMERS,)),
    (S.ACCEPTED, E.SUCCESS): (S.ACCEPTED, (A.FORWARD_SUCCESS,)),           # 2xx retransmissions go on
    (S.TERMINATED, E.SUCCESS): (S.TERMINATED, (A.FORWARD_SUCCESS,)),       # a 2xx after Timer B: still a dialog
    (S.TERMINATED, E.FAILURE): (S.TERMINATED, (A.ACK,)),                   # a final after Timer B: stop its resends
}
# Responses the network may deliver late or twice; nothing to do.
IGNORED: frozenset[tuple[State, Event]] = frozenset({
    (S.COMPLETED, E.PROVISIONAL), (S.COMPLETED, E.SUCCESS),
    (S.ACCEPTED, E.PROVISIONAL), (S.ACCEPTED, E.FAILURE),
    (S.TERMINATED, E.PROVISIONAL),
})
# Timers a state never arms, and a CANCEL for a branch that is already done: bugs.
ILLEGAL: frozenset[tuple[State, Event]] = frozenset({
    (S.CALLING, E.TIMER_C), (S.CALLING, E.TIMER_D), (S.CALLING, E.TIMER_E),
    (S.PROCEEDING, E.TIMER_A), (S.PROCEEDING, E.TIMER_D),
    *((state, event) for state in (S.COMPLETED, S.ACCEPTED, S.TERMINATED)
      for event in (E.TIMER_A, E.TIMER_B, E.TIMER_C, E.TIMER_E, E.CANCEL)),
    (S.ACCEPTED, E.TIMER_D), (S.TERMINATED, E.TIMER_D),
})


class IllegalTransition(RuntimeError):
    """An event the branch's state can never legally see: a bug in the proxy or the branch."""


@dataclass
class Step:
    """What one event produced: bytes the branch sends itself, and what the call must hear."""

    sends: list[Send] = field(default_factory=list)
    reports: list[Action] = field(default_factory=list)


@dataclass(frozen=True)
class Spec:
    """How a branch was built, to build it again (the trunk's challenge answered)."""

    uri: str
    label: str
    dest: Source
    add: tuple[tuple[str, str], ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    drop: frozenset[str] = frozenset()
    routes: tuple[str, ...] = ()      # sent before the received Route set: a binding's Path


@dataclass
class Branch:
    key: str                          # our Via branch
    call_id: str
    label: str                        # device id or "pstn:<number>", for records and logs
    uri: str                          # Request-URI sent
    dest: Source                      # where the INVITE went
    invite: bytes                     # the forwarded INVITE, for retransmission
    via: str                          # our Via on it; ACK and CANCEL reuse it (same branch)
    original: SipMessage              # the INVITE as sent: From, To, Call-ID, CSeq
    routes: tuple[str, ...]           # the Route set sent on
    started: float
    spec: Spec
    cseq_offset: int = 0              # >0 after answering a trunk challenge with the next CSeq
    state: State = State.CALLING
    cancel_wanted: bool = False
    cancel_reason: str = ""
    cancel_sent_at: float | None = None
    cancel_interval: float = T1
    interval: float = T1
    timers: dict[Event, float] = field(default_factory=dict)
    final_status: int | None = None
    superseded: bool = False          # belongs to an earlier step of the fallback chain

    def arm(self, now: float) -> None:
        self.timers = {Event.TIMER_B: now + TIMER_B}
        if self.dest.transport == "udp":
            self.timers[Event.TIMER_A] = now + T1

    @property
    def done(self) -> bool:
        return self.state in (State.COMPLETED, State.ACCEPTED, State.TERMINATED)

    def next_timer(self) -> float | None:
        return min(self.timers.values()) if self.timers else None

    # ------------------------------------------------------------------ the machine
    def step(self, event: Event, now: float, response: SipMessage | None = None) -> Step:
        """Apply ``event``; run the branch's own actions, return the rest for the call."""
        row = TABLE.get((self.state, event))
        if row is None:
            if (self.state, event) in IGNORED:
                return Step()
            raise IllegalTransition(f"{event.value} in state {self.state.value} (branch {self.key})")
        self.state, actions = row
        out = Step()
        for action in actions:
            if action in REPORTS:
                out.reports.append(action)
            else:
                self._run(action, now, response, out.sends)
        return out

    def fire(self, now: float) -> list[tuple[Event, Step]]:
        """Every timer due at ``now``, earliest first; a timer cleared by an earlier one does not fire."""
        fired: list[tuple[Event, Step]] = []
        while self.timers:
            event, at = min(self.timers.items(), key=lambda item: item[1])
            if at > now:
                break
            del self.timers[event]
            fired.append((event, self.step(event, now)))
        return fired

    def _run(self, action: Action, now: float, response: SipMessage | None, sends: list[Send]) -> None:
        if action is Action.RETRANSMIT:
            sends.append(self._send(self.invite))
            self.interval = min(self.interval * 2, T2)
            self.timers[Event.TIMER_A] = now + self.interval
        elif action is Action.STOP_A_B:
            self.timers.pop(Event.TIMER_A, None)
            self.timers.pop(Event.TIMER_B, None)
        elif action is Action.CLEAR_TIMERS:
            self.timers.clear()
        elif action is Action.ACK:
            assert response is not None
            sends.append(self._send(self.ack_for(response)))
        elif action is Action.START_C:
            self.timers[Event.TIMER_C] = now + TIMER_C
        elif action is Action.START_D:
            self.timers = {Event.TIMER_D: now + (TIMER_D if self.dest.transport == "udp" else 0.0)}
        elif action is Action.PEND_CANCEL:
            self.cancel_wanted = True
        elif action is Action.CANCEL_IF_PENDING:
            if self.cancel_wanted:
                self._send_cancel(now, sends)
        elif action is Action.SEND_CANCEL:
            self._send_cancel(now, sends)
        elif action is Action.RESEND_CANCEL:
            sends.append(self._send(self.cancel()))
            self.cancel_interval = min(self.cancel_interval * 2, T2)
            self.timers[Event.TIMER_E] = now + self.cancel_interval
        else:   # pragma: no cover -- REPORTS never reach here
            raise IllegalTransition(f"{action.value} is not a branch action")

    def _send_cancel(self, now: float, sends: list[Send]) -> None:
        if self.cancel_sent_at is not None:
            return                       # asked twice (ring timeout, then the caller): one CANCEL
        sends.append(self._send(self.cancel()))
        self.cancel_sent_at = now
        self.timers.pop(Event.TIMER_C, None)
        self.timers[Event.TIMER_B] = now + TIMER_B           # give up if the target never answers
        if self.dest.transport == "udp":
            self.timers[Event.TIMER_E] = now + self.cancel_interval

    def cancel_answered(self) -> None:
        """The 200 to our CANCEL came: stop retransmitting it (the 487 follows)."""
        self.timers.pop(Event.TIMER_E, None)

    # ------------------------------------------------------------------ messages
    def _send(self, data: bytes) -> Send:
        return send_to(self.dest, data)

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
