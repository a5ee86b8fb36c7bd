"""The stateful forking proxy (RFC 3261 §16): one INVITE in, branches out; pure.

Theory of operation.  A new INVITE is admitted (``admission``), answered 100
at once, and decided by the policy core.  A reject or a redirect is answered
directly.  A fork or a PSTN leg becomes a ``Call`` with one ``Branch`` per
target; each branch is a table-driven INVITE client transaction
(``branch.TABLE``).  The call reacts to what its branches report:

* the first 2xx is forwarded and every other branch is CANCELled with
  ``Reason: SIP;cause=200;text="Call completed elsewhere"``;
* provisional responses are forwarded;
* when every branch has failed, the best response is chosen (§16.7.6); if it
  means "nobody answered" and the user's chain has a next step, that step is
  decided and rung, else the best response goes back;
* the ring timeout cancels every branch and moves to the next step at once,
  or answers 480;
* a CANCEL from the caller cancels every branch and answers 487.

Every call Record-Routes, so the dialog's ACK, BYE and re-INVITE come back
through the router; they are forwarded between the two known ends of the
dialog only (``Dialog``), never to an address a stranger names.  A 2xx to
the caller, a final failure, or the BYE writes the call record.  The clock is
``now``; ``next_timer`` says when the proxy next needs ``handle_timer``.
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from router.policy.decide import CallRequest, Decision, Fork, PstnLeg, Redirect, Reject, decide
from router.policy.model import Binding, Policy, Trunk
from router.records import CallRecord
from router.sip.branch import Branch, Event
from router.sip.commands import Log, SaveCall, Send, Source, phrase
from router.sip.forward import (
    Local, forward_request, loop_hash, new_branch, our_via, routes_after_me, strip_top_via,
    via_destination,
)
from router.sip.message import SipMessage, build_response, parse_name_addr, response_destination
from router.sip.callrules import (
    best_response, quote, restore, rewrite_headers, summary,
)
from router.sip.uac_auth import credentials_header

NO_ANSWER = frozenset({408, 480, 404, 410, 500, 502, 503, 504})   # fall back on these
COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
DIALOG_TTL = 12 * 3600.0
CALL_LINGER = 32.0


@dataclass
class Dialog:
    caller_tag: str
    caller: Source
    callee: Source
    call_id: str
    expires_at: float
    record: CallRecord
    rewrite: tuple[str, str] | None = None     # (caller's From, the hotline From) when From is rewritten
    ended: bool = False
    cseq_offset: int = 0                       # added to the caller's CSeq toward the callee


@dataclass
class Call:
    call_id: str
    key: tuple[str, ...]
    invite: SipMessage
    source: Source
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
    tag: str = field(default_factory=lambda: secrets.token_hex(6))   # our To tag for our own answers
    loop_hash: str | None = None

    def active(self) -> list[Branch]:
        return [b for b in self.branches.values() if not b.superseded and not b.done]


Emit = list[Send | SaveCall | Log]


class Proxy:
    def __init__(self, local: Local, policy: Callable[[], Policy],
                 bindings: Callable[[str, float], list[Binding]],
                 resolve: Callable[[Trunk], tuple[str, int]] = lambda t: (t.host, t.port)) -> None:
        self.local = local
        self.policy = policy
        self.bindings = bindings
        self.resolve = resolve
        self.calls: dict[tuple[str, ...], Call] = {}
        self.by_branch: dict[str, tuple[Call, Branch]] = {}
        self.dialogs: dict[str, Dialog] = {}
        self.wakeups: list[tuple[float, int, tuple[str, ...]]] = []
        self._seq = 0

    # ================================================================== entry points
    def on_invite(self, msg: SipMessage, source: Source, key: tuple[str, ...],
                  request: CallRequest, now: float) -> Emit:
        out: Emit = []
        call = Call(msg.call_id, key, msg, source, request, now)
        self.calls[key] = call
        decision = decide(self.policy(), request, self._all_bindings(request.user, now), now)
        self._apply(call, decision, now, out)
        if isinstance(decision, (Fork, PstnLeg)):
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

    def on_cancel(self, msg: SipMessage, source: Source, invite_key: tuple[str, ...], now: float) -> Emit | None:
        """The caller gave up.  None when no such INVITE is known (the core answers 481)."""
        call = self.calls.get(invite_key)
        if call is None:
            return None
        out: Emit = []
        if call.final_status is None:
            reason = msg.header("reason") or 'SIP;cause=487;text="Cancelled by the caller"'
            self._cancel_all(call, reason, now, out)
            self._final(call, 487, "Request Terminated", now, out)
        return out

    def on_response(self, msg: SipMessage, now: float) -> Emit:
        via = msg.top_via
        if via.host.strip("[]") != self.local.host or (via.port or 5060) != self.local.port:
            return [Log("sip.response.not_ours", (("call_id", msg.call_id),), "debug")]
        found = self.by_branch.get(via.branch)
        if found is None:
            return self._stateless_response(msg)
        call, branch = found
        if msg.method == "CANCEL":
            branch.cancel_answered()
            return []
        if msg.method != "INVITE":
            return []
        event = Event.PROVISIONAL if msg.status < 200 else \
            Event.SUCCESS if msg.status < 300 else Event.FAILURE
        out: Emit = []
        branch.after_response(now)
        self._run(call, branch, event, now, out, msg)
        self._schedule(call)
        return out

    def handle_timer(self, now: float) -> Emit:
        out: Emit = []
        while self.wakeups and self.wakeups[0][0] <= now:
            _, _, key = heapq.heappop(self.wakeups)
            call = self.calls.get(key)
            if call is None:
                continue
            if call.linger_until is not None and call.linger_until <= now and \
                    all(b.done for b in call.branches.values()):
                self._forget(call)
                continue
            if call.ring_deadline is not None and call.ring_deadline <= now:
                call.ring_deadline = None
                self._ring_timeout(call, now, out)
            for branch in list(call.branches.values()):
                for event in branch.due(now):
                    branch.timers.pop(event, None)
                    self._run(call, branch, event, now, out, None)
            self._schedule(call)
        return out

    def sweep(self, now: float) -> None:
        """Forget ended and aged dialogs (housekeeping: they age out in minutes)."""
        for call_id, dialog in list(self.dialogs.items()):
            if dialog.expires_at <= now:
                del self.dialogs[call_id]

    def next_timer(self) -> float | None:
        return self.wakeups[0][0] if self.wakeups else None

    def on_in_dialog(self, msg: SipMessage, source: Source, now: float) -> Emit | None:
        """ACK/BYE/re-INVITE inside a dialog we record-routed; None if unknown."""
        dialog = self.dialogs.get(msg.call_id)
        if dialog is None:
            return None
        from_tag = parse_name_addr(msg.header("from") or "").tag
        toward = dialog.callee if from_tag == dialog.caller_tag else dialog.caller
        rewritten = rewrite_headers(msg, dialog.rewrite, from_tag == dialog.caller_tag) or {}
        if dialog.cseq_offset and from_tag == dialog.caller_tag:
            number, method = msg.cseq
            rewritten["cseq"] = f"{number + dialog.cseq_offset} {method}"
        data = forward_request(msg, msg.uri, self.local, new_branch(msg), toward.transport,
                               (source.host, source.port), record_route=False, replace=rewritten)
        out: Emit = [Send(data, toward.host, toward.port, toward.transport, toward.conn)]
        if msg.method == "BYE" and not dialog.ended:
            dialog.ended = True
            dialog.expires_at = now + CALL_LINGER
            record = replace(dialog.record, ended_at=now)
            who = "caller" if toward is dialog.callee else "callee"
            out += [SaveCall(record), Log("call.completed", summary(record) + (("ended_by", who),))]
        return out

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
        assert isinstance(decision, (Fork, PstnLeg))
        call.user_id, call.queue_id = decision.user_id, decision.queue_id
        call.steps.append(decision.method.value)
        call.next_step = decision.next_step
        call.ring_deadline = now + decision.ring_timeout
        if isinstance(decision, Fork):
            for target in decision.targets:
                binding = target.binding
                assert binding is not None
                dest = Source(binding.source_host, binding.source_port, binding.transport, binding.conn)
                self._branch(call, target.uri, target.device_id or target.uri, dest, now, out)
        else:
            self._pstn(call, decision, now, out)
        out.append(Log("call.routing", (("call_id", call.call_id), ("user", call.user_id),
                                         ("queue", call.queue_id), ("method", decision.method.value),
                                         ("branches", len(call.active()))), "debug"))
        self._schedule(call)

    def _pstn(self, call: Call, leg: PstnLeg, now: float, out: Emit) -> None:
        policy = self.policy()
        trunk = leg.trunk
        hotline_uri = f"sip:{leg.caller_id}@{trunk.host}"
        user = policy.user(leg.user_id)
        agent = user.extension if user is not None and user.extension else leg.user_id
        add = [("P-Asserted-Identity", f"<{hotline_uri}>"),
               ("Diversion", f"<sip:{agent}@{policy.domain}>;reason=deflection;counter=1")]
        headers: dict[str, str] = {}
        if trunk.caller_id.value == "from":
            original = call.invite.header("from") or ""
            addr = parse_name_addr(original)
            tag = f";tag={addr.tag}" if addr.tag else ""
            headers["from"] = f'"{leg.caller_id}" <sip:{leg.caller_id}@{policy.domain}>{tag}'
            call.rewrite = (original, headers["from"])
        host, port = self.resolve(trunk)
        dest = Source(host, port, trunk.transport, 0)
        self._branch(call, leg.target.uri, f"pstn:{leg.number}", dest, now, out,
                     add=tuple(add), replace=headers,
                     drop=frozenset({policy.routing.queue_header.lower(), "p-asserted-identity",
                                     "diversion"}))

    def _branch(self, call: Call, uri: str, label: str, dest: Source, now: float, out: Emit,
                add: tuple[tuple[str, str], ...] = (), replace: dict[str, str] | None = None,
                drop: frozenset[str] = frozenset(), cseq_offset: int = 0,
                credentials: tuple[str, str] | None = None) -> None:
        if call.loop_hash is None:
            call.loop_hash = loop_hash(call.invite)
        key = new_branch(call.invite, call.loop_hash)
        headers = dict(replace or {})
        if cseq_offset:
            headers["cseq"] = f"{call.invite.cseq[0] + cseq_offset} INVITE"
        extra = add + ((credentials,) if credentials else ())
        data = forward_request(call.invite, uri, self.local, key, dest.transport,
                               (call.source.host, call.source.port),
                               drop=drop | {"proxy-authorization", "authorization"}, add=extra,
                               replace=headers)
        if replace and "from" in replace:     # the hop-by-hop ACK/CANCEL must match what we sent
            original = SipMessage(call.invite.method, call.invite.uri, 0, "",
                                  tuple((n, replace["from"] if n == "from" else v)
                                        for n, v in call.invite.headers), b"", call.invite.via0)
        else:
            original = call.invite
        branch = Branch(key, call.call_id, label, uri, dest.host, dest.port, dest.transport,
                        dest.conn, data, our_via(self.local, key, dest.transport), original,
                        tuple(routes_after_me(call.invite, self.local)), now)
        branch.cseq_offset = cseq_offset
        branch.spec = (uri, label, dest, add, replace, drop)
        branch.arm(now)
        call.branches[key] = branch
        self.by_branch[key] = (call, branch)
        out.append(Send(data, dest.host, dest.port, dest.transport, dest.conn))

    # ================================================================== branch events
    def _run(self, call: Call, branch: Branch, event: Event, now: float, out: Emit,
             msg: SipMessage | None) -> None:
        for action in branch.step(event):
            getattr(self, f"_do_{action}")(call, branch, msg, now, out)

    def _do_forward_provisional(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        if msg.status == 100 or call.final_status is not None or branch.superseded:
            return
        data = strip_top_via(msg, restore(msg, call.rewrite, call.invite.header("cseq")))
        call.last_response = data
        out.append(self._to_caller(call, data))

    def _do_forward_success(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.final_status = msg.status
        out.append(self._to_caller(call, strip_top_via(msg, restore(msg, call.rewrite,
                                                                     call.invite.header("cseq")))))
        if call.answered_by is not None:
            return
        call.answered_by, call.answered_at = branch.label, now
        call.final_status, call.final_reason = msg.status, msg.reason
        call.ring_deadline = None
        for other in call.branches.values():
            if other is not branch and not other.done:
                self._cancel(other, COMPLETED_ELSEWHERE, now, out)
        caller_tag = parse_name_addr(call.invite.header("from") or "").tag or ""
        callee = Source(branch.host, branch.port, branch.transport, branch.conn)
        record = self._record(call, None)
        self.dialogs[call.call_id] = Dialog(caller_tag, call.source, callee, call.call_id,
                                            now + DIALOG_TTL, record, call.rewrite,
                                            cseq_offset=branch.cseq_offset)
        call.linger_until = now + CALL_LINGER
        out.append(SaveCall(record))
        out.append(Log("call.answered", (("call_id", call.call_id), ("by", branch.label),
                                          ("after_ms", int((now - call.started) * 1000))), "debug"))

    def _do_ack(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        out.append(Send(branch.ack_for(msg), branch.host, branch.port, branch.transport, branch.conn))

    def _do_failed(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.final_status = msg.status
        if msg.status in (401, 407) and not branch.superseded and self._answer_challenge(call, branch, msg, now, out):
            return
        if not branch.superseded:
            call.failures.append((msg.status, msg))
        self._settle(call, now, out)

    def _answer_challenge(self, call: Call, branch: Branch, msg: SipMessage, now: float, out: Emit) -> bool:
        """The trunk challenged the PSTN leg: send it again once, with the trunk's credentials."""
        trunk = self.policy().trunk
        if trunk is None or trunk.username is None or not branch.label.startswith("pstn:") \
                or branch.cseq_offset or trunk.password is None:
            return False
        header = credentials_header(msg, "INVITE", branch.uri, trunk.username, trunk.password, trunk.realm)
        if header is None:
            return False
        uri, label, dest, add, replace, drop = branch.spec
        branch.superseded = True
        self._branch(call, uri, label, dest, now, out, add, replace, drop,  # type: ignore[arg-type]
                     cseq_offset=1, credentials=header)
        out.append(Log("call.trunk_auth", (("call_id", call.call_id), ("status", msg.status)), "debug"))
        return True

    def _do_timed_out(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.final_status = 408
        if not branch.superseded:
            call.failures.append((408, None))
        self._settle(call, now, out)

    def _do_retransmit(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        out.append(Send(branch.invite, branch.host, branch.port, branch.transport, branch.conn))
        branch.retransmitted(now)

    def _do_pend_cancel(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.cancel_wanted = True

    def _do_cancel_if_pending(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        if branch.cancel_wanted and branch.cancel_sent_at is None:
            self._do_send_cancel(call, branch, msg, now, out)

    def _do_send_cancel(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        if branch.cancel_sent_at is None:
            out.append(Send(branch.cancel(), branch.host, branch.port, branch.transport, branch.conn))
            branch.cancel_sent(now)

    def _do_resend_cancel(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        out.append(Send(branch.cancel(), branch.host, branch.port, branch.transport, branch.conn))
        branch.cancel_resent(now)

    def _do_start_c(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.start_c(now)

    def _do_start_d(self, call, branch, msg, now, out) -> None:  # type: ignore[no-untyped-def]
        branch.start_d(now)

    # ================================================================== call level
    def _cancel(self, branch: Branch, reason: str, now: float, out: Emit) -> None:
        branch.cancel_reason = reason
        call = self.by_branch[branch.key][0]
        self._run(call, branch, Event.CANCEL, now, out, None)

    def _cancel_all(self, call: Call, reason: str, now: float, out: Emit) -> None:
        for branch in call.branches.values():
            if not branch.done:
                branch.superseded = True
                self._cancel(branch, reason, now, out)

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
        self._schedule(call)

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
                              to_tag=call.tag, headers=headers, server="sip-router/0.1")

    def _reply(self, call: Call, status: int, phrase: str, out: Emit) -> None:
        data = self._response(call, status, phrase)
        call.last_response = data
        out.append(self._to_caller(call, data))

    def _to_caller(self, call: Call, data: bytes) -> Send:
        src = call.source
        host, port = (response_destination(call.invite, src.host, src.port)
                      if src.transport == "udp" else (src.host, src.port))
        return Send(data, host, port, src.transport, src.conn)

    def _stateless_response(self, msg: SipMessage) -> Emit:
        vias = msg.all("via")
        if len(vias) < 2:
            return []
        host, port = via_destination(vias[1])
        dialog = self.dialogs.get(msg.call_id)
        undo = None
        if dialog is not None:
            toward_caller = parse_name_addr(msg.header("from") or "").tag == dialog.caller_tag
            undo = restore(msg, dialog.rewrite, None, dialog.cseq_offset if toward_caller else 0)
        transport = vias[1].split()[0].rsplit("/", 1)[-1].lower()
        return [Send(strip_top_via(msg, undo), host, port, "tcp" if transport == "tcp" else "udp")]

    def _schedule(self, call: Call) -> None:
        times = [t for t in (b.next_timer() for b in call.branches.values()) if t is not None]
        if call.ring_deadline is not None:
            times.append(call.ring_deadline)
        if call.linger_until is not None:
            times.append(call.linger_until)
        if times:
            self._seq += 1
            heapq.heappush(self.wakeups, (min(times), self._seq, call.key))

    def _all_bindings(self, user_key: str, now: float) -> list[Binding]:
        user = self.policy().user(user_key)
        return self.bindings(user.id, now) if user is not None else []
