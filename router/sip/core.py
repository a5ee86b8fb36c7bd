"""The SIP core: what the router does with each message it receives; pure.

Theory of operation.  The engine hands ``on_request`` the raw bytes of one
request, where it came from and the time; the core returns commands for the
engine to execute (``Send`` bytes somewhere, ``SaveBindings``, ``SaveCall``,
``Log``).  Dispatch is a table from method to handler.  A retransmission of a
request we already answered is answered again from the transaction cache.
Every request gets an answer except ACK: REGISTER goes to the registrar,
OPTIONS is answered 200 (keep-alive pings), INVITE is admitted and handed to
the proxy, requests inside a dialog are forwarded between its two ends only
(a stranger gets 403), methods the router knows but does not serve get 405
with Allow, unknown methods 501 (RFC 3261 §8.2.1).  A request that fails to
parse is answered 400 with the reason when its headers allow a response to
be addressed, and dropped otherwise.  If a handler raises -- a bug, whatever
the request held -- the request is answered 500 and the error logged with its
traceback (``sip.core.error``): no caller is left without an answer.

The parts: ``auth`` (digest gates, shared by REGISTER and INVITE),
``location`` (bindings), ``registrar``, ``admission``, ``proxy`` (calls and
their ``branch`` transactions), ``dialogs`` (in-dialog requests), ``pstn``
(the trunk leg) and ``transaction`` (the response cache).  One timer drives
them all: ``next_timer`` says when, ``handle_timer(now)`` runs what is due,
including the periodic housekeeping (nonces, failure counters, ended dialogs).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

from router.errors import MalformedMessage, sip_status
from router.policy.decide import CallRequest
from router.policy.model import EDGE_CLIENT_HEADER, Binding, DeviceKind, Policy, Trunk
from router.sip import ids
from router.sip.admission import Refused, admit, trusted_peer
from router.sip.auth import Authenticator
from router.sip.callrules import called_number, quote
from router.sip.commands import Command, Log, Reply, Send, Source, phrase
from router.sip.dialogs import Dialogs, Party, Stranger
from router.sip.forward import Local, is_loop
from router.sip.keepalive import Keepalive
from router.sip.location import Location
from router.sip.message import (
    COMPACT,
    SipMessage,
    build_response,
    parse,
    parse_uri,
    response_destination,
)
from router.sip.proxy import Proxy
from router.sip.reach import edge_source
from router.sip.registrar import Outcome, Registrar
from router.sip.transaction import ResponseCache, transaction_key

SERVER = "sip-router/0.1"
DEFAULT_LOCAL = Local("127.0.0.1", 5060)
HOUSEKEEPING = 1.0          # seconds between sweeps of nonces, failure counters and ended dialogs
SHED_RETRY_AFTER = 1        # seconds, in the 503 to a new call while the router is behind
ALLOW = "REGISTER, OPTIONS, INVITE, ACK, CANCEL, BYE"
KNOWN_NOT_SERVED = frozenset({"SUBSCRIBE", "NOTIFY", "MESSAGE", "INFO", "PUBLISH", "REFER",
                              "UPDATE", "PRACK"})
IN_DIALOG = frozenset({"BYE", "UPDATE", "INFO", "PRACK", "REFER", "NOTIFY", "MESSAGE", "SUBSCRIBE"})


class SipCore:
    def __init__(self, policy: Policy, bindings: list[Binding], now: float,
                 secret: bytes | None = None, local: Local = DEFAULT_LOCAL,
                 resolve: Callable[[Trunk], tuple[str, int]] = lambda t: (t.host, t.port)) -> None:
        self.policy = policy
        self.local = local
        self.auth = Authenticator(policy, secret)
        self.location = Location(bindings, now)
        self.registrar = Registrar(policy, (), now, auth=self.auth, location=self.location)
        self.cache = ResponseCache()
        dialogs = Dialogs(local, self._peer_of, self.location.registered_at)
        self.proxy = Proxy(local, lambda: self.policy, lambda user, now: self.location.bindings(now, user),
                           dialogs, resolve)
        settings = policy.registrar
        self.keepalive = Keepalive(local, self.location, policy.domain, settings.keepalive_interval,
                                   settings.keepalive_max_missed)
        self.keepalive.watch(self.location.bindings(now), now)
        self._housekeeping_at = now + HOUSEKEEPING
        # Set by the engine while it is behind (datagrams queue faster than it works them off):
        # a new call then gets 503 at once, so the calls already under way, and registrations,
        # keep their answers in time instead of every one of them waiting in the queue.
        self.overloaded = False
        self.handlers: dict[str, Callable[[SipMessage, Source, float], list[Command]]] = {
            "REGISTER": self._register,
            "OPTIONS": self._options,
            "ACK": self._ack,
            "INVITE": self._invite,
            "CANCEL": self._cancel,
            **{m: self._in_dialog for m in IN_DIALOG},
        }

    def set_policy(self, policy: Policy, now: float,
                   moves: Mapping[str, tuple[str, DeviceKind] | None] | None = None) -> list[Command]:
        """Adopt a reloaded policy; ``moves``: the devices that changed owner or kind, when
        worked out beforehand (else every binding is checked)."""
        self.policy = policy
        settings = policy.registrar
        was_on = self.keepalive.interval > 0
        self.keepalive.configure(policy.domain, settings.keepalive_interval, settings.keepalive_max_missed)
        saves: list[Command] = list(self.registrar.set_policy(policy, moves))
        if not was_on and settings.keepalive_interval > 0:     # turned on: watch who is registered now
            self.keepalive.watch(self.location.bindings(now), now)
        return saves

    def adopt_runtime_changes(self, policy: Policy) -> None:
        """A policy that differs only by run-time changes (receive method, agent phone,
        web password): devices, credentials and settings are the YAML's, so bindings,
        cached HA1s and keep-alives stay as they are; this costs nothing per user."""
        self.policy = policy
        self.registrar.policy = policy
        self.auth.policy = policy

    # --------------------------------------------------------------- entry points
    def on_request(self, data: bytes, source: Source, now: float) -> list[Command]:
        if data[:1].isspace() and not data.strip():   # the strip (a copy) only for what may be one
            return []       # a keep-alive: CRLFs that phones send to hold their NAT mapping open
        try:
            msg = parse(data)
        except MalformedMessage as exc:
            return self._malformed(data, source, exc)
        if not msg.is_request:
            return [Log("sip.response.unexpected", (("status", msg.status),), "debug")]
        try:
            key = transaction_key(msg)
        except ValueError as exc:
            return self._malformed(data, source, MalformedMessage(str(exc)))
        source = edge_source(msg, source, self.policy.edge, EDGE_CLIENT_HEADER)
        cached = self.cache.get(key, now) if msg.method != "ACK" else None
        if cached is not None:
            return [self._send(msg, source, cached)]
        handler = self.handlers.get(msg.method)
        known = msg.method == "INVITE" and self.proxy.has_call(key)     # a retransmission of a live call
        try:
            if handler is None:
                return self._reply(msg, source, now, Reply(501, phrase(501), (("Allow", ALLOW),)))
            return handler(msg, source, now)
        except Exception:   # noqa: BLE001 -- whatever went wrong, the request still gets an answer
            return self._internal_error(msg, source, key, now, known)

    def on_response(self, data: bytes, source: Source, now: float) -> list[Command]:
        try:
            msg = parse(data)
        except MalformedMessage as exc:
            return [Log("sip.malformed", (("source", f"{source.host}:{source.port}"),
                                          ("reason", str(exc))), "warning")]
        if msg.is_request:
            return self.on_request(data, source, now)
        try:
            if self.keepalive.is_ping(msg):
                self.keepalive.on_response(msg)
                return []
            return list(self.proxy.on_response(msg, now))
        except Exception:   # noqa: BLE001 -- one response must not stop the others
            return [Log("sip.core.error", (("call_id", msg.call_id), ("status", msg.status),
                                           ("traceback", traceback.format_exc())), "error")]

    # --------------------------------------------------------------- the one timer
    def next_timer(self) -> float:
        """When the core next needs ``handle_timer``: the earliest of the proxy's
        transaction timers, the next binding expiry, the next cached response to
        forget, and the periodic housekeeping."""
        due = self._housekeeping_at
        for part in (self.proxy.next_timer(), self.location.next_timer(), self.cache.next_timer(),
                     self.keepalive.next_timer()):
            if part is not None and part < due:
                due = part
        return due

    def handle_timer(self, now: float) -> list[Command]:
        """Run everything due at ``now``; the engine calls it when ``next_timer`` has passed."""
        out: list[Command] = []
        due = self.proxy.next_timer()
        if due is not None and due <= now:
            out.extend(self.proxy.handle_timer(now))
        due = self.location.next_timer()
        if due is not None and due <= now:
            out.extend(self.location.expire(now))
        due = self.cache.next_timer()
        if due is not None and due <= now:
            self.cache.expire(now)
        due = self.keepalive.next_timer()
        if due is not None and due <= now:
            out.extend(self.keepalive.handle_timer(now))
        if now >= self._housekeeping_at:
            self._housekeeping_at = now + HOUSEKEEPING
            self.auth.housekeeping(now)
            self.proxy.sweep(now)
        return out

    def _peer_of(self, host: str) -> str | None:
        peer = trusted_peer(self.policy, host)
        return peer.name if peer is not None else None

    # --------------------------------------------------------------- handlers
    def _register(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        outcome: Outcome = self.registrar.register(msg, source, now)
        commands: list[Command] = self._reply(msg, source, now, outcome.reply)
        if outcome.save is not None:
            commands.append(outcome.save)
            self.keepalive.watch(outcome.save.bindings, now)
        commands.append(Log(outcome.event, (("call_id", msg.call_id), ("source", _who(source)),
                                            ("status", outcome.reply.status), *outcome.fields),
                            outcome.level))
        return commands

    def _options(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        # Supported lists only extensions the router implements: Path (RFC 3327), not outbound.
        return self._reply(msg, source, now, Reply(200, "OK", (("Allow", ALLOW), ("Accept", "application/sdp"),
                                                               ("Supported", "path"))))

    def _invite(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        if msg.tag("to"):
            return self._in_dialog(msg, source, now)
        key = transaction_key(msg)
        if self.proxy.has_call(key):
            return list(self.proxy.retransmission(key))
        if self.overloaded:
            return [*self._reply(msg, source, now, Reply(503, phrase(503), (("Retry-After", str(SHED_RETRY_AFTER)),)),
                                 cache=False),
                    Log("call.shed", (("call_id", msg.call_id),), "debug")]
        if int(msg.header("max-forwards") or "70") == 0:
            return self._reply(msg, source, now, Reply(483, phrase(483)))
        if is_loop(msg, self.local):
            return self._reply(msg, source, now, Reply(482, phrase(482)))
        try:
            target = parse_uri(msg.uri)
        except MalformedMessage as exc:
            status = 416 if msg.uri.partition(":")[0].lower() not in ("sip", "sips", "tel") else 400
            warning = (("Warning", f'399 - "{quote(str(exc))}"'),)
            return self._reply(msg, source, now, Reply(status, phrase(status), warning))
        verdict = admit(self.policy, msg, source.origin_host, self.auth, self.location.is_registered, now)
        if isinstance(verdict, Refused):
            headers: tuple[tuple[str, str], ...] = ()
            if verdict.status == 407:
                headers = tuple(("Proxy-Authenticate", c) for c in self.auth.challenge(
                    now, self.registrar.algorithms_for(msg), stale=verdict.stale))
            log = Log("call.refused", (("call_id", msg.call_id), ("status", verdict.status),
                                       ("detail", verdict.detail)),
                      "debug" if verdict.status == 407 else "warning")
            return [*self._reply(msg, source, now, Reply(verdict.status, verdict.reason, headers)), log]
        request = CallRequest(user=target.user, queue_header=msg.header(self.policy.routing.queue_header.lower()),
                              called_number=called_number(msg), mode=verdict.mode,
                              may_use_trunk=verdict.may_use_trunk)
        caller = Party(source, verdict.peer, verdict.device_id)
        log = Log("call.received", (("call_id", msg.call_id), ("from", verdict.who), ("user", target.user)), "debug")
        return [log, *list(self.proxy.on_invite(msg, source, key, caller, request, now))]

    def _cancel(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        invite_key = transaction_key(msg)[:-1] + ("INVITE",)
        emitted = self.proxy.on_cancel(invite_key, source, msg.header("reason"), now)
        if emitted is None:
            return self._reply(msg, source, now, Reply(481, phrase(481)))
        if isinstance(emitted, Stranger):
            return [*self._reply(msg, source, now, Reply(403, phrase(403)), cache=False),
                    self._stranger_log(msg, source, emitted)]
        return [*self._reply(msg, source, now, Reply(200, "OK")), *list(emitted)]

    def _ack(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        if self.proxy.has_call(transaction_key(msg)):
            return []          # the ACK of a final failure we sent: absorbed (§17.2.1)
        emitted = self.proxy.on_in_dialog(msg, source, now)
        if isinstance(emitted, Stranger):
            return [self._stranger_log(msg, source, emitted)]      # an ACK is never answered
        return list(emitted) if emitted else []

    def _in_dialog(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        if not msg.tag("to"):
            if msg.method in KNOWN_NOT_SERVED:
                return self._reply(msg, source, now, Reply(405, phrase(405), (("Allow", ALLOW),)))
            return self._reply(msg, source, now, Reply(481, phrase(481)))
        if int(msg.header("max-forwards") or "70") == 0:
            return self._reply(msg, source, now, Reply(483, phrase(483)))
        emitted = self.proxy.on_in_dialog(msg, source, now)
        if emitted is None:
            return self._reply(msg, source, now, Reply(481, phrase(481)))
        if isinstance(emitted, Stranger):
            warning = (("Warning", '399 - "not a party to this dialog"'),)
            return [*self._reply(msg, source, now, Reply(403, phrase(403), warning), cache=False),
                    self._stranger_log(msg, source, emitted)]
        return list(emitted)

    @staticmethod
    def _stranger_log(msg: SipMessage, source: Source, stranger: Stranger) -> Log:
        return Log("call.in_dialog.refused", (("call_id", msg.call_id), ("method", msg.method),
                                               ("source", _who(source)),
                                               ("detail", stranger.detail)), "warning")

    def _internal_error(self, msg: SipMessage, source: Source, key: tuple[str, ...], now: float,
                        known: bool) -> list[Command]:
        log = Log("sip.core.error", (("call_id", msg.call_id), ("method", msg.method),
                                     ("source", _who(source)),
                                     ("traceback", traceback.format_exc())), "error")
        if msg.method == "ACK" or known:
            return [log]             # an ACK is never answered; a live call keeps its own answers
        cancels: list[Command] = list(self.proxy.abandon(key, now)) if msg.method == "INVITE" else []
        try:
            return [*self._reply(msg, source, now, Reply(500, phrase(500))), *cancels, log]
        except Exception:   # noqa: BLE001 -- not even a 500 could be built: log it
            return [*cancels, log]

    # --------------------------------------------------------------- helpers
    def _send(self, msg: SipMessage, source: Source, data: bytes) -> Send:
        host, port = (response_destination(msg, source.host, source.port)
                      if source.transport == "udp" else (source.host, source.port))
        return Send(data, host, port, source.transport, source.conn)

    def _reply(self, msg: SipMessage, source: Source, now: float, reply: Reply,
               cache: bool = True) -> list[Command]:
        """Answer ``msg``.  A refusal to a stranger is not cached: it must not answer the
        real party's request that carries the same transaction key."""
        data = build_response(msg, reply.status, reply.reason, (source.host, source.port),
                              to_tag=ids.token_hex(6), headers=reply.headers, server=SERVER)
        if cache and reply.status >= 200 and reply.status not in (401, 407):
            self.cache.put(transaction_key(msg), data, now)
        return [self._send(msg, source, data)]

    def _malformed(self, data: bytes, source: Source, exc: MalformedMessage) -> list[Command]:
        log = Log("sip.malformed", (("source", f"{source.host}:{source.port}"), ("reason", str(exc))),
                  "warning")
        stub = _lenient(data)
        if stub is None or stub.method == "ACK":
            return [log]
        status, reason = sip_status(exc)
        try:
            reply = build_response(stub, status, reason, (source.host, source.port),
                                   to_tag=ids.token_hex(6),
                                   headers=(("Warning", f'399 - "{quote(str(exc))}"'),),
                                   server=SERVER)
            send = self._send(stub, source, reply)
        except (MalformedMessage, ValueError, IndexError):
            return [log]
        return [send, log]


def _lenient(data: bytes) -> SipMessage | None:
    """Just enough of a broken request to address a 400 to it, or None."""
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    head = text.split("\n\n", 1)[0].split("\n")
    parts = head[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0":
        return None
    headers: list[tuple[str, str]] = []
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if colon:
            key = name.strip().lower()
            headers.append((COMPACT.get(key, key), value.strip()))
    stub = SipMessage(parts[0], parts[1], 0, "", tuple(headers))
    present = {n for n, _ in headers}
    if not {"via", "from", "to", "call-id", "cseq"} <= present:
        return None
    try:
        _ = stub.top_via          # parses the top Via, or raises
    except (ValueError, IndexError):
        return None
    return stub


def _who(source: Source) -> str:
    """Who sent a request, for logs: behind the edge, the device's own address."""
    if source.via_edge:
        return f"{source.client_host}:{source.client_port} ({source.client_transport} via edge)"
    return f"{source.host}:{source.port}"
