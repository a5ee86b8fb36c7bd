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
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from router.errors import Forbidden, NotFound
from router.policy.model import DeviceKind, Policy, User
from router.sip import digest
from router.web import auth
from router.web.sessions import COOKIE

# JsSIP from npm (router/web/jssip/package.json, pinned; scripts/run and scripts/test install it)
JSSIP = Path(__file__).resolve().parent / "jssip" / "node_modules" / "jssip" / "dist" / "jssip.min.js"
router = APIRouter()

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


@router.get("/api/me/softphone", tags=["me"])
def my_softphone(request: Request, identity: auth.Me) -> dict[str, str]:
    """What the agent page needs to register as the user's `web` device (cookie sessions only:
    a bearer client is a softphone of its own, with its own credentials)."""
    if identity.session.kind != COOKIE:
        raise Forbidden("the web phone's settings go only to the user's own page")
    policy = auth.backend_of(request).policy
    settings = softphone_for(policy, identity.user)
    if settings is None:
        raise NotFound("no web phone: the edge has no WSS listener, or the user has no web device "
                       "with MD5 credentials")
    return asdict(settings)


@router.get("/vendor/jssip.min.js", include_in_schema=False)
def jssip() -> FileResponse:
    if not JSSIP.exists():
        raise NotFound("JsSIP is not installed: run `npm ci` in router/web/jssip (scripts/run does)")
    return FileResponse(JSSIP, media_type="text/javascript")
