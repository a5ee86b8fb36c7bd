"""Who may send the router a call (RFC 3261 §22.3 proxy authentication); pure.

Theory of operation.  An INVITE is admitted from a trusted peer, matched by
source address against the configured networks (the upstream PBX/ACD and the
trunk), or from a device that proves itself with digest credentials in
Proxy-Authorization and holds a live registration.  Anyone else is challenged
with 407 once and refused with 403 otherwise.  Only admitted callers can make
the router place a PSTN leg: toll fraud starts with an open proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from router.policy.model import Policy, RoutingMode, TrustedPeer
from router.sip import digest
from router.sip.message import SipMessage, auth_params


@dataclass(frozen=True)
class Admitted:
    who: str                 # peer name or device id
    mode: RoutingMode
    may_use_trunk: bool
    device_id: str | None = None


@dataclass(frozen=True)
class Refused:
    status: int              # 403 or 407
    reason: str
    detail: str


def trusted_peer(policy: Policy, host: str) -> TrustedPeer | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    for peer in policy.trusted_peers:
        if address in peer.net:
            return peer
    return None


def admit(policy: Policy, msg: SipMessage, host: str, nonces: digest.NonceBook,
          ha1_for: Callable[[str, str], str | None], is_registered: Callable[[str, float], bool],
          now: float) -> Admitted | Refused:
    peer = trusted_peer(policy, host)
    if peer is not None:
        return Admitted(peer.name, peer.mode or policy.routing.mode, True)
    creds = None
    for value in msg.all("proxy-authorization"):
        scheme, params = auth_params(value)
        if scheme == "digest" and params.get("realm") == policy.domain:
            creds = digest.Credentials.from_params(params)
            break
    if creds is None:
        return Refused(407, "Proxy Authentication Required", f"{host} is not a trusted peer")
    owner = policy.device_by_auth(creds.username)
    ha1 = ha1_for(creds.username, creds.algorithm) if owner else None
    verdict = nonces.check(creds, msg.method, ha1, now)
    if verdict == digest.Verdict.STALE:
        return Refused(407, "Proxy Authentication Required", "stale nonce")
    if verdict != digest.Verdict.OK or owner is None:
        return Refused(403, "Forbidden", f"bad credentials for {creds.username!r} from {host}")
    device = owner[1]
    if not is_registered(device.id, now):
        return Refused(403, "Forbidden", f"device {device.id} is not registered")
    return Admitted(device.id, policy.routing.mode, True, device.id)
