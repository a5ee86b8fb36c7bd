"""The registrar (RFC 3261 §10.3); pure: messages and the clock in, replies out.

Theory of operation.  A REGISTER passes three gates, each a row of
``AUTH_OUTCOMES``: the source must not be throttled (too many bad
credentials from one address in a minute), the request must carry digest
credentials we issued (else 401 with a SHA-256 and an MD5 challenge), and
they must verify (bad -> 401 again, then 403 after ``max_auth_failures`` in a
row; stale nonce -> 401 stale=true).  The credentials name a *device*; the
device decides the binding's user and kind, and may only register its own
user's AOR.  Then §10.3 steps 6-8: Contact ``*`` removes the device's
bindings; each contact's expiry comes from its ``expires`` param, else the
Expires header, else the default, is refused below ``min_expires`` (423) and
clamped above ``max_expires``; Call-ID/CSeq order is enforced per binding; a
device keeps at most ``max_bindings_per_device`` (oldest dropped, as
Asterisk's remove_existing does) and a user at most ``max_bindings_per_aor``,
so the 200 OK listing every binding always fits in one 4,000-byte datagram.
Bindings remember where the REGISTER came from (host, port, transport), which
is where calls are sent.  Expiry is driven by ``next_timer``/``expire``.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace

from router.errors import MalformedMessage
from router.policy.model import Binding, Device, Policy, User
from router.sip import digest
from router.sip.commands import Reply, SaveBindings, Source
from router.sip.message import SipMessage, auth_params, parse_name_addr, parse_uri

MAX_CONTACT_URI = 256
THROTTLE_WINDOW = 60.0
LOCKOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    reply: Reply
    save: SaveBindings | None = None
    event: str = "register"
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


# Authentication gate outcomes -> (status, reason).  None: go on to bindings.
AUTH_OUTCOMES: dict[str, tuple[int, str] | None] = {
    "throttled": (403, "Too Many Failed Attempts"),
    "locked": (403, "Forbidden"),
    "challenge": (401, "Unauthorized"),
    digest.Verdict.STALE: (401, "Unauthorized"),
    digest.Verdict.BAD: (401, "Unauthorized"),
    "bad_final": (403, "Forbidden"),
    digest.Verdict.OK: None,
}


class Registrar:
    def __init__(self, policy: Policy, bindings: Iterable[Binding], now: float,
                 secret: bytes | None = None) -> None:
        self.policy = policy
        self.realm = policy.domain
        self.nonces = digest.NonceBook(policy.registrar.nonce_ttl, secret)
        self.by_device: dict[str, list[Binding]] = {}
        self.devices_of: dict[str, set[str]] = {}              # user -> devices with bindings
        self.expiries: list[tuple[float, str]] = []             # heap of (expires_at, device)
        self.failures: dict[str, tuple[int, float]] = {}       # device -> (count, last at)
        self.source_failures: dict[str, deque[float]] = {}
        self._ha1: dict[tuple[str, str], str | None] = {}
        loaded: dict[str, list[Binding]] = {}
        for b in bindings:
            if b.expires_at > now:
                loaded.setdefault(b.device_id, []).append(b)
        for device_id, bs in loaded.items():
            self._set(bs[0].user_id, device_id, bs)
        self.set_policy(policy)

    def _set(self, user_id: str, device_id: str, bindings: list[Binding]) -> None:
        """The one place the binding indexes change."""
        old = self.by_device.get(device_id)
        if old:
            devices = self.devices_of.get(old[0].user_id)
            if devices is not None:
                devices.discard(device_id)
                if not devices:
                    del self.devices_of[old[0].user_id]
        if bindings:
            self.by_device[device_id] = bindings
            self.devices_of.setdefault(user_id, set()).add(device_id)
            heapq.heappush(self.expiries, (min(b.expires_at for b in bindings), device_id))
            if len(self.expiries) > 4 * len(self.by_device) + 64:   # drop stale entries
                self.expiries = [(min(b.expires_at for b in bs), d) for d, bs in self.by_device.items()]
                heapq.heapify(self.expiries)
        else:
            self.by_device.pop(device_id, None)

    # ------------------------------------------------------------------ policy
    def set_policy(self, policy: Policy) -> list[SaveBindings]:
        """Adopt a reloaded policy.  Bindings of devices that are gone are
        dropped (their credentials were revoked); the others follow their
        device's current user and kind."""
        self.policy = policy
        self.realm = policy.domain
        self._ha1.clear()
        changed: list[SaveBindings] = []
        owners = {d.id: (u, d) for u in policy.users for d in u.devices}   # one pass, not one per device
        for device_id in list(self.by_device):
            owner = owners.get(device_id)
            old = self.by_device[device_id]
            if owner is None:
                self._set(old[0].user_id, device_id, [])
                changed.append(SaveBindings(old[0].user_id, device_id, ()))
                continue
            user, device = owner
            if all(b.user_id == user.id and b.kind is device.kind for b in old):
                continue
            new = [replace(b, user_id=user.id, kind=device.kind) for b in old]
            if new != old:
                self._set(user.id, device_id, new)
                changed.append(SaveBindings(user.id, device_id, tuple(new)))
        return changed

    def ha1_for(self, device: Device, algorithm: str) -> str | None:
        key = (device.auth_username, algorithm)
        if key not in self._ha1:
            value: str | None = None
            if device.password is not None:
                value = digest.ha1(algorithm, device.auth_username, self.realm, device.password)
            elif algorithm == "MD5":
                value = device.ha1_md5
            elif algorithm == "SHA-256":
                value = device.ha1_sha256
            self._ha1[key] = value
        return self._ha1[key]

    # ------------------------------------------------------------------ queries
    def bindings(self, now: float, user_id: str | None = None) -> list[Binding]:
        if user_id is None:
            return [b for bs in self.by_device.values() for b in bs if b.expires_at > now]
        return [b for d in sorted(self.devices_of.get(user_id, ()))
                for b in self.by_device[d] if b.expires_at > now]

    def next_timer(self) -> float | None:
        return self.expiries[0][0] if self.expiries else None

    def expire(self, now: float) -> list[SaveBindings]:
        """Drop expired bindings."""
        out: list[SaveBindings] = []
        while self.expiries and self.expiries[0][0] <= now:
            _, device_id = heapq.heappop(self.expiries)
            bs = self.by_device.get(device_id)
            if not bs:
                continue          # a stale heap entry: the device was updated since
            live = [b for b in bs if b.expires_at > now]
            if len(live) != len(bs):
                out.append(SaveBindings(bs[0].user_id, device_id, tuple(live)))
                self._set(bs[0].user_id, device_id, live)
        return out

    def housekeeping(self, now: float) -> None:
        """Forget old nonces and failure counters (periodic, not per message)."""
        self.nonces.prune(now)
        for host, stamps in list(self.source_failures.items()):
            while stamps and now - stamps[0] > THROTTLE_WINDOW:
                stamps.popleft()
            if not stamps:
                del self.source_failures[host]
        for name, (_, last) in list(self.failures.items()):
            if now - last > LOCKOUT:
                del self.failures[name]

    # ------------------------------------------------------------------ REGISTER
    def register(self, msg: SipMessage, source: Source, now: float) -> Outcome:
        gate, owner, detail = self._authenticate(msg, source, now)
        row = AUTH_OUTCOMES[gate]
        if row is not None:
            headers: tuple[tuple[str, str], ...] = ()
            if row[0] == 401:
                stale = gate == digest.Verdict.STALE
                headers = tuple(("WWW-Authenticate", c) for c in
                                digest.challenge(self.realm, self.nonces.issue(now),
                                                 self._algorithms_for(msg), stale=stale))
            quiet = gate in ("challenge", digest.Verdict.STALE)     # the normal first leg
            return Outcome(Reply(row[0], row[1], headers), None, "register.auth",
                           (("result", gate), ("detail", detail)), "debug" if quiet else "warning")
        assert owner is not None
        user, device = owner
        try:
            return self._update(msg, source, user, device, now)
        except MalformedMessage as exc:
            return Outcome(Reply(400, "Bad Request", (("Warning", f'399 - "{exc}"'),)),
                           None, "register.refused", (("detail", str(exc)),), "warning")

    def _algorithms_for(self, msg: SipMessage) -> tuple[str, ...]:
        settings = self.policy.registrar
        agent = msg.header("user-agent") or ""
        if agent and any(agent.startswith(prefix) for prefix in settings.md5_only_agents if prefix):
            return ("MD5",) if "MD5" in settings.algorithms else settings.algorithms
        return settings.algorithms

    def _authenticate(self, msg: SipMessage, source: Source,
                      now: float) -> tuple[str, tuple[User, Device] | None, str]:
        settings = self.policy.registrar
        stamps = self.source_failures.get(source.host)
        if stamps is not None:
            while stamps and now - stamps[0] > THROTTLE_WINDOW:
                stamps.popleft()
            if len(stamps) >= settings.source_failures_per_minute:
                return "throttled", None, f"{source.host} sent too many bad credentials"
        creds = self._credentials(msg)
        if creds is None:
            return "challenge", None, "no credentials"
        owner = self.policy.device_by_auth(creds.username)
        count, last = self.failures.get(creds.username, (0, 0.0))
        if count >= settings.max_auth_failures and now - last <= LOCKOUT:
            return "locked", owner, f"{creds.username} is locked after {count} bad attempts"
        ha1 = self.ha1_for(owner[1], creds.algorithm) if owner else None
        verdict = self.nonces.check(creds, msg.method, ha1, now)
        if verdict == digest.Verdict.BAD:
            self.failures[creds.username] = (count + 1, now)
            self.source_failures.setdefault(source.host, deque()).append(now)
            if count + 1 >= settings.max_auth_failures:
                return "bad_final", owner, f"bad credentials for {creds.username}"
            return verdict, owner, f"bad credentials for {creds.username}"
        if verdict == digest.Verdict.OK:
            self.failures.pop(creds.username, None)
        return verdict, owner, creds.username

    def _credentials(self, msg: SipMessage) -> digest.Credentials | None:
        for value in msg.all("authorization"):
            scheme, params = auth_params(value)
            if scheme == "digest" and params.get("realm") == self.realm:
                return digest.Credentials.from_params(params)
        return None

    def _update(self, msg: SipMessage, source: Source, user: User, device: Device,
                now: float) -> Outcome:
        settings = self.policy.registrar
        to_uri = parse_uri(parse_name_addr(msg.header("to") or "").uri)
        if to_uri.user not in (user.id, user.extension):
            return Outcome(Reply(403, "Forbidden", (("Warning",
                f'399 - "device {device.id} belongs to {user.id} and may register only that user"'),)),
                None, "register.refused", (("device", device.id), ("aor", to_uri.user)), "warning")
        contacts = msg.all("contact")
        header_expires = _int_or_none(msg.header("expires"))
        existing = {b.contact: b for b in self.by_device.get(device.id, [])}
        call_id, (cseq, _) = msg.call_id, msg.cseq
        if any(c.strip() == "*" for c in contacts):
            if len(contacts) != 1 or header_expires != 0:
                raise MalformedMessage("Contact: * needs Expires: 0 and no other contact")
            for b in existing.values():
                if b.call_id == call_id and cseq <= b.cseq:
                    raise MalformedMessage("CSeq out of order for this Call-ID")
            self._set(user.id, device.id, [])
            return self._ok(msg, user, device, now, SaveBindings(user.id, device.id, ()), "unregister_all")
        updated = dict(existing)
        for value in contacts:
            addr = parse_name_addr(value)
            if len(addr.uri) > MAX_CONTACT_URI:
                raise MalformedMessage(f"Contact URI longer than {MAX_CONTACT_URI} characters")
            parse_uri(addr.uri)
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
            updated[addr.uri] = Binding(
                user_id=user.id, device_id=device.id, kind=device.kind, contact=addr.uri,
                expires_at=now + expires, q=q, call_id=call_id, cseq=cseq,
                source_host=source.host, source_port=source.port, transport=source.transport,
                user_agent=(msg.header("user-agent") or "")[:120],
                registered_at=old.registered_at if old else now, instance=instance,
                conn=source.conn if source.transport == "tcp" else 0)
        kept = sorted(updated.values(), key=lambda b: b.registered_at)[-settings.max_bindings_per_device:]
        others = [b for b in self.bindings(now, user.id) if b.device_id != device.id]
        if len(others) + len(kept) > settings.max_bindings_per_aor:
            return Outcome(Reply(403, "Too Many Registered Contacts", (("Warning",
                f'399 - "{user.id} already has {len(others)} bindings; the limit is '
                f'{settings.max_bindings_per_aor}"'),)), None, "register.refused", (), "warning")
        if kept == list(existing.values()) and not contacts:
            return self._ok(msg, user, device, now, None, "query")
        self._set(user.id, device.id, kept)
        return self._ok(msg, user, device, now, SaveBindings(user.id, device.id, tuple(kept)),
                        "update" if kept else "unregister")

    def _ok(self, msg: SipMessage, user: User, device: Device, now: float,
            save: SaveBindings | None, action: str) -> Outcome:
        headers = [("Contact", f"<{b.contact}>;expires={max(int(b.expires_at - now), 0)}"
                    + (f";q={b.q:g}" if b.q != 1.0 else ""))
                   for b in self.bindings(now, user.id)]
        headers.append(("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))))
        return Outcome(Reply(200, "OK", tuple(headers)), save, "register.ok",
                       (("user", user.id), ("device", device.id), ("kind", device.kind.value),
                        ("action", action), ("bindings", len(headers) - 1)),
                       "info" if save is not None else "debug")


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
