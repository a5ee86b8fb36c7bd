"""Who may send the router a call (RFC 3261 §22.3 proxy authentication); pure.

Theory of operation.  An INVITE is admitted from a trusted peer, matched by
source address against the configured networks (the upstream PBX/ACD and the
trunk), or from a device that proves itself with digest credentials in
Proxy-Authorization (the same ``Authenticator`` gates as registration: bad
credentials count toward the source address's throttle, but a call is never
refused because someone else sent bad REGISTERs naming the device) and holds
a live registration.  Anyone
else is challenged with 407 once and refused with 403 otherwise.  Only
admitted callers can make the router place a PSTN leg: toll fraud starts
with an open proxy.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from router.policy.model import Policy, RoutingMode, TrustedPeer
from router.sip.auth import Authenticator, Gate
from router.sip.commands import phrase
from router.sip.message import SipMessage


@dataclass(frozen=True)
class Admitted:
    who: str                 # peer name or device id
    mode: RoutingMode
    may_use_trunk: bool
    device_id: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class Refused:
    status: int              # 403 or 407
    reason: str
    detail: str
    stale: bool = False


def trusted_peer(policy: Policy, host: str) -> TrustedPeer | None:
    return _peer_at(policy.trusted_peers, host)


@functools.lru_cache(maxsize=4096)
def _peer_at(peers: tuple[TrustedPeer, ...], host: str) -> TrustedPeer | None:
    """Remembered per peer list and address: every INVITE and in-dialog request asks, and
    parsing the address and testing each network showed in the profile."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    for peer in peers:
        if address in peer.net:
            return peer
    return None


# Authentication gate -> refusal status; None: go on.
REFUSALS: dict[Gate, int | None] = {
    Gate.THROTTLED: 403, Gate.CHALLENGE: 407, Gate.LOCKED: 403, Gate.STALE: 407,
    Gate.BAD: 403, Gate.BAD_FINAL: 403, Gate.OK: None,
}


def admit(policy: Policy, msg: SipMessage, host: str, auth: Authenticator,
          is_registered: Callable[[str, float], bool], now: float) -> Admitted | Refused:
    peer = trusted_peer(policy, host)
    if peer is not None:
        return Admitted(peer.name, peer.mode or policy.routing.mode, True, peer=peer.name)
    check = auth.check(msg, "proxy-authorization", host, now, lockout=False)
    status = REFUSALS[check.gate]
    if status is not None:
        detail = f"{host} is not a trusted peer" if check.gate is Gate.CHALLENGE else check.detail
        return Refused(status, phrase(status), detail, stale=check.gate is Gate.STALE)
    assert check.owner is not None
    device = check.owner[1]
    if not is_registered(device.id, now):
        return Refused(403, phrase(403), f"device {device.id} is not registered")
    return Admitted(device.id, policy.routing.mode, True, device.id)
