"""Rewriting requests and responses as a proxy forwards them (RFC 3261 §16.6, §16.7); pure.

A forwarded request keeps everything the endpoints put in it and gains what a
record-routing proxy adds: our Via on top (with a branch that carries the
loop-detection hash of §16.6 step 8), a decremented Max-Forwards, our
Record-Route, and a new Request-URI.  Route entries naming us are consumed
(loose routing, RFC 3261 §16.4).  A response travelling back loses our Via.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass

from router.policy.model import EDGE_CLIENT_HEADER
from router.sip import ids
from router.sip.message import (
    PRETTY_SEEN,
    SipMessage,
    is_number,
    parse_name_addr,
    parse_uri,
    parse_via,
    pretty_name,
    stamp_received,
)
from router.sip.steer import WORKER_MARK

BRANCH_PREFIX = "z9hG4bKsr"
EDGE_CLIENT = EDGE_CLIENT_HEADER.lower()


@dataclass(frozen=True)
class Local:
    """Where this router listens, as it names itself in Via and Record-Route."""

    host: str
    port: int
    worker: int = 0                     # marks our Via branches (``router.sip.steer``)
    shared_ports: tuple[int, ...] = ()  # with several workers: the ports they share

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def is_me(self, uri: str) -> bool:
        return _names(self, uri)

    @property
    def mark(self) -> str:
        """What ends each Via branch this worker makes: responses find their way back to it."""
        return f"{WORKER_MARK}{self.worker}"


@functools.lru_cache(maxsize=1024)
def _names(local: Local, uri: str) -> bool:
    """Does ``uri`` name ``local``?  Remembered: every in-dialog request asks it of the same
    few Route entries, our own."""
    try:
        parsed = parse_uri(uri)
    except ValueError:
        return False
    port = parsed.port or 5060
    return parsed.host.strip("[]") == local.host and (port == local.port or port in local.shared_ports)


def loop_hash(msg: SipMessage) -> str:
    """§16.6 step 8: a hash of the fields a looping request keeps unchanged."""
    to_tag, from_tag = msg.tag("to"), msg.tag("from")
    seed = "|".join((msg.uri, to_tag, from_tag, msg.call_id, str(msg.cseq[0]),
                     ",".join(msg.all("route")), msg.header("proxy-require") or ""))
    return hashlib.blake2b(seed.encode(), digest_size=5).hexdigest()


def new_branch(msg: SipMessage, local: Local, hashed: str | None = None) -> str:
    return f"{BRANCH_PREFIX}{hashed or loop_hash(msg)}.{ids.token_hex(5)}{local.mark}"


def dialog_branch(local: Local) -> str:
    """The branch of an in-dialog request we forward: unique, without the loop hash.  Loops
    are looked for in new calls only (``is_loop``); a dialog's requests follow its route set.
    Sixteen hex digits, no dot after the tenth: never taken for a hashed branch."""
    return f"{BRANCH_PREFIX}{ids.token_hex(8)}{local.mark}"


def our_via(local: Local, branch: str, transport: str) -> str:
    return f"SIP/2.0/{transport.upper()} {local.hostport};branch={branch};rport"


def is_loop(msg: SipMessage, local: Local, hashed: str | None = None) -> bool:
    """A Via we added, whose branch carries this very request's loop hash."""
    if len(msg.all("via")) < 2:
        return False          # a request straight from its UA cannot have passed us
    mine = f"{BRANCH_PREFIX}{hashed or loop_hash(msg)}."
    for value in msg.all("via"):
        try:
            via = parse_via(value)
        except ValueError:
            continue
        if via.host.strip("[]") == local.host and (via.port or 5060) == local.port \
                and via.branch.startswith(mine):
            return True
    return False


