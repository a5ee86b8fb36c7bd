"""Who a request says it is, proved by HTTP Digest (RFC 3261 §22, RFC 8760); pure.

Theory of operation.  One ``Authenticator`` serves the registrar (REGISTER,
``Authorization``) and call admission (INVITE, ``Proxy-Authorization``), so a
password guessed wrong counts the same wherever it is tried.  ``check`` runs
the gates in order and names the first that decides (``Gate``):

1. the source address is not *throttled* (too many bad credentials from it in
   the last minute, whatever the method);
2. the request carries credentials for our realm (else *challenge*);
3. for REGISTER only, the username is not *locked* (``max_auth_failures``
   bad registrations in a row, for a minute).  Calls are not subject to the
   lock: anyone can send bad REGISTERs naming a device, and that must not
   stop the device's owner from calling;
4. the nonce is ours and fresh (*stale*: the client retries silently) and the
   response verifies (*bad*; *bad_final* when this failure reaches the limit).

Credentials name a device; its HA1 for each algorithm is computed once per
policy (from a password or taken from the stored HA1) and cached.  Nonces are
stateless HMAC tokens (``digest.NonceBook``); the failure counters and the
nonce-count table are pruned by ``housekeeping``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from router.policy.model import Device, Policy, User
from router.sip import digest
from router.sip.message import SipMessage, auth_params

THROTTLE_WINDOW = 60.0
LOCKOUT = 60.0


class Gate(enum.Enum):
    THROTTLED = "throttled"
    CHALLENGE = "challenge"
    LOCKED = "locked"
    STALE = "stale"
    BAD = "bad"
    BAD_FINAL = "bad_final"
    OK = "ok"


@dataclass(frozen=True)
class Check:
    gate: Gate
    owner: tuple[User, Device] | None
    detail: str


class Authenticator:
    def __init__(self, policy: Policy, secret: bytes | None = None) -> None:
        self.policy = policy
        self.nonces = digest.NonceBook(policy.registrar.nonce_ttl, secret)
        self.failures: dict[str, tuple[int, float]] = {}       # username -> (bad in a row, last at)
        self.source_failures: dict[str, deque[float]] = {}     # address -> times of bad credentials
        self._ha1: dict[tuple[str, str], str | None] = {}

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._ha1.clear()

    @property
    def realm(self) -> str:
        return self.policy.domain

    def challenge(self, now: float, algorithms: tuple[str, ...], stale: bool = False) -> tuple[str, ...]:
        """Header values for WWW-Authenticate or Proxy-Authenticate, one per algorithm."""
        return tuple(digest.challenge(self.realm, self.nonces.issue(now), algorithms, stale=stale))

    def ha1(self, username: str, algorithm: str) -> str | None:
        key = (username, algorithm)
        if key not in self._ha1:
            owner = self.policy.device_by_auth(username)
            self._ha1[key] = _ha1_of(owner[1], self.realm, algorithm) if owner else None
        return self._ha1[key]

    def check(self, msg: SipMessage, header: str, source_host: str, now: float,
              lockout: bool = True) -> Check:
        """Run the gates on ``msg``'s ``header`` (authorization or proxy-authorization);
        ``lockout``: count and enforce the per-username lock (REGISTER)."""
        settings = self.policy.registrar
        stamps = self.source_failures.get(source_host)
        if stamps is not None:
            _trim(stamps, now)
            if len(stamps) >= settings.source_failures_per_minute:
                return Check(Gate.THROTTLED, None, f"{source_host} sent too many bad credentials")
        creds = self._credentials(msg, header)
        if creds is None:
            return Check(Gate.CHALLENGE, None, "no credentials")
        owner = self.policy.device_by_auth(creds.username)
        count, last = self.failures.get(creds.username, (0, 0.0)) if lockout else (0, 0.0)
        if lockout and count >= settings.max_auth_failures and now - last <= LOCKOUT:
            return Check(Gate.LOCKED, owner, f"{creds.username} is locked after {count} bad attempts")
        ha1 = self.ha1(creds.username, creds.algorithm) if owner else None
        verdict = self.nonces.check(creds, msg.method, ha1, now)
        if verdict == digest.Verdict.BAD:
            self.source_failures.setdefault(source_host, deque()).append(now)
            if not lockout:
                return Check(Gate.BAD, owner, f"bad credentials for {creds.username!r} from {source_host}")
            self.failures[creds.username] = (count + 1, now)
            gate = Gate.BAD_FINAL if count + 1 >= settings.max_auth_failures else Gate.BAD
            return Check(gate, owner, f"bad credentials for {creds.username!r} from {source_host}")
        if verdict == digest.Verdict.STALE:
            return Check(Gate.STALE, owner, "stale nonce")
        if lockout:
            self.failures.pop(creds.username, None)
        return Check(Gate.OK, owner, creds.username)

    def _credentials(self, msg: SipMessage, header: str) -> digest.Credentials | None:
        for value in msg.all(header):
            scheme, params = auth_params(value)
            if scheme == "digest" and params.get("realm") == self.realm:
                return digest.Credentials.from_params(params)
        return None

    def housekeeping(self, now: float) -> None:
        """Forget old nonces and failure counters (periodic, never per message)."""
        self.nonces.prune(now)
        for host, stamps in list(self.source_failures.items()):
            _trim(stamps, now)
            if not stamps:
                del self.source_failures[host]
        for name, (_, last) in list(self.failures.items()):
            if now - last > LOCKOUT:
                del self.failures[name]


def _trim(stamps: deque[float], now: float) -> None:
    while stamps and now - stamps[0] > THROTTLE_WINDOW:
        stamps.popleft()


def _ha1_of(device: Device, realm: str, algorithm: str) -> str | None:
    if device.password is not None:
        return digest.ha1(algorithm, device.auth_username, realm, device.password)
    if algorithm == "MD5":
        return device.ha1_md5
    if algorithm == "SHA-256":
        return device.ha1_sha256
    return None
