"""The SIP core: what the router does with each request it receives; pure.

Theory of operation.  The engine hands ``on_request`` the raw bytes of one
request, where it came from and the time; the core returns commands for the
engine to execute (``Send`` bytes somewhere, ``SaveBindings``, ``Log``).
Dispatch is a table from method to handler.  A retransmission of a request
we already answered is answered again from the transaction cache.  Every
request gets an answer except ACK: REGISTER goes to the registrar, OPTIONS is
answered 200 (keep-alive pings), methods the router knows but does not serve
get 405 with Allow, unknown methods 501 (RFC 3261 §8.2.1).  A request that
fails to parse is answered 400 with the reason when its headers allow a
response to be addressed, and dropped otherwise; nothing here raises.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from router.errors import MalformedMessage, sip_status
from router.policy.model import Binding, Policy
from router.sip.message import (
    COMPACT, SipMessage, build_response, parse, response_destination,
)
from router.sip.registrar import Outcome, Registrar, Reply, SaveBindings, Source
from router.sip.transaction import ResponseCache, transaction_key

SERVER = "sip-router/0.1"
ALLOW = "REGISTER, OPTIONS, INVITE, ACK, CANCEL, BYE"
KNOWN_NOT_SERVED = frozenset({"SUBSCRIBE", "NOTIFY", "MESSAGE", "INFO", "PUBLISH", "REFER",
                              "UPDATE", "PRACK"})


@dataclass(frozen=True)
class Send:
    data: bytes
    host: str
    port: int
    transport: str = "udp"
    conn: int = 0


@dataclass(frozen=True)
class Log:
    event: str
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


Command = Send | SaveBindings | Log


class SipCore:
    def __init__(self, policy: Policy, bindings: list[Binding], now: float,
                 secret: bytes | None = None) -> None:
        self.policy = policy
        self.registrar = Registrar(policy, bindings, now, secret)
        self.cache = ResponseCache()
        self.handlers: dict[str, Callable[[SipMessage, Source, float], list[Command]]] = {
            "REGISTER": self._register,
            "OPTIONS": self._options,
            "ACK": lambda m, s, n: [],
            "INVITE": self._not_yet,
            "CANCEL": self._no_transaction,
            "BYE": self._no_transaction,
        }

    def set_policy(self, policy: Policy) -> list[Command]:
        self.policy = policy
        return list(self.registrar.set_policy(policy))

    # --------------------------------------------------------------- entry point
    def on_request(self, data: bytes, source: Source, now: float) -> list[Command]:
        try:
            msg = parse(data)
        except MalformedMessage as exc:
            return self._malformed(data, source, exc)
        if not msg.is_request:
            return [Log("sip.response.unexpected", (("status", msg.status),), "debug")]
        key = transaction_key(msg)
        cached = self.cache.get(key, now) if msg.method != "ACK" else None
        if cached is not None:
            return [self._send(msg, source, cached)]
        handler = self.handlers.get(msg.method)
        if handler is None:
            if msg.method in KNOWN_NOT_SERVED:
                return self._reply(msg, source, now, Reply(405, "Method Not Allowed", (("Allow", ALLOW),)))
            return self._reply(msg, source, now, Reply(501, "Not Implemented", (("Allow", ALLOW),)))
        return handler(msg, source, now)

    def tick(self, now: float) -> list[Command]:
        """Housekeeping the engine runs about once a second."""
        self.cache.expire(now)
        return list(self.registrar.expire(now))

    # --------------------------------------------------------------- handlers
    def _register(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        outcome: Outcome = self.registrar.register(msg, source, now)
        commands: list[Command] = self._reply(msg, source, now, outcome.reply)
        if outcome.save is not None:
            commands.append(outcome.save)
        commands.append(Log(outcome.event, (("call_id", msg.call_id), ("source", f"{source.host}:{source.port}"),
                                            ("status", outcome.reply.status), *outcome.fields),
                            outcome.level))
        return commands

    def _options(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        return self._reply(msg, source, now, Reply(200, "OK", (
            ("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", "path, outbound"))))

    def _not_yet(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        return self._reply(msg, source, now, Reply(480, "Temporarily Unavailable", (
            ("Warning", '399 - "call routing is not enabled on this router"'),)))

    def _no_transaction(self, msg: SipMessage, source: Source, now: float) -> list[Command]:
        return self._reply(msg, source, now, Reply(481, "Call/Transaction Does Not Exist"))

    # --------------------------------------------------------------- helpers
    def _send(self, msg: SipMessage, source: Source, data: bytes) -> Send:
        host, port = (response_destination(msg, source.host, source.port)
                      if source.transport == "udp" else (source.host, source.port))
        return Send(data, host, port, source.transport, source.conn)

    def _reply(self, msg: SipMessage, source: Source, now: float, reply: Reply) -> list[Command]:
        data = build_response(msg, reply.status, reply.reason, (source.host, source.port),
                              to_tag=secrets.token_hex(6), headers=reply.headers, server=SERVER)
        if reply.status >= 200 and reply.status not in (401, 407):
            self.cache.put(transaction_key(msg), data, now)
        return [self._send(msg, source, data)]

    def _malformed(self, data: bytes, source: Source, exc: MalformedMessage) -> list[Command]:
        log = Log("sip.malformed", (("source", f"{source.host}:{source.port}"), ("reason", str(exc))),
                  "warning")
        stub = _lenient(data)
        if stub is None or stub.method == "ACK":
            return [log]
        status, phrase = sip_status(exc)
        try:
            reply = build_response(stub, status, phrase, (source.host, source.port),
                                   to_tag=secrets.token_hex(6),
                                   headers=(("Warning", f'399 - "{_quote(str(exc))}"'),),
                                   server=SERVER)
            send = self._send(stub, source, reply)
        except (MalformedMessage, ValueError, IndexError):
            return [log]
        return [send, log]


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')[:200]


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
        stub.top_via
    except (ValueError, IndexError):
        return None
    return stub
