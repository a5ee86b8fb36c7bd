"""The stateful forking proxy (RFC 3261 §16): one INVITE in, branches out; pure.

Theory of operation.  The core admits a new INVITE (``admission``); the proxy
asks the policy core to decide it.  A reject or a redirect is answered
directly.  A fork or a PSTN leg becomes a ``Call`` with one ``Branch`` per
target; each branch is a table-driven INVITE client transaction
(``branch.TABLE``) that runs its own retransmissions, ACKs and CANCELs and
reports the rest here, dispatched through ``REPORT_HANDLERS``:

* the first 2xx is forwarded, a ``Dialog`` opens, and every other branch is
  CANCELled with ``Reason: SIP;cause=200;text="Call completed elsewhere"``;
* provisional responses are forwarded;
* when every branch has failed, the best response is chosen (§16.7.6); if it
  means "nobody answered" and the user's chain has a next step, that step is
  decided and rung, else the best response goes back;
* a 401/407 from the trunk is answered once with its credentials (``pstn``);
* the ring timeout cancels every branch and moves to the next step at once,
  or answers 480;
* a CANCEL from the caller cancels every branch and answers 487.

Every call Record-Routes, so the dialog's ACK, BYE and re-INVITE come back
through the router; ``dialogs`` forwards them between the two ends of the
call only.  A 2xx to the caller, a final failure, or the BYE writes the call
record.  The clock is ``now``; ``next_timer`` says when the proxy next needs
``handle_timer``.
"""

from __future__ import annotations

import heapq
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from router.policy.decide import CallRequest, Decision, Fork, PstnLeg, Redirect, Reject, decide
from router.policy.model import Binding, Policy, Trunk
from router.records import CallRecord
from router.sip import ids, pstn, reach
from router.sip.branch import Action, Branch, Event, Spec, Step
from router.sip.callrules import best_response, quote, restore, summary
from router.sip.commands import Log, SaveCall, Send, Source, phrase, send_to
from router.sip.dialogs import DIALOG_TTL, Dialog, Dialogs, Party, Stranger
from router.sip.forward import (
    Local,
    forward_request,
    loop_hash,
    new_branch,
    our_via,
    routes_after_me,
    strip_top_via,
    via_destination,
)
from router.sip.message import SipMessage, build_response, parse_name_addr, response_destination

# Fall back on these.  430 Flow Failed and 477 come from the edge when the device's
# connection is gone (RFC 5626 §5.3): that device cannot ring, so the next step runs now.
NO_ANSWER = frozenset({408, 480, 404, 410, 430, 477, 500, 502, 503, 504})
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
CALL_LINGER = 32.0
LAZY_AFTER = 5.0        # seconds: deadlines further away than this ...
LAZY_GRID = 0.25        # ... are rounded up to a multiple of this (at most this late)
SERVER = "sip-router/0.1"


@dataclass
class Call:
    call_id: str
    key: tuple[str, ...]
    invite: SipMessage
    source: Source
    caller: Party
    request: CallRequest
    started: float
    user_id: str | None = None
    queue_id: str | None = None
    steps: list[str] = field(default_factory=list)
    branches: dict[str, Branch] = field(default_factory=dict)
    next_step: int | None = None
    ring_deadline: float | None = None
    last_response: bytes | None = None
    final_status: int | None = None
    final_reason: str = ""
    answered_by: str | None = None
    answered_at: float | None = None
    failures: list[tuple[int, SipMessage | None]] = field(default_factory=list)
    rewrite: tuple[str, str] | None = None
    linger_until: float | None = None
    tag: str = field(default_factory=lambda: ids.token_hex(6))   # our To tag for our own answers
    loop_hash: str | None = None
    wake_at: float | None = None        # the time of the call's live entry in ``Proxy.wakeups``
    next_hop_via: str | None = None     # the Via after ours in an answer already found valid

    def active(self) -> list[Branch]:
        return [b for b in self.branches.values() if not b.superseded and not b.done]