def render(start: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [start]
    known = PRETTY_SEEN.get        # the names seen before, without a call each
    lines.extend(f"{known(n) or pretty_name(n)}: {v}" for n, v in headers if n != "content-length")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def forward_request(msg: SipMessage, uri: str, local: Local, branch: str, transport: str,
                    source: tuple[str, int], *, record_route: bool = True,
                    drop: frozenset[str] = frozenset(),
                    add: tuple[tuple[str, str], ...] = (),
                    replace: dict[str, str] | None = None,
                    routes: tuple[str, ...] | None = None) -> bytes:
    """The bytes of ``msg`` forwarded to ``uri`` through this proxy.  ``routes``: the
    Route set to send (a binding's Path first); None: the received one, less our entries.
    The edge's ``X-Edge-Client`` stamp is for this router only and never travels on."""
    replace = replace or {}
    headers: list[tuple[str, str]] = [("via", our_via(local, branch, transport))]
    if record_route:
        headers.append(("record-route", f"<sip:{local.hostport};lr>"))
    route_set = list(routes) if routes is not None else None
    if route_set is not None and not msg.all("route"):
        headers.extend(("route", r) for r in route_set)
    first_via = True
    route_seen = False
    max_forwards_done = False
    for name, value in msg.headers:
        if name in drop or name in replace or name == EDGE_CLIENT:
            continue
        if name == "via":
            if first_via:
                vias = msg.all("via")
                headers.append(("via", stamp_received(vias[0], *source, msg.via0)))
                headers.extend(("via", v) for v in vias[1:])
                first_via = False
            continue
        if name == "route":
            if not route_seen:
                headers.extend(("route", r) for r in
                               (route_set if route_set is not None else routes_after_me(msg, local)))
                route_seen = True
            continue
        if name == "max-forwards":
            if not max_forwards_done:            # one Max-Forwards goes on, one less (§16.6 step 3)
                headers.append((name, str(max(int(value) - 1, 0) if is_number(value, 3) else 70)))
                max_forwards_done = True
            continue
        headers.append((name, value))
    if not max_forwards_done:
        headers.append(("max-forwards", "70"))
    headers.extend((n.lower(), v) for n, v in replace.items())
    headers.extend((n.lower(), v) for n, v in add)
    return render(f"{msg.method} {uri} SIP/2.0", headers, msg.body)


def routes_after_me(msg: SipMessage, local: Local) -> list[str]:
    """The Route set without the entries naming us at its top (an entry that does
    not parse names nobody we know, so it and the rest go on untouched)."""
    routes = msg.all("route")
    while routes:
        try:
            uri = parse_name_addr(routes[0]).uri
        except ValueError:
            break
        if not local.is_me(uri):
            break
        routes.pop(0)
    return routes


def strip_top_via(response: SipMessage, replace: dict[str, str] | None = None) -> bytes:
    """A response with our Via removed, ready to travel back (§16.7 step 9)."""
    replace = replace or {}
    headers: list[tuple[str, str]] = []
    vias = response.all("via")[1:]
    via_done = False
    for name, value in response.headers:
        if name == "via":
            if not via_done:
                headers.extend(("via", v) for v in vias)
                via_done = True
            continue
        headers.append((name, replace.get(name, value)))
    return render(f"SIP/2.0 {response.status} {response.reason}", headers, response.body)


@functools.lru_cache(maxsize=4096)
def _address_text(text: str) -> str | None:
    """``text`` as an IP address in its usual form, or None if it is not one.  Remembered:
    every response is checked this way, and the senders' addresses repeat."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def via_destination(via_value: str) -> tuple[str, int]:
    """Where a response goes back to, read from a (stamped) Via: ``received`` if it
    is an address, else the sent-by host; ``rport`` if it is a port, else the sent-by
    port.  Raises ``ValueError`` when the Via itself does not parse."""
    via = parse_via(via_value)
    received = via.params.get("received")
    host = (_address_text(received.strip("[]")) or via.host) if received else via.host
    rport = via.params.get("rport") or ""
    port = int(rport) if is_number(rport, 5) and 0 < int(rport) < 65536 else (via.port or 5060)
    return host.strip("[]"), port
