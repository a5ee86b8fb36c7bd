"""HTTP Digest for SIP (RFC 3261 §22, RFC 7616 computations, RFC 8760 SHA-256); pure.

Theory of operation.  Nonces are stateless to issue: a timestamp and random
bytes, sealed with a keyed BLAKE2s MAC under a per-process secret, so a forged or altered
nonce is rejected without a table lookup and an old one is recognised as
*stale* (the phone retries with the fresh nonce we send, no password prompt).
Replay protection needs a little state: for each nonce that has been used we
remember the highest nonce-count seen, and a request must go higher.  That
table is pruned as nonces age out (``prune``).  The clock is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections import deque
from dataclasses import dataclass

from router.sip import ids

ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
PREFERENCE = ("MD5", "SHA-256")   # see RegistrarSettings.algorithms for why MD5 leads


def hash_hex(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode()).hexdigest()


def ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    return hash_hex(algorithm, f"{username}:{realm}:{password}")


def response(algorithm: str, ha1_hex: str, nonce: str, method: str, uri: str,
             qop: str | None = None, nc: str = "", cnonce: str = "") -> str:
    """The request-digest a client computes (RFC 7616 §3.4.1; qop=auth or none)."""
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    if qop:
        return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{ha2}")


@dataclass(frozen=True)
class Credentials:
    """What an Authorization header says, parsed."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str = ""
    cnonce: str = ""

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Credentials | None:
        """The credentials, or None when a parameter is missing or they use an
        algorithm we never offer (SHA-512-256, MD5-sess ...): such a client did not
        answer our challenge, so it is challenged again, and no HA1 is computed for
        an algorithm ``ALGORITHMS`` does not have (``ha1`` would raise KeyError)."""
        try:
            algorithm = params.get("algorithm", "MD5").upper()
            if algorithm not in ALGORITHMS:
                return None
            return cls(params["username"], params["realm"], params["nonce"], params["uri"],
                       params["response"].lower(), algorithm, params.get("qop"),
                       params.get("nc", ""), params.get("cnonce", ""))
        except KeyError:
            return None


class Verdict:
    OK = "ok"
    STALE = "stale"          # well-formed and correct once, but the nonce is too old
    BAD = "bad"              # wrong password, forged nonce, replay, unknown algorithm


class NonceBook:
    """Issues and checks nonces; remembers nonce-counts for replay protection."""

    def __init__(self, ttl: float, secret: bytes | None = None) -> None:
        self.ttl = ttl
        self.secret = secret or os.urandom(32)
        self._key = self.secret if len(self.secret) <= 32 else hashlib.blake2s(self.secret).digest()
        self.counts: dict[str, tuple[float, int]] = {}   # nonce -> (issued at, highest nc)
        # Nonces in the order first used, for ``prune`` to drop from the front: a tick costs
        # what expired, never a scan of every count (hundreds of thousands at a busy site).
        self._order: deque[tuple[float, str]] = deque()

    def _mac(self, body: bytes) -> bytes:
        # BLAKE2s in its keyed mode is a MAC of its own: a third of HMAC-SHA256's time on a
        # 17-byte body, twice per registration (the nonce issued, then checked).
        return hashlib.blake2s(body, key=self._key, digest_size=12).digest()

    def issue(self, now: float) -> str:
        body = struct.pack(">d", now) + ids.token_bytes(9)
        mac = self._mac(body)
        return base64.urlsafe_b64encode(body + mac).decode()

    def issued_at(self, nonce: str) -> float | None:
        """When we issued ``nonce``, or None if we did not."""
        try:
            raw = base64.urlsafe_b64decode(nonce.encode())
        except (ValueError, TypeError):
            return None
        if len(raw) != 29:
            return None
        body, mac = raw[:17], raw[17:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        return float(struct.unpack(">d", body[:8])[0])

    def check(self, creds: Credentials, method: str, ha1_hex: str | None, now: float) -> str:
        """Verify ``creds`` for a request with ``method``; record the nonce-count."""
        issued = self.issued_at(creds.nonce)
        if issued is None or ha1_hex is None or creds.algorithm not in ALGORITHMS:
            return Verdict.BAD
        if creds.qop not in (None, "auth"):
            return Verdict.BAD
        if creds.qop and not (len(creds.nc) == 8 and creds.cnonce):
            return Verdict.BAD
        expected = response(creds.algorithm, ha1_hex, creds.nonce, method, creds.uri,
                            creds.qop, creds.nc, creds.cnonce)
        # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError)
        if not hmac.compare_digest(expected.encode(), creds.response.encode()):
            return Verdict.BAD
        if now - issued > self.ttl:
            return Verdict.STALE
        try:
            count = int(creds.nc, 16) if creds.qop else 1
        except ValueError:
            return Verdict.BAD
        known = self.counts.get(creds.nonce)
        if known is not None and count <= known[1]:
            return Verdict.BAD           # a replayed request
        if known is None:
            self._order.append((issued, creds.nonce))
        self.counts[creds.nonce] = (issued, count)
        return Verdict.OK

    def prune(self, now: float) -> None:
        """Forget counts of nonces that can no longer be accepted.  First use roughly follows
        issue time; an old nonce first used late waits behind younger ones, which is harmless:
        ``check`` answers an expired nonce STALE before it looks at the counts."""
        while self._order and now - self._order[0][0] > self.ttl:
            _, nonce = self._order.popleft()
            self.counts.pop(nonce, None)


def challenge(realm: str, nonce: str, algorithms: tuple[str, ...] = PREFERENCE,
              stale: bool = False) -> list[str]:
    """One WWW-Authenticate value per algorithm, preferred first (RFC 8760)."""
    extra = ", stale=true" if stale else ""
    return [f'Digest realm="{realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{extra}'
            for alg in algorithms]