@dataclass
class Report:
    """What a branch told its call, with everything a handler may need."""

    call: Call
    branch: Branch
    response: SipMessage | None
    now: float
    out: Emit


Emit = list[Send | SaveCall | Log]


class Proxy:
    def __init__(self, local: Local, policy: Callable[[], Policy],
                 bindings: Callable[[str, float], list[Binding]], dialogs: Dialogs,
                 resolve: Callable[[Trunk], tuple[str, int]] = lambda t: (t.host, t.port)) -> None:
        self.local = local
        self.policy = policy
        self.bindings = bindings
        self.dialogs = dialogs
        self.resolve = resolve
        self.calls: dict[tuple[str, ...], Call] = {}
        self.by_branch: dict[str, tuple[Call, Branch]] = {}
        self.wakeups: list[tuple[float, int, tuple[str, ...]]] = []
        self._seq = 0
        self.report_handlers: dict[Action, Callable[[Report], None]] = {
            Action.FORWARD_PROVISIONAL: self._forward_provisional,
            Action.FORWARD_SUCCESS: self._forward_success,
            Action.FAILED: self._failed,
            Action.TIMED_OUT: self._timed_out,
        }

    # ================================================================== entry points
    def on_invite(self, msg: SipMessage, source: Source, key: tuple[str, ...], caller: Party,
                  request: CallRequest, now: float) -> Emit:
        out: Emit = []
        call = Call(msg.call_id, key, msg, source, caller, request, now)
        self.calls[key] = call
        decision = decide(self.policy(), request, self._all_bindings(request.user, now), now)
        self._apply(call, decision, now, out)
        if isinstance(decision, (Fork, PstnLeg)) and call.final_status is None:
            # Only when the final answer will take a while (§16.2); after the branch
            # INVITEs, so the phones start ringing first.
            self._reply(call, 100, "Trying", out)
        return out

    def retransmission(self, key: tuple[str, ...]) -> Emit:
        call = self.calls.get(key)
        if call is None or call.last_response is None:
            return []
        return [self._to_caller(call, call.last_response)]

    def has_call(self, key: tuple[str, ...]) -> bool:
        return key in self.calls

    def abandon(self, key: tuple[str, ...], now: float) -> Emit:
        """After an internal error on this call's INVITE: CANCEL what rings, drop the call
        (the core answers the caller 500)."""
        call = self.calls.get(key)
        out: Emit = []
        if call is not None:
            call.final_status = 500          # the core's 500 is the caller's answer
            try:
                self._cancel_all(call, 'SIP;cause=500;text="Internal error"', now, out)
            except Exception:   # noqa: BLE001 -- the call is dropped anyway
                pass
            self._forget(call)
        return out

    def on_cancel(self, invite_key: tuple[str, ...], source: Source, reason: str | None,
                  now: float) -> Emit | Stranger | None:
        """The caller gave up.  None when no such INVITE is known (the core answers 481)."""
        call = self.calls.get(invite_key)
        if call is None:
            return None
        if not self.dialogs.speaks_for(call.caller, source, now):
            return Stranger(f"CANCEL from {source.host}:{source.port}, which did not send the INVITE")
        out: Emit = []
        if call.final_status is None:
            self._cancel_all(call, reason or 'SIP;cause=487;text="Cancelled by the caller"', now, out)
            self._final(call, 487, "Request Terminated", now, out)
        return out

    def on_response(self, msg: SipMessage, now: float) -> Emit:
        via = msg.top_via
        if via.host.strip("[]") != self.local.host or (via.port or 5060) != self.local.port:
            return [Log("sip.response.not_ours", (("call_id", msg.call_id),), "debug")]
        found = self.by_branch.get(via.branch)
        if found is None:
            return self.dialogs.on_response(msg)
        call, branch = found
        if msg.method == "CANCEL":
            branch.cancel_answered()
            return []
        if msg.method != "INVITE":
            return []
        vias = msg.all("via")
        if len(vias) < 2 or vias[1] != call.next_hop_via:   # the same as an earlier answer's: checked
            problem = _next_hop_problem(vias)    # §16.7 step 3: the Via after ours must lead somewhere
            if problem is not None:
                return [Log("sip.response.dropped", (("call_id", msg.call_id), ("status", msg.status),
                                                     ("detail", problem)), "warning")]
            call.next_hop_via = vias[1]
        event = Event.PROVISIONAL if msg.status < 200 else \
            Event.SUCCESS if msg.status < 300 else Event.FAILURE
        out: Emit = []
        self._deliver(call, branch, branch.step(event, now, msg), msg, now, out)
        self._schedule(call, now)
        return out

    def on_in_dialog(self, msg: SipMessage, source: Source, now: float) -> Emit | Stranger | None:
        """ACK/BYE/re-INVITE inside a dialog we record-routed; None if unknown."""
        return self.dialogs.on_request(msg, source, now)

    def handle_timer(self, now: float) -> Emit:
        out: Emit = []
        due: list[Call] = []
        while self.wakeups and self.wakeups[0][0] <= now:     # take what is due first: whatever
            at, _, key = heapq.heappop(self.wakeups)           # is scheduled now waits for the next pass
            call = self.calls.get(key)
            if call is not None and call.wake_at == at:       # else forgotten, or rescheduled earlier
                call.wake_at = None
                due.append(call)
        for call in due:
            if call.linger_until is not None and call.linger_until <= now and \
                    all(b.done for b in call.branches.values()):
                self._forget(call)
                continue
            try:
                self._timers_of(call, now, out)
            except Exception:   # noqa: BLE001 -- a bug in one call must not stall the others
                out.append(Log("sip.core.error", (("call_id", call.call_id), ("during", "timers"),
                                                  ("traceback", traceback.format_exc())), "error"))
                self._abandon(call, now, out)
        return out

    def _timers_of(self, call: Call, now: float, out: Emit) -> None:
        if call.ring_deadline is not None and call.ring_deadline <= now:
            call.ring_deadline = None
            self._ring_timeout(call, now, out)
        for branch in list(call.branches.values()):
            for _event, step in branch.fire(now):
                self._deliver(call, branch, step, None, now, out)
        self._schedule(call, now)

    def _abandon(self, call: Call, now: float, out: Emit) -> None:
        """After an internal error: the caller still gets a final answer, and the call is dropped."""
        try:
            if call.final_status is None:
                self._cancel_all(call, 'SIP;cause=500;text="Internal error"', now, out)
                self._final(call, 500, phrase(500), now, out, reason_text="internal error")
        except Exception:   # noqa: BLE001 -- nothing more can be done for this call
            pass
        self._forget(call)

    def next_timer(self) -> float | None:
        wakeups = self.wakeups
        while wakeups:                      # stale entries at the top: dropped, not woken for
            at, _, key = wakeups[0]
            call = self.calls.get(key)
            if call is not None and call.wake_at == at:
                return at
            heapq.heappop(wakeups)
        return None

    def sweep(self, now: float) -> None:
        """Housekeeping: forget ended and aged dialogs."""
        self.dialogs.sweep(now)

    # ================================================================== decisions
    def _apply(self, call: Call, decision: Decision, now: float, out: Emit) -> None:
        out.append(Log("call.why", (("call_id", call.call_id), ("notes", list(decision.notes))), "debug"))
        if isinstance(decision, Reject):
            self._final(call, decision.status, phrase(decision.status), now, out,
                        reason_text=decision.reason)
            return
        if isinstance(decision, Redirect):
            contacts = tuple(("Contact", f"<{t.uri}>;q={t.q:g}") for t in decision.targets)
            call.user_id, call.queue_id = decision.user_id, decision.queue_id
            call.steps.append("redirect")
            self._final(call, 302, "Moved Temporarily", now, out, headers=contacts)
            return
        call.user_id, call.queue_id = decision.user_id, decision.queue_id
        call.steps.append(decision.method.value)
        call.next_step = decision.next_step
        call.ring_deadline = now + decision.ring_timeout
        if isinstance(decision, Fork):
            for target in decision.targets:
                binding = target.binding
                assert binding is not None
                try:
                    dest, path = reach.destination(binding)
                except ValueError as exc:      # a stored binding that no longer parses: ring the others
                    out.append(Log("call.branch.unreachable", (("call_id", call.call_id),
                                   ("device", binding.device_id), ("detail", str(exc))), "warning"))
                    continue
                self._branch(call, Spec(target.uri, target.device_id or target.uri, dest, routes=path),
                             now, out)
        else:
            host, port = self.resolve(decision.trunk)
            leg = pstn.plan(self.policy(), call.invite, decision, Source(host, port, decision.trunk.transport))
            call.rewrite = leg.rewrite
            self._branch(call, leg.spec, now, out)
        out.append(Log("call.routing", (("call_id", call.call_id), ("user", call.user_id),
                                         ("queue", call.queue_id), ("method", decision.method.value),
                                         ("branches", len(call.active()))), "debug"))
        self._schedule(call, now)

    def _branch(self, call: Call, spec: Spec, now: float, out: Emit, cseq_offset: int = 0) -> None:
        if call.loop_hash is None:
            call.loop_hash = loop_hash(call.invite)
        key = new_branch(call.invite, self.local, call.loop_hash)
        headers = dict(spec.replace)
        if cseq_offset:
            headers["cseq"] = f"{call.invite.cseq[0] + cseq_offset} INVITE"
        dest = spec.dest
        routes = (*spec.routes, *routes_after_me(call.invite, self.local))
        data = forward_request(call.invite, spec.uri, self.local, key, dest.transport,
                               (call.source.host, call.source.port),
                               drop=spec.drop | {"proxy-authorization", "authorization"}, add=spec.add,
                               replace=headers, routes=routes)
        if "from" in headers:     # the hop-by-hop ACK/CANCEL must match what we sent
            original = SipMessage(call.invite.method, call.invite.uri, 0, "",
                                  tuple((n, headers["from"] if n == "from" else v)
                                        for n, v in call.invite.headers), b"", call.invite.via0)
        else:
            original = call.invite
        branch = Branch(key, call.call_id, spec.label, spec.uri, dest, data,
                        our_via(self.local, key, dest.transport), original, routes, now, spec, cseq_offset)
        branch.arm(now)
        call.branches[key] = branch
        self.by_branch[key] = (call, branch)
        out.append(send_to(dest, data))

    # ================================================================== branch reports
    def _deliver(self, call: Call, branch: Branch, step: Step, msg: SipMessage | None,
                 now: float, out: Emit) -> None:
        out.extend(step.sends)
        for action in step.reports:
            self.report_handlers[action](Report(call, branch, msg, now, out))

    def _forward_provisional(self, r: Report) -> None:
        msg, call = r.response, r.call
        assert msg is not None
        if msg.status == 100 or call.final_status is not None or r.branch.superseded:
            return
        data = strip_top_via(msg, restore(msg, call.rewrite, call.invite.header("cseq")))
        call.last_response = data
        r.out.append(self._to_caller(call, data))

    def _forward_success(self, r: Report) -> None:
        msg, call, branch, now = r.response, r.call, r.branch, r.now
        assert msg is not None
        branch.final_status = msg.status
        r.out.append(self._to_caller(call, strip_top_via(msg, restore(msg, call.rewrite,
                                                                       call.invite.header("cseq")))))
        first = call.answered_by is None
        if first:
            call.answered_by, call.answered_at = branch.label, now
            call.final_status, call.final_reason = msg.status, msg.reason
            call.ring_deadline = None
            for other in call.branches.values():
                if other is not branch and not other.done:
                    other.superseded = True      # its late answers no longer count for the call
                    self._cancel(call, other, COMPLETED_ELSEWHERE, now, r.out)
        record = self._record(call, None) if first else None
        if self.dialogs.open(Dialog(call.call_id, call.invite.tag("from"), msg.tag("to"),
                                    call.caller, self._callee(branch), now + DIALOG_TTL, record,
                                    call.rewrite, branch.cseq_offset)):
            call.linger_until = now + CALL_LINGER
        if record is not None:
            r.out.append(SaveCall(record))
            r.out.append(Log("call.answered", (("call_id", call.call_id), ("by", branch.label),
                                                ("after_ms", int((now - call.started) * 1000))), "debug"))

    def _callee(self, branch: Branch) -> Party:
        """Who answered: a registered device, or the trunk (or another trusted peer)."""
        if branch.label.startswith(pstn.LABEL_PREFIX):
            return Party(branch.dest, self.dialogs.peer_of(branch.dest.host))
        return Party(branch.dest, device=branch.label)

    def _failed(self, r: Report) -> None:
        msg, call, branch = r.response, r.call, r.branch
        assert msg is not None
        branch.final_status = msg.status
        if msg.status in (401, 407) and not branch.superseded and call.final_status is None:
            spec = pstn.answer_challenge(self.policy().trunk, branch, msg)
            if spec is not None:
                branch.superseded = True
                self._branch(call, spec, r.now, r.out, cseq_offset=1)
                r.out.append(Log("call.trunk_auth", (("call_id", call.call_id), ("status", msg.status)), "debug"))
                return
        if not branch.superseded:
            call.failures.append((msg.status, msg))
        self._settle(call, r.now, r.out)

    def _timed_out(self, r: Report) -> None:
        r.branch.final_status = 408
        if not r.branch.superseded:
            r.call.failures.append((408, None))
        self._settle(r.call, r.now, r.out)

    # ================================================================== call level
    def _cancel(self, call: Call, branch: Branch, reason: str, now: float, out: Emit) -> None:
        branch.cancel_reason = reason
        self._deliver(call, branch, branch.step(Event.CANCEL, now), None, now, out)

    def _cancel_all(self, call: Call, reason: str, now: float, out: Emit) -> None:
        for branch in list(call.branches.values()):
            if not branch.done:
                branch.superseded = True
                self._cancel(call, branch, reason, now, out)

    def _settle(self, call: Call, now: float, out: Emit) -> None:
        """Every branch of this step has failed: fall back, or answer the best failure."""
        if call.final_status is not None or call.active():
            return
        status, msg = best_response(call.failures)
        if status in NO_ANSWER and call.next_step is not None:
            self._next_step(call, now, out, f"{status} from every branch")
            return
        if msg is not None:
            data = strip_top_via(msg, restore(msg, call.rewrite, call.invite.header("cseq")))
            self._final(call, status, msg.reason, now, out, data=data)
        else:
            self._final(call, 408, "Request Timeout", now, out, reason_text="no branch answered in time")

    def _ring_timeout(self, call: Call, now: float, out: Emit) -> None:
        if call.final_status is not None:
            return
        seconds = now - call.started
        self._cancel_all(call, 'SIP;cause=480;text="Ring timeout"', now, out)
        out.append(Log("call.ring_timeout", (("call_id", call.call_id), ("after_s", round(seconds, 1)))))
        if call.next_step is not None:
            self._next_step(call, now, out, "ring timeout")
        else:
            self._final(call, 480, "Temporarily Unavailable", now, out, reason_text="no answer")

    def _next_step(self, call: Call, now: float, out: Emit, why: str) -> None:
        step = call.next_step
        call.next_step = None
        call.failures.clear()
        out.append(Log("call.fallback", (("call_id", call.call_id), ("why", why), ("step", step))))
        request = CallRequest(call.request.user, call.request.queue_header, call.request.called_number,
                              call.request.mode, call.request.may_use_trunk, step or 0)
        decision = decide(self.policy(), request, self._all_bindings(request.user, now), now)
        self._apply(call, decision, now, out)

    def _final(self, call: Call, status: int, phrase: str, now: float, out: Emit, *,
               data: bytes | None = None, reason_text: str = "",
               headers: tuple[tuple[str, str], ...] = ()) -> None:
        if data is None:
            extra = list(headers)
            if reason_text:
                extra.append(("Reason", f'SIP;cause={status};text="{quote(reason_text)}"'))
                extra.append(("Warning", f'399 sip-router "{quote(reason_text)}"'))
            data = self._response(call, status, phrase, tuple(extra))
        call.final_status, call.final_reason = status, reason_text or phrase
        call.ring_deadline = None
        call.last_response = data
        call.linger_until = now + CALL_LINGER
        out.append(self._to_caller(call, data))
        record = self._record(call, now)
        out.append(SaveCall(record))
        out.append(Log("call.completed", summary(record), "info"))
        self._schedule(call, now)

    def _record(self, call: Call, ended: float | None) -> CallRecord:
        caller = parse_name_addr(call.invite.header("from") or "").uri
        return CallRecord(call.call_id, caller, call.user_id, call.queue_id, ">".join(call.steps),
                          tuple(b.label for b in call.branches.values()), call.answered_by,
                          call.final_status or 0, call.final_reason, call.started, call.answered_at, ended)

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.key, None)
        for key in call.branches:
            self.by_branch.pop(key, None)

    # ================================================================== sending
    def _response(self, call: Call, status: int, phrase: str,
                  headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        return build_response(call.invite, status, phrase, (call.source.host, call.source.port),
                              to_tag=call.tag, headers=headers, server=SERVER)

    def _reply(self, call: Call, status: int, phrase: str, out: Emit) -> None:
        data = self._response(call, status, phrase)
        call.last_response = data
        out.append(self._to_caller(call, data))

    def _to_caller(self, call: Call, data: bytes) -> Send:
        src = call.source
        host, port = (response_destination(call.invite, src.host, src.port)
                      if src.transport == "udp" else (src.host, src.port))
        return Send(data, host, port, src.transport, src.conn)

    def _schedule(self, call: Call, now: float) -> None:
        """Wake up for the call's next deadline.  Past its linger time, a call waits only
        for its branches to finish (a branch not yet done always has a timer)."""
        times = [t for t in (b.next_timer() for b in call.branches.values()) if t is not None]
        if call.ring_deadline is not None:
            times.append(call.ring_deadline)
        if call.linger_until is not None:
            if call.linger_until > now:
                times.append(call.linger_until)
            elif all(b.done for b in call.branches.values()):
                times.append(now)             # forgotten on the next pass

        if not times:
            return
        at = min(times)
        if at - now > LAZY_AFTER:     # a far deadline (forget, Timer C, ring time-out): on a grid, so that
            at = math.ceil(at / LAZY_GRID) * LAZY_GRID    # the calls of a busy second share one wake-up
        if call.wake_at == at:
            return            # already due then
        # Otherwise a new entry, also when the call's next deadline moved later (the 180 stopped
        # Timer A): the old entry is stale, and ``next_timer`` drops it rather than wake for it.
        self._seq += 1
        call.wake_at = at     # one live entry per call: an entry at another time is stale, skipped
        heapq.heappush(self.wakeups, (at, self._seq, call.key))

    def _all_bindings(self, user_key: str, now: float) -> list[Binding]:
        user = self.policy().user(user_key)
        return self.bindings(user.id, now) if user is not None else []


def _next_hop_problem(vias: list[str]) -> str | None:
    """Why a response with these Vias cannot be forwarded toward the caller, or None."""
    if len(vias) < 2:
        return "only our Via: the sender dropped the others"
    try:
        via_destination(vias[1])
    except ValueError as exc:
        return f"the Via after ours is not valid: {exc}"
    return None
