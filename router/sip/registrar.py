"""The registrar (RFC 3261 §10.3); pure: messages and the clock in, replies out.

Theory of operation.  A REGISTER first passes the authentication gates of
``auth.Authenticator``; ``AUTH_OUTCOMES`` maps each gate to the answer (a
missing, bad or stale credential -> 401 with a SHA-256 and an MD5 challenge;
throttled, locked or the last bad attempt -> 403).  The credentials name a
*device*; the device decides the binding's user and kind, and may only
register its own user's AOR.  Then §10.3 steps 6-8: Contact ``*`` removes the
device's bindings; each contact's expiry comes from its ``expires`` param,
else the Expires header, else the default, is refused below ``min_expires``
(423) and clamped above ``max_expires``; Call-ID/CSeq order is enforced per
binding; a device keeps at most ``max_bindings_per_device`` (oldest dropped,
as Asterisk's remove_existing does) and a user at most
``max_bindings_per_aor``, so the 200 OK listing every binding always fits in
one 4,000-byte datagram.  Bindings remember where the REGISTER came from
(host, port, transport), the edge's Path and client when it came through the edge, and
whether a NAT was seen; ``reach`` turns that into where calls are sent.  The bindings
themselves live in the location service (``location.Location``).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from router.errors import MalformedMessage
from router.policy.model import Binding, Device, DeviceKind, Policy, User
from router.sip import digest, reach
from router.sip.auth import Authenticator, Gate
from router.sip.commands import Reply, SaveBindings, Source, phrase
from router.sip.location import Location
from router.sip.message import SipMessage, parse_name_addr, parse_uri

MAX_CONTACT_URI = 256


@dataclass(frozen=True)
class Outcome:
    reply: Reply
    save: SaveBindings | None = None
    event: str = "register"
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


# Authentication gate -> status; None: go on to the bindings.
AUTH_OUTCOMES: dict[Gate, int | None] = {
    Gate.THROTTLED: 403, Gate.LOCKED: 403, Gate.CHALLENGE: 401, Gate.STALE: 401,
    Gate.BAD: 401, Gate.BAD_FINAL: 403, Gate.OK: None,
}
# Where a 403 says more than "Forbidden", so a phone's display tells the user why.
THROTTLED_PHRASE = "Too Many Failed Attempts"
TOO_MANY_CONTACTS_PHRASE = "Too Many Registered Contacts"


class Registrar:
    def __init__(self, policy: Policy, bindings: Iterable[Binding], now: float,
                 secret: bytes | None = None, auth: Authenticator | None = None,
                 location: Location | None = None) -> None:
        self.policy = policy
        self.auth = auth or Authenticator(policy, secret)
        self.location = location or Location(bindings, now)
        self.set_policy(policy)

    @property
    def nonces(self) -> digest.NonceBook:
        return self.auth.nonces

    def set_policy(self, policy: Policy,
                   moves: Mapping[str, tuple[str, DeviceKind] | None] | None = None) -> list[SaveBindings]:
        """Adopt a reloaded policy (credentials, and the bindings' users and kinds);
        with ``moves`` (see ``location.ownership_moves``) only those devices are looked at."""
        self.policy = policy
        self.auth.set_policy(policy)
        return self.location.follow(policy) if moves is None else self.location.follow_moves(moves)

    def bindings(self, now: float, user_id: str | None = None) -> list[Binding]:
        return self.location.bindings(now, user_id)

    def next_timer(self) -> float | None:
        return self.location.next_timer()

    def expire(self, now: float) -> list[SaveBindings]:
        return self.location.expire(now)

    # ------------------------------------------------------------------ REGISTER
    def register(self, msg: SipMessage, source: Source, now: float) -> Outcome:
        check = self.auth.check(msg, "authorization", source.origin_host, now)
        status = AUTH_OUTCOMES[check.gate]
        if status is not None:
            headers: tuple[tuple[str, str], ...] = ()
            if status == 401:
                headers = tuple(("WWW-Authenticate", c) for c in
                                self.auth.challenge(now, self.algorithms_for(msg), check.gate is Gate.STALE))
            quiet = check.gate in (Gate.CHALLENGE, Gate.STALE)     # the normal first leg
            reason = THROTTLED_PHRASE if check.gate is Gate.THROTTLED else phrase(status)
            return Outcome(Reply(status, reason, headers), None, "register.auth",
                           (("result", check.gate.value), ("detail", check.detail)),
                           "debug" if quiet else "warning")
        assert check.owner is not None
        user, device = check.owner
        try:
            return self._update(msg, source, user, device, now)
        except MalformedMessage as exc:
            return Outcome(Reply(400, "Bad Request", (("Warning", f'399 - "{exc}"'),)),
                           None, "register.refused", (("detail", str(exc)),), "warning")

    def algorithms_for(self, msg: SipMessage) -> tuple[str, ...]:
        """The digest algorithms to challenge this UA with (REGISTER's 401 and INVITE's 407)."""
        settings = self.policy.registrar
        agent = msg.header("user-agent") or ""
        if agent and any(agent.startswith(prefix) for prefix in settings.md5_only_agents if prefix):
            return ("MD5",) if "MD5" in settings.algorithms else settings.algorithms
        return settings.algorithms

    def _update(self, msg: SipMessage, source: Source, user: User, device: Device,
                now: float) -> Outcome:
        settings = self.policy.registrar
        to_uri = parse_uri((msg.from_to[1] if msg.from_to else parse_name_addr(msg.header("to") or "")).uri)
        if to_uri.user not in (user.id, user.extension):
            return Outcome(Reply(403, phrase(403), (("Warning",
                f'399 - "device {device.id} belongs to {user.id} and may register only that user"'),)),
                None, "register.refused", (("device", device.id), ("aor", to_uri.user)), "warning")
        contacts = msg.all("contact")
        path = _path(msg) if source.via_edge else ()     # only the edge may route us through itself
        nat = "" if path else None
        header_expires = _int_or_none(msg.header("expires"))
        existing = {b.contact: b for b in self.location.of_device(device.id)}
        call_id, (cseq, _) = msg.call_id, msg.cseq
        if any(c.strip() == "*" for c in contacts):
            if len(contacts) != 1 or header_expires != 0:
                raise MalformedMessage("Contact: * needs Expires: 0 and no other contact")
            for b in existing.values():
                if b.call_id == call_id and cseq <= b.cseq:
                    raise MalformedMessage("CSeq out of order for this Call-ID")
            self.location.put(user.id, device.id, [])
            return self._ok(msg, user, device, now, SaveBindings(user.id, device.id, ()), "unregister_all")
        updated = dict(existing)
        for value in contacts:
            addr = parse_name_addr(value)
            if len(addr.uri) > MAX_CONTACT_URI:
                raise MalformedMessage(f"Contact URI longer than {MAX_CONTACT_URI} characters")
            contact_uri = parse_uri(addr.uri)
            expires = _int_or_none(addr.params.get("expires"))
            if expires is None:
                expires = header_expires if header_expires is not None else settings.default_expires
            if 0 < expires < settings.min_expires:
                return Outcome(Reply(423, "Interval Too Brief",
                                     (("Min-Expires", str(settings.min_expires)),)),
                               None, "register.refused", (("expires", expires),), "warning")
            expires = min(expires, settings.max_expires)
            q = _q(addr.params.get("q"))
            old = existing.get(addr.uri)
            if old is not None and old.call_id == call_id and cseq <= old.cseq:
                raise MalformedMessage("CSeq out of order for this Call-ID")
            instance = (addr.params.get("+sip.instance") or "").strip('"')
            if instance:        # RFC 5626: the same instance from a new address replaces the old
                for key, b in list(updated.items()):
                    if b.instance == instance and key != addr.uri:
                        del updated[key]
            if expires == 0:
                updated.pop(addr.uri, None)
                continue
            reason = None if path else reach.nat_reason(contact_uri, msg.top_via, source)
            if reason is not None:
                nat = reason
            updated[addr.uri] = Binding(
                user_id=user.id, device_id=device.id, kind=device.kind, contact=addr.uri,
                expires_at=now + expires, q=q, call_id=call_id, cseq=cseq,
                source_host=sys.intern(source.host), source_port=source.port, transport=source.transport,
                user_agent=sys.intern((msg.header("user-agent") or "")[:120]),    # shared by thousands
                registered_at=old.registered_at if old else now, instance=instance,
                conn=source.conn if source.transport == "tcp" else 0,
                path=path, flow=source.client_transport,
                client=_hostport(source.client_host, source.client_port) if source.via_edge else "",
                at_contact=not path and reason is None)
        kept = sorted(updated.values(), key=lambda b: b.registered_at)[-settings.max_bindings_per_device:]
        others = [b for b in self.location.bindings(now, user.id) if b.device_id != device.id]
        if len(others) + len(kept) > settings.max_bindings_per_aor:
            return Outcome(Reply(403, TOO_MANY_CONTACTS_PHRASE, (("Warning",
                f'399 - "{user.id} already has {len(others)} bindings; the limit is '
                f'{settings.max_bindings_per_aor}"'),)), None, "register.refused", (), "warning")
        if kept == list(existing.values()) and not contacts:
            return self._ok(msg, user, device, now, None, "query")
        self.location.put(user.id, device.id, kept)
        extra: tuple[tuple[str, object], ...] = ()
        if path:
            extra = (("via_edge", True), ("transport", source.client_transport or source.transport),
                     ("client", _hostport(source.origin_host, source.origin_port)))
        elif nat:
            extra = (("nat", nat),)
        return self._ok(msg, user, device, now, SaveBindings(user.id, device.id, tuple(kept)),
                        "update" if kept else "unregister", extra)

    def _ok(self, msg: SipMessage, user: User, device: Device, now: float,
            save: SaveBindings | None, action: str, extra: tuple[tuple[str, object], ...] = ()) -> Outcome:
        headers = [("Contact", f"<{b.contact}>;expires={max(int(b.expires_at - now), 0)}"
                    + (f";q={b.q:g}" if b.q != 1.0 else ""))
                   for b in self.location.bindings(now, user.id)]
        count = len(headers)
        # RFC 3327 §5.3: the Path is returned only to a UA that said it supports path.
        if "path" in _tokens(msg.header("supported")) and any(b.path for b in self.location.of_device(device.id)):
            headers.extend(("Path", p) for p in msg.all("path"))
        headers.append(("Supported", "path"))
        headers.append(("Date", _http_date(int(now))))
        return Outcome(Reply(200, "OK", tuple(headers)), save, "register.ok",
                       (("user", user.id), ("device", device.id), ("kind", device.kind.value),
                        ("action", action), ("bindings", count), *extra),
                       "info" if save is not None else "debug")


MAX_PATH = 4                  # Path entries: the edge adds one
MAX_PATH_LENGTH = 512         # characters in all: the 200 echoes it and every INVITE carries it


def _path(msg: SipMessage) -> tuple[str, ...]:
    """The REGISTER's Path (RFC 3327), each entry a sip: or sips: URI; else MalformedMessage."""
    entries = tuple(e.strip() for e in msg.all("path") if e.strip())
    if len(entries) > MAX_PATH or sum(len(e) for e in entries) > MAX_PATH_LENGTH:
        raise MalformedMessage(f"Path longer than {MAX_PATH} entries or {MAX_PATH_LENGTH} characters")
    for entry in entries:
        try:
            uri = parse_uri(parse_name_addr(entry, "Path").uri)
        except ValueError:
            uri = None
        if uri is None or uri.scheme not in ("sip", "sips") or not uri.host:
            raise MalformedMessage(f"Path entry {entry[:60]!r} is not a sip: URI")
    return entries


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """The Date header of a 200 (RFC 3261 §20.17): made once per second, not per REGISTER."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise MalformedMessage(f"expires value {value!r} is not a whole number")
    return min(int(value), 2**31 - 1)


def _q(value: str | None) -> float:
    if value is None:
        return 1.0
    try:
        q = float(value)
    except ValueError:
        raise MalformedMessage(f"q={value} is not a number from 0 to 1") from None
    if not 0.0 <= q <= 1.0:
        raise MalformedMessage(f"q={value} is not a number from 0 to 1")
    return q
