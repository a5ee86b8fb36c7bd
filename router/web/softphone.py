"""The agent page as the agent's `web` device: what its softphone needs to register.

With the edge's WSS listener on, a logged-in agent's page registers over WSS as the
agent's device of kind ``web`` (JsSIP), so a call on ``all_devices`` or ``app`` rings
the page itself.  The page is given the digest HA1 (MD5, which JsSIP answers with),
never the SIP password, and only over the agent's own logged-in session.  The
``+sip.instance`` is derived from the device, so a reload replaces the page's
binding instead of adding a stale one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from router.policy.model import DeviceKind, Policy, User
from router.sip import digest

_INSTANCE_NAMESPACE = uuid.UUID("7d0c3f5e-2b1a-4c8e-9f61-5a2d8b3e4c10")


@dataclass(frozen=True)
class SoftphoneSettings:
    wss_url: str
    uri: str              # the AOR the page registers (the user's, as the router knows it)
    auth_user: str        # the web device's digest username
    realm: str
    ha1: str              # MD5 HA1: the page never sees the password
    display_name: str
    instance: str         # urn:uuid, stable per device
    device_id: str


def softphone_for(policy: Policy, user: User) -> SoftphoneSettings | None:
    """The settings of ``user``'s web device, or None: no edge with WSS, no web device, or a
    device whose credentials give no MD5 HA1 (only a SHA-256 one)."""
    edge = policy.edge
    if edge is None or edge.wss_port is None:
        return None
    device = next((d for d in user.devices if d.kind is DeviceKind.WEB), None)
    if device is None:
        return None
    if device.ha1_md5:
        ha1 = device.ha1_md5
    elif device.password is not None:
        ha1 = digest.ha1("MD5", device.auth_username, policy.domain, device.password)
    else:
        return None
    host = edge.public_address
    host = f"[{host}]" if ":" in host else host
    return SoftphoneSettings(
        wss_url=f"wss://{host}:{edge.wss_port}", uri=f"sip:{user.id}@{policy.domain}",
        auth_user=device.auth_username, realm=policy.domain, ha1=ha1,
        display_name=user.display_name or user.id,
        instance=f"urn:uuid:{uuid.uuid5(_INSTANCE_NAMESPACE, device.id)}", device_id=device.id)
