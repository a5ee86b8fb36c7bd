"""The PSTN leg: an INVITE to the trunk for the agent's own number; pure.

Theory of operation.  A ``PstnLeg`` decision becomes one branch to the trunk
with the agent's number as Request-URI and the queue's hotline as caller ID:
``P-Asserted-Identity``, or, for trunks that read only From
(``caller_id: from``), a rewritten From that the dialog restores on every
message travelling back (``Dialog.rewrite``).  ``Diversion`` names the agent
(RFC 5806), so the carrier and the agent's phone show whose call it was.
Headers the caller sent that could spoof these (its own PAI, Diversion, the
queue header) are dropped.  When the trunk challenges the INVITE (401/407),
``answer_challenge`` builds the same branch again once, with the trunk's
credentials and the next CSeq (RFC 3261 §22.2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from router.policy.decide import PstnLeg
from router.policy.model import Policy, Trunk
from router.sip.branch import Branch, Spec
from router.sip.commands import Source
from router.sip.message import SipMessage
from router.sip.uac_auth import credentials_header

LABEL_PREFIX = "pstn:"


@dataclass(frozen=True)
class LegPlan:
    spec: Spec
    rewrite: tuple[str, str] | None       # (caller's From, hotline From) when From is rewritten


def plan(policy: Policy, invite: SipMessage, leg: PstnLeg, dest: Source) -> LegPlan:
    """The branch to the trunk for ``leg``: URI, caller-ID headers, what to drop."""
    trunk = leg.trunk
    hotline_uri = f"sip:{leg.caller_id}@{trunk.host}"
    user = policy.user(leg.user_id)
    agent = user.extension if user is not None and user.extension else leg.user_id
    add = (("P-Asserted-Identity", f"<{hotline_uri}>"),
           ("Diversion", f"<sip:{agent}@{policy.domain}>;reason=deflection;counter=1"))
    rewrite = None
    headers: tuple[tuple[str, str], ...] = ()
    if trunk.caller_id.value == "from":
        original = invite.header("from") or ""
        tag = invite.tag("from")
        hotline_from = f'"{leg.caller_id}" <sip:{leg.caller_id}@{policy.domain}>' + (f";tag={tag}" if tag else "")
        headers = (("from", hotline_from),)
        rewrite = (original, hotline_from)
    drop = frozenset({policy.routing.queue_header.lower(), "p-asserted-identity", "diversion"})
    return LegPlan(Spec(leg.target.uri, f"{LABEL_PREFIX}{leg.number}", dest, add, headers, drop), rewrite)


def answer_challenge(trunk: Trunk | None, branch: Branch, challenge: SipMessage) -> Spec | None:
    """The trunk challenged the leg: the same branch with credentials, once; None if we cannot."""
    if trunk is None or trunk.username is None or trunk.password is None \
            or not branch.label.startswith(LABEL_PREFIX) or branch.cseq_offset:
        return None
    header = credentials_header(challenge, "INVITE", branch.uri, trunk.username, trunk.password, trunk.realm)
    if header is None:
        return None
    return replace(branch.spec, add=(*branch.spec.add, header))
